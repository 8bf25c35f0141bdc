"""ONNX export: the network graph and the whole sampling loop, run on onnxruntime.

Truths: the eager network (same weights), `flows.solvers.sample` with `flows.field`'s velocity
(the reference sampler), and, for the VP noise conversion, the closed-form flow of Gaussian data.
Each model is exported once per module (the dynamo exporter takes seconds per graph).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn

from export import export_model_dir
from export.contract import (
    INPUT_NAMES,
    ONNX_FILE,
    ONNX_OPSET,
    SAMPLER_FILE,
    SAMPLER_INPUT_NAMES,
)
from export.manifest import Manifest, read_manifest
from export.onnx_network import export_network_onnx
from export.onnx_runtime import open_session
from export.onnx_sampler import export_sampler_onnx
from export.parity import PARITY_ROWS, onnx_network_parity, parity_inputs, run_sampler
from flows.field import velocity_field
from flows.nets import NetSpec
from flows.paths import VPPath
from flows.solvers import sample
from flowserve.modeldir import (
    LoadedModel,
    ModelConfig,
    build_net,
    load_model_dir,
    sha256_file,
    write_model_dir,
)

# ORT's Conv/Gemm kernels sum in another order than ATen: ~100 fp32 ulps at O(1) outputs.
NET_ATOL = 1e-5
# The loop repeats those differences over a few steps; samples here are O(1).
SAMPLER_ATOL = 1e-4


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _write(root: Path, config: ModelConfig, seed: int) -> Path:
    torch.manual_seed(seed)
    directory = root / config.name / "1"
    write_model_dir(directory, config, build_net(config).state_dict())
    return directory


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional U-Net whose network graph is exported once (its sampler export
    costs another U-Net trace; the sampler is covered on the MLPs and an image-shaped toy)."""
    config = ModelConfig(
        name="unet",
        architecture=NetSpec("conv_unet8", {"channels": 1, "width": 8, "num_classes": 3}),
        sample_shape=(1, 8, 8),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=3,
        default_solver="heun",
        default_num_steps=3,
    )
    directory = _write(tmp_path_factory.mktemp("onnx"), config, seed=0)
    torch.set_num_threads(2)
    loaded = load_model_dir(directory)
    model = export_network_onnx(loaded.net, config.sample_shape)
    (directory / ONNX_FILE).write_bytes(model.SerializeToString())
    return directory


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional MLP (velocity, linear path) exported once through the pipeline."""
    config = ModelConfig(
        name="mlp-cond",
        architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 32, "depth": 2, "num_classes": 3}),
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=3,
        default_solver="euler",
        default_num_steps=3,
    )
    directory = _write(tmp_path_factory.mktemp("onnx"), config, seed=2)
    torch.set_num_threads(2)
    export_model_dir(directory, ["onnx"])
    return directory


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unconditional MLP (noise prediction, VP path) exported once."""
    config = ModelConfig(
        name="mlp-vp",
        architecture=NetSpec("time_mlp", {"dim": 3, "hidden": 32, "depth": 2}),
        sample_shape=(3,),
        parameterization="noise",
        path={"kind": "vp"},
        num_classes=0,
        default_solver="heun",
        default_num_steps=4,
    )
    directory = _write(tmp_path_factory.mktemp("onnx"), config, seed=1)
    torch.set_num_threads(2)
    export_model_dir(directory, "onnx")
    return directory


def _manifest(directory: Path) -> Manifest:
    return read_manifest(directory / "manifest.json")


@pytest.mark.parametrize("fixture", ["unet_dir", "mlp_dir", "cond_dir"])
def test_network_graph_follows_the_contract(fixture: str, request: pytest.FixtureRequest) -> None:
    directory: Path = request.getfixturevalue(fixture)
    model = onnx.load(str(directory / ONNX_FILE), load_external_data=False)
    onnx.checker.check_model(str(directory / ONNX_FILE), full_check=True)
    # Inputs in contract order with contract dtypes, even the unused labels of the MLP.
    assert tuple(value.name for value in model.graph.input) == INPUT_NAMES
    dtypes = [value.type.tensor_type.elem_type for value in model.graph.input]
    assert dtypes == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    assert [value.name for value in model.graph.output] == ["prediction"]
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param, f"{value.name} has a fixed batch"
    # One self-contained file: no tensor stores its data outside the model.
    assert all(
        tensor.data_location != onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer
    )
    assert model.opset_import[0].version == ONNX_OPSET


@pytest.mark.parametrize("fixture", ["unet_dir", "mlp_dir"])
@pytest.mark.parametrize("batch", [1, 257])
def test_network_matches_eager(fixture: str, batch: int, request: pytest.FixtureRequest) -> None:
    directory: Path = request.getfixturevalue(fixture)
    loaded = load_model_dir(directory)
    session = open_session(directory / ONNX_FILE)
    inputs = parity_inputs(loaded.config.sample_shape, loaded.config.num_classes, max(batch, 2), 7)
    feeds = {
        "x": inputs.x[:batch].numpy(),
        "t": inputs.t[:batch].numpy(),
        "class_labels": inputs.class_labels[:batch].numpy(),
    }
    (actual,) = session.run(["prediction"], feeds)
    with torch.no_grad():
        expected = loaded.net(inputs.x[:batch], inputs.t[:batch], inputs.class_labels[:batch])
    torch.testing.assert_close(torch.from_numpy(actual), expected, atol=NET_ATOL, rtol=0)


@pytest.mark.parametrize("fixture", ["mlp_dir", "cond_dir"])
def test_manifest_parity_is_reproducible(fixture: str, request: pytest.FixtureRequest) -> None:
    """The manifest's figure is what a fresh session measures on the documented inputs."""
    directory: Path = request.getfixturevalue(fixture)
    loaded = load_model_dir(directory)
    entry = _manifest(directory).file(ONNX_FILE)
    assert entry.parity["rows"] == PARITY_ROWS
    inputs = parity_inputs(loaded.config.sample_shape, loaded.config.num_classes, PARITY_ROWS)
    measured = onnx_network_parity(open_session(directory / ONNX_FILE), loaded.net, inputs)
    assert measured <= NET_ATOL
    # Same inputs, same kernels, same thread count: the figure reproduces to rounding.
    assert math.isclose(measured, entry.parity["max_abs_error"], rel_tol=0.05, abs_tol=1e-9)


def test_unconditional_net_ignores_the_labels_it_still_takes(mlp_dir: Path) -> None:
    session = open_session(mlp_dir / ONNX_FILE)
    assert [value.name for value in session.get_inputs()] == list(INPUT_NAMES)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    t = np.linspace(0, 1, 4, dtype=np.float32)
    outputs = [
        session.run(None, {"x": x, "t": t, "class_labels": np.full(4, label, np.int64)})[0]
        for label in (0, 5)
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])  # exactly: the input is unused


def test_sampler_is_one_loop_with_a_runtime_trip_count(cond_dir: Path) -> None:
    model = onnx.load(str(cond_dir / SAMPLER_FILE))
    onnx.checker.check_model(model, full_check=True)
    assert tuple(value.name for value in model.graph.input) == SAMPLER_INPUT_NAMES
    loops = [node for node in model.graph.node if node.op_type == "Loop"]
    assert len(loops) == 1
    assert loops[0].input[0] == "num_steps"  # trip count read from the graph input
    # The network appears in the body (stage 0) and in Heun's If branch (stage 1), not per step.
    body = onnx.helper.get_attribute_value(loops[0].attribute[0])
    assert sum(node.op_type == "Gemm" for node in model.graph.node) == 0
    stage0 = sum(node.op_type == "Gemm" for node in body.node)
    branches = [
        onnx.helper.get_attribute_value(attr)
        for node in body.node
        if node.op_type == "If"
        for attr in node.attribute
    ]
    stage1 = sum(node.op_type == "Gemm" for branch in branches for node in branch.node)
    assert stage0 == stage1 == 3  # the 2-hidden-layer MLP's three Linear layers, once each
    # Each weight is stored once, in the outer graph; both stages read it from there.
    weights = [
        init.name for init in model.graph.initializer if init.name.startswith("weights/net.")
    ]
    state_dict = load_model_dir(cond_dir).net.state_dict()
    assert sorted(weights) == sorted(f"weights/net.{name}" for name in state_dict)


def _reference(
    model: LoadedModel, x0: Tensor, labels: Tensor, scale: Tensor, steps: int, solver: str
) -> Tensor:
    config = model.config
    velocity_fn = velocity_field(
        model.net,
        config.gaussian_path,
        config.parameterization,
        class_labels=labels,
        guidance_scale=scale,
        null_label=config.num_classes,
    )
    return sample(velocity_fn, x0, steps, solver)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampler_matches_flows_with_guidance_per_row(cond_dir: Path, solver: str) -> None:
    loaded = load_model_dir(cond_dir)
    session = open_session(cond_dir / SAMPLER_FILE)
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn((5, 2), generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 1])  # 3 is the null class
    scale = torch.tensor([1.0, 0.0, 2.5, 1.0, 4.0])
    for steps in (2, 5):  # one file, any step count
        actual = run_sampler(session, x0, steps, solver, labels, scale)
        expected = _reference(loaded, x0, labels, scale, steps, solver)
        torch.testing.assert_close(actual, expected, atol=SAMPLER_ATOL, rtol=0)


def test_sampler_zero_steps_returns_the_noise(cond_dir: Path) -> None:
    session = open_session(cond_dir / SAMPLER_FILE)
    x0 = torch.randn(2, 2)
    out = run_sampler(session, x0, 0, "heun", torch.zeros(2, dtype=torch.int64), torch.ones(2))
    torch.testing.assert_close(out, x0, atol=0, rtol=0)  # the Loop runs no iteration


def test_unconditional_vp_sampler_matches_flows(mlp_dir: Path) -> None:
    loaded = load_model_dir(mlp_dir)
    session = open_session(mlp_dir / SAMPLER_FILE)
    x0 = torch.randn((16, 3), generator=torch.Generator().manual_seed(4))
    for solver in ("euler", "heun"):
        actual = run_sampler(
            session, x0, 4, solver, torch.zeros(16, dtype=torch.int64), torch.ones(16)
        )
        expected = sample(loaded.velocity_fn(), x0, 4, solver)
        # Random weights on the VP noise path give samples of size ~100 (1/alpha_0 ~ 150
        # amplifies at t=0), so the fp32 bound is relative to the sample size.
        scale = max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(actual, expected, atol=SAMPLER_ATOL * scale, rtol=0)


class _GaussianNoisePredictor(nn.Module):
    """Exact E[x_0 | x_t] for data N(mu, s^2 I) on a Gaussian path (an analytic 'network')."""

    def __init__(self, path: VPPath, mu: float, s: float) -> None:
        super().__init__()
        self.path, self.mu, self.s = path, mu, s

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        c = self.path.schedule(t)
        alpha_t, sigma_t = c.alpha_t.unsqueeze(1), c.sigma_t.unsqueeze(1)
        variance = alpha_t**2 * self.s**2 + sigma_t**2
        return sigma_t * (x - alpha_t * self.mu) / variance


def test_vp_noise_sampler_is_exact_for_gaussian_data() -> None:
    """With the exact noise predictor, the loop must transport N(0, I) onto N(mu, s^2 I).

    The probability-flow ODE keeps (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed,
    which gives the exact x_1 for each x_0; Heun is second order, so halving dt must cut the
    error about four-fold, and at 64 steps it must agree with flows to fp32 accuracy.
    """
    path, mu, s = VPPath(), 1.5, 0.5
    net = _GaussianNoisePredictor(path, mu, s)
    session = open_session(export_sampler_onnx(net, path, "noise", 0, (2,)).SerializeToString())
    x0 = torch.randn((64, 2), generator=torch.Generator().manual_seed(5))
    ends = path.schedule(torch.tensor([0.0, 1.0]))
    v_0 = ends.alpha_t[0] ** 2 * s**2 + ends.sigma_t[0] ** 2
    v_1 = ends.alpha_t[1] ** 2 * s**2 + ends.sigma_t[1] ** 2
    exact = ends.alpha_t[1] * mu + torch.sqrt(v_1 / v_0) * (x0 - ends.alpha_t[0] * mu)
    labels, scale = torch.zeros(64, dtype=torch.int64), torch.ones(64)
    errors = []
    for steps in (32, 64):
        actual = run_sampler(session, x0, steps, "heun", labels, scale)
        reference = sample(velocity_field(net, path, "noise"), x0, steps, "heun")
        torch.testing.assert_close(actual, reference, atol=SAMPLER_ATOL, rtol=0)
        errors.append(float((actual - exact).abs().max()))
    # Second order: ratio ~4 (3 leaves room for higher-order terms at these step counts).
    assert errors[0] / errors[1] > 3.0, errors
    # At 64 steps the discretisation error is small against the data scale s = 0.5.
    assert errors[1] < 1e-2, errors


def test_export_keeps_config_and_weights_and_records_them(mlp_dir: Path) -> None:
    manifest = _manifest(mlp_dir)
    assert manifest.source_sha256["config.json"] == sha256_file(mlp_dir / "config.json")
    assert manifest.source_sha256["model.safetensors"] == sha256_file(mlp_dir / "model.safetensors")
    load_model_dir(mlp_dir, verify=True)  # config.json's digests still hold
    for entry in manifest.files:
        assert entry.sha256 == sha256_file(mlp_dir / entry.file)
        assert entry.size_bytes == (mlp_dir / entry.file).stat().st_size
    assert manifest.exporter["torch"] == torch.__version__
    assert manifest.exporter["onnx"] == onnx.__version__
    sampler = manifest.file(SAMPLER_FILE)
    assert [spec.name for spec in sampler.inputs] == list(SAMPLER_INPUT_NAMES)
    assert set(sampler.parity) == {"euler", "heun"}
    assert not list(mlp_dir.glob(".*.tmp"))


class _ImageToy(nn.Module):
    """A small conditional image 'network' (conv, label embedding, time): any fixed function
    serves as the truth for parity, and it exports in a fraction of the U-Net's time."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.embedding = nn.Embedding(num_classes + 1, 2)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        bias = self.embedding(class_labels).reshape(-1, 2, 1, 1)  # (batch, channels, 1, 1)
        return torch.tanh(self.conv(x)) * t.reshape(-1, 1, 1, 1) + bias


def test_image_shaped_guided_sampler_matches_flows() -> None:
    """Guidance and the VP noise conversion on 4-D samples (per-row reshapes of (batch,))."""
    parameterization = "noise"
    torch.manual_seed(6)
    net, path = _ImageToy(num_classes=2).eval(), VPPath()
    proto = export_sampler_onnx(net, path, parameterization, 2, (2, 4, 4))
    session = open_session(proto.SerializeToString())
    x0 = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(7))
    labels, scale = torch.tensor([0, 1, 2]), torch.tensor([1.0, 3.0, 0.5])
    actual = run_sampler(session, x0, 3, "heun", labels, scale)
    velocity_fn = velocity_field(net, path, parameterization, labels, scale, null_label=2)
    expected = sample(velocity_fn, x0, 3, "heun")
    bound = SAMPLER_ATOL * max(1.0, float(expected.abs().max()))  # fp32 error is relative
    torch.testing.assert_close(actual, expected, atol=bound, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": "vp"}, "path must be a GaussianPath"),
        ({"parameterization": "data"}, "parameterization must be one of"),
        ({"num_classes": -1}, "num_classes must be an int >= 0"),
        ({"sample_shape": (0, 2)}, "sample_shape must be a non-empty tuple"),
    ],
)
def test_sampler_export_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {
        "net": nn.Identity(),
        "path": VPPath(),
        "parameterization": "noise",
        "num_classes": 0,
        "sample_shape": (2,),
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        export_sampler_onnx(**arguments)  # type: ignore[arg-type]


def test_network_export_rejects_non_modules() -> None:
    with pytest.raises(ValueError, match="net must be a torch"):
        export_network_onnx(lambda x, t, labels: x, (2,))  # type: ignore[arg-type]
