"""velocity_field and guided_combine against Gaussian conditioning and separate evaluations."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flows.field import guided_combine, velocity_field
from flows.paths import PARAMETERIZATIONS, GaussianPath, LinearPath, VPPath
from tests.test_paths import GaussianPathTruth, random_gaussian

torch.set_num_threads(1)
F64 = torch.float64


@pytest.mark.parametrize("path", [LinearPath(), VPPath()], ids=["linear", "vp"])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_any_parameterization_yields_the_exact_velocity(
    path: GaussianPath, parameterization: str
) -> None:
    mu, cov = random_gaussian(3, seed=0)
    truth = GaussianPathTruth(path, mu, cov)

    def net(x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        return truth.predictions(x, t)[parameterization]

    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, generator=g, dtype=F64)
    t = torch.linspace(0.05, 0.95, 9, dtype=F64)
    v = velocity_field(net, path, parameterization)(x, t)
    # Exact conversion in float64 with condition <= 20: 1e-9 is far above round-off.
    torch.testing.assert_close(v, truth.predictions(x, t)["velocity"], rtol=1e-9, atol=1e-9)


class LabelNet:
    """A nonlinear class-conditional 'network' that counts its calls and batch sizes."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        self.batch_sizes.append(x.shape[0])
        scale = (labels.to(x.dtype) + 1.0).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.tanh(x * scale) + t.reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("parameterization", ["velocity", "data"])
@pytest.mark.parametrize("scale", [3.0, 0.0, "per_row"])
def test_guidance_equals_separate_conditional_and_null_evaluations(
    parameterization: str, scale: float | str
) -> None:
    path = VPPath()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 3, generator=g, dtype=F64)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=F64)
    labels = torch.tensor([0, 1, 2, 1])
    null = 3
    w: float | Tensor = (
        torch.tensor([0.0, 1.0, 2.5, -1.0], dtype=F64) if scale == "per_row" else float(scale)
    )
    net = LabelNet()
    guided = velocity_field(net, path, parameterization, labels, w, null_label=null)(x, t)
    # One network call holding the conditional and the null rows.
    assert net.batch_sizes == [8]
    v_cond = velocity_field(LabelNet(), path, parameterization, labels)(x, t)
    v_null = velocity_field(LabelNet(), path, parameterization, torch.full_like(labels, null))(x, t)
    w_col = w.reshape(-1, 1, 1) if isinstance(w, Tensor) else w
    expected = v_null + w_col * (v_cond - v_null)
    # Guiding predictions then converting equals guiding velocities: affine maps, round-off only.
    torch.testing.assert_close(guided, expected, rtol=1e-12, atol=1e-12)


def test_unguided_call_is_one_evaluation_with_the_given_or_null_labels() -> None:
    seen: list[Tensor] = []

    def net(x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        seen.append(labels)
        return x

    x, t = torch.zeros(3, 2), torch.full((3,), 0.5)
    velocity_field(net, LinearPath(), "velocity")(x, t)
    velocity_field(net, LinearPath(), "velocity", null_label=10)(x, t)
    labels = torch.tensor([4, 5, 6])
    velocity_field(net, LinearPath(), "velocity", labels, guidance_scale=1.0, null_label=10)(x, t)
    assert [s.tolist() for s in seen] == [[0, 0, 0], [10, 10, 10], [4, 5, 6]]


def test_guided_combine_formula() -> None:
    g = torch.Generator().manual_seed(3)
    v_c, v_u = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64)
    # lerp and the written-out formula differ only by rounding: 1e-12 in float64.
    torch.testing.assert_close(guided_combine(v_c, v_u, 1.0), v_c, rtol=0, atol=1e-12)
    torch.testing.assert_close(guided_combine(v_c, v_u, 0.0), v_u, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        guided_combine(v_c, v_u, 4.0), 4.0 * v_c - 3.0 * v_u, rtol=1e-12, atol=1e-12
    )
    scale = torch.arange(5, dtype=F64)
    torch.testing.assert_close(
        guided_combine(v_c, v_u, scale), v_u + scale[:, None] * (v_c - v_u), rtol=1e-12, atol=1e-12
    )


def test_bad_input_raises_naming_argument() -> None:
    def net(x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        return x

    path = LinearPath()
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="parameterization"):
        velocity_field(net, path, "epsilon")
    with pytest.raises(ValueError, match="class_labels and null_label"):
        velocity_field(net, path, "velocity", guidance_scale=2.0)
    with pytest.raises(ValueError, match="class_labels and null_label"):
        velocity_field(net, path, "velocity", labels, guidance_scale=2.0)
    with pytest.raises(ValueError, match="class_labels"):
        velocity_field(net, path, "velocity", labels.float())
    with pytest.raises(ValueError, match="guidance_scale"):
        velocity_field(net, path, "velocity", labels, float("nan"), null_label=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        velocity_field(net, path, "velocity", labels, torch.ones(3), null_label=2)
    with pytest.raises(ValueError, match="path"):
        velocity_field(net, "linear", "velocity")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="net_fn"):
        velocity_field(None, path, "velocity")  # type: ignore[arg-type]
    field = velocity_field(net, path, "velocity", labels)
    with pytest.raises(ValueError, match="class_labels has 2 rows"):
        field(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="v_uncond"):
        guided_combine(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="scale"):
        guided_combine(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="scale"):
        guided_combine(torch.zeros(2, 3), torch.zeros(2, 3), float("inf"))
