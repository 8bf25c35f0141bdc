"""flows.nets: shapes, conditioning, per-row independence, scripting, and spec validation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from flows.nets import NET_KINDS, ConvUNet8, NetSpec, TimeMLP, build_net

SPECS = [
    NetSpec("time_mlp", {"dim": 2}),
    NetSpec("time_mlp", {"dim": 3, "hidden": 32, "depth": 2, "num_classes": 4}),
    NetSpec("conv_unet8", {"channels": 1, "width": 16, "num_classes": 10}),
    NetSpec("conv_unet8", {"channels": 2, "width": 8, "num_classes": 0}),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _inputs(spec: NetSpec, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *spec.sample_shape), generator=generator)
    t = torch.rand(batch, generator=generator)
    labels = torch.randint(0, spec.num_classes + 1, (batch,), generator=generator)
    return x, t, labels


def _net(spec: NetSpec, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_net(spec).eval()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.num_classes}")
@pytest.mark.parametrize("batch", [1, 5])
def test_output_has_the_shape_of_x(spec: NetSpec, batch: int) -> None:
    x, t, labels = _inputs(spec, batch)
    out = _net(spec)(x, t, labels)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.num_classes}")
def test_rows_are_independent_of_their_batch(spec: NetSpec) -> None:
    # The engine batches rows from unrelated requests: no row may see another (no BatchNorm).
    net = _net(spec)
    x, t, labels = _inputs(spec, 6)
    together = net(x, t, labels)
    alone = torch.cat([net(x[i : i + 1], t[i : i + 1], labels[i : i + 1]) for i in range(6)])
    # Only float32 summation order differs between batch sizes: ~1e-7 relative per op.
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.num_classes > 0], ids=lambda s: s.kind)
def test_class_labels_change_the_output_and_null_class_is_accepted(spec: NetSpec) -> None:
    net = _net(spec)
    x, t, _ = _inputs(spec, 4)
    outputs = [
        net(x, t, torch.full((4,), label, dtype=torch.int64))
        for label in (0, 1, spec.num_classes)  # the last one is the null class
    ]
    for i in range(len(outputs)):
        assert bool(torch.isfinite(outputs[i]).all())
        for j in range(i + 1, len(outputs)):
            # Random embeddings differ by O(0.1); 1e-4 is far above float noise and far below that.
            assert (outputs[i] - outputs[j]).abs().max() > 1e-4
    with pytest.raises(IndexError):
        net(x, t, torch.full((4,), spec.num_classes + 1, dtype=torch.int64))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.num_classes == 0], ids=lambda s: s.kind)
def test_unconditional_nets_ignore_labels(spec: NetSpec) -> None:
    net = _net(spec)
    x, t, _ = _inputs(spec, 3)
    first = net(x, t, torch.zeros(3, dtype=torch.int64))
    second = net(x, t, torch.full((3,), 7, dtype=torch.int64))
    assert torch.equal(first, second)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.num_classes}")
def test_time_changes_the_output(spec: NetSpec) -> None:
    net = _net(spec)
    x, _, labels = _inputs(spec, 3)
    early = net(x, torch.full((3,), 0.1), labels)
    late = net(x, torch.full((3,), 0.9), labels)
    assert (early - late).abs().max() > 1e-4  # as above: real differences are O(0.1)


@pytest.mark.parametrize("spec", SPECS[1:3], ids=lambda s: s.kind)
def test_script_and_trace_match_eager_at_a_new_batch_size(spec: NetSpec) -> None:
    net = _net(spec)
    scripted = torch.jit.script(net)
    traced = torch.jit.trace(net, _inputs(spec, 3))
    x, t, labels = _inputs(spec, 7, seed=1)  # another batch size: no shape was baked in
    with torch.no_grad():
        eager = net(x, t, labels)
        # Same kernels on the same inputs; the JIT may fuse ops, so allow float32 rounding.
        torch.testing.assert_close(scripted(x, t, labels), eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(traced(x, t, labels), eager, rtol=1e-5, atol=1e-6)


def test_time_mlp_layout_matches_its_arguments() -> None:
    net = TimeMLP(dim=3, hidden=16, depth=4, num_classes=2)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    # depth hidden layers: the input layer plus depth - 1 hidden-to-hidden layers, then output.
    assert [(m.in_features, m.out_features) for m in linears] == [
        (4, 16),
        (16, 16),
        (16, 16),
        (16, 16),
        (16, 3),
    ]
    assert net.class_embedding is not None
    assert net.class_embedding.num_embeddings == 3  # 2 real classes + the null class


def test_unet_class_table_has_a_null_row() -> None:
    net = ConvUNet8(channels=1, width=8, num_classes=10)
    assert net.class_embedding is not None
    assert net.class_embedding.num_embeddings == 11


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.num_classes}")
def test_spec_round_trips_and_predicts_its_shapes(spec: NetSpec) -> None:
    assert NetSpec.from_dict(spec.to_dict()) == spec
    net = build_net(spec)
    assert isinstance(net, NET_KINDS[spec.kind])
    assert getattr(net, "num_classes") == spec.num_classes  # noqa: B009 - nn.Module attribute


@pytest.mark.parametrize(
    ("kind", "kwargs", "needle"),
    [
        ("resnet", {}, "kind"),
        ("time_mlp", {}, "dim"),
        ("time_mlp", {"dim": 2, "heads": 4}, "heads"),
        ("time_mlp", {"dim": 2, "hidden": 2.5}, "hidden"),
        ("time_mlp", {"dim": True}, "dim"),
        ("conv_unet8", {"num_classes": -1}, "num_classes"),
        # Untrusted config.json: a net of depth 10**6 must be refused before it is built.
        ("time_mlp", {"dim": 2, "depth": 10**6}, "depth.*<= 256"),
        ("conv_unet8", {"width": 1 << 20}, "width.*<= 4096"),
    ],
)
def test_bad_specs_name_the_argument(kind: str, kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        NetSpec(kind, kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "needle"),
    [
        (lambda: TimeMLP(dim=0), "dim"),
        (lambda: TimeMLP(dim=2, depth=0), "depth"),
        (lambda: ConvUNet8(width=12), "width"),
        (lambda: ConvUNet8(channels=0), "channels"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(factory: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        factory()  # type: ignore[operator]


def test_spec_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown"):
        NetSpec.from_dict({"kind": "time_mlp", "kwargs": {"dim": 2}, "extra": 1})
