"""Paths and conversions against first principles: quadrature, autograd and Gaussian algebra."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from scipy import integrate
from torch import Tensor

from flows.paths import (
    PARAMETERIZATIONS,
    GaussianPath,
    LinearPath,
    VPPath,
    convert,
    path_from_dict,
)

torch.set_num_threads(1)
F64 = torch.float64
PATHS = [LinearPath(), VPPath()]


@dataclass(frozen=True)
class GaussianPathTruth:
    """Posterior quantities of a Gaussian path with data N(mu, cov), from Gaussian conditioning.

    x_t ~ N(alpha mu, alpha^2 cov + sigma^2 I); Cov(x_1, x_t) = alpha cov; Cov(x_0, x_t) = sigma I.
    Written with dense solves, independently of flows.paths.convert and flows.reference.
    """

    path: GaussianPath
    mu: Tensor
    cov: Tensor

    def _moments(self, t: Tensor) -> tuple[Tensor, ...]:
        c = self.path.schedule(t)
        eye = torch.eye(self.mu.shape[0], dtype=F64)
        a, s = c.alpha_t[:, None, None], c.sigma_t[:, None, None]
        mean = c.alpha_t[:, None] * self.mu
        cov_t = a**2 * self.cov + s**2 * eye
        return c.alpha_t, c.sigma_t, c.d_alpha_t, c.d_sigma_t, mean, cov_t

    def predictions(self, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        alpha, sigma, d_alpha, d_sigma, mean, cov_t = self._moments(t)
        white = torch.linalg.solve(cov_t, (x - mean).unsqueeze(-1)).squeeze(-1)
        x1_hat = self.mu + alpha[:, None] * (white @ self.cov)
        x0_hat = sigma[:, None] * white
        return {
            "velocity": d_alpha[:, None] * x1_hat + d_sigma[:, None] * x0_hat,
            "score": -white,
            "noise": x0_hat,
            "data": x1_hat,
        }

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        *_, mean, cov_t = self._moments(t)
        return torch.distributions.MultivariateNormal(mean, cov_t).log_prob(x)


def random_gaussian(d: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=F64)
    a = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    return mu, a @ a.T + 0.3 * torch.eye(d, dtype=F64)


def test_linear_coefficients_follow_definition() -> None:
    t = torch.linspace(0, 1, 11, dtype=F64)
    c = LinearPath().coefficients(t)
    # Pure arithmetic on exactly representable inputs: must match to the last bit of 1 - t.
    torch.testing.assert_close(c.alpha_t, t, rtol=0, atol=0)
    torch.testing.assert_close(c.sigma_t, 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(c.d_alpha_t, torch.ones_like(t), rtol=0, atol=0)
    torch.testing.assert_close(c.d_sigma_t, -torch.ones_like(t), rtol=0, atol=0)


@pytest.mark.parametrize("t_value", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_vp_alpha_matches_quadrature_of_beta(t_value: float) -> None:
    path = VPPath(beta_min=0.1, beta_max=20.0, eps=1e-3)
    s = path.eps + (1 - path.eps) * (1 - t_value)
    integral, _ = integrate.quad(lambda u: 0.1 + u * (20.0 - 0.1), 0.0, s)
    c = path.coefficients(torch.tensor([t_value], dtype=F64))
    # quad is accurate to ~1e-14 on a linear integrand; 1e-12 leaves room for exp's rounding.
    assert c.alpha_t.item() == pytest.approx(math.exp(-0.5 * integral), rel=1e-12)
    assert c.alpha_t.item() ** 2 + c.sigma_t.item() ** 2 == pytest.approx(1.0, abs=1e-12)
    assert math.isfinite(c.d_sigma_t.item()) and c.sigma_t.item() > 0


@pytest.mark.parametrize("path", PATHS, ids=["linear", "vp"])
def test_derivatives_match_autograd(path: GaussianPath) -> None:
    t = torch.linspace(0.0, 1.0, 9, dtype=F64).requires_grad_()
    c = path.schedule(t)
    (d_alpha,) = torch.autograd.grad(c.alpha_t.sum(), t, retain_graph=True)
    (d_sigma,) = torch.autograd.grad(c.sigma_t.sum(), t)
    # Autograd differentiates the same float64 expressions: agreement to ~1e-12 relative.
    torch.testing.assert_close(c.d_alpha_t, d_alpha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c.d_sigma_t, d_sigma, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS, ids=["linear", "vp"])
def test_target_velocity_is_time_derivative_of_x_t(path: GaussianPath) -> None:
    g = torch.Generator().manual_seed(1)
    x_0, x_1 = torch.randn(6, 3, 2, generator=g, dtype=F64), torch.randn(6, 3, 2, generator=g)
    x_1 = x_1.to(F64)
    t = torch.rand(6, generator=g, dtype=F64) * 0.98 + 0.01
    _, jvp = torch.func.jvp(lambda tt: path.sample_x_t(x_0, x_1, tt), (t,), (torch.ones_like(t),))
    # Forward-mode derivative of the same float64 expression: round-off level agreement.
    torch.testing.assert_close(path.target_velocity(x_0, x_1, t), jvp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS, ids=["linear", "vp"])
def test_convert_recovers_every_parameterization_from_conditional_truth(path: GaussianPath) -> None:
    # With x_1 and x_0 known exactly, each parameterisation's exact value is its definition;
    # convert must map any one to any other.
    g = torch.Generator().manual_seed(2)
    x_0, x_1 = torch.randn(8, 4, generator=g, dtype=F64), torch.randn(8, 4, generator=g, dtype=F64)
    t = torch.rand(8, generator=g, dtype=F64) * 0.9 + 0.05
    c = path.schedule(t)
    x_t = path.sample_x_t(x_0, x_1, t)
    truth = {
        "velocity": path.target_velocity(x_0, x_1, t),
        "score": -x_0 / c.sigma_t[:, None],
        "noise": x_0,
        "data": x_1,
    }
    for source, target in itertools.product(PARAMETERIZATIONS, repeat=2):
        got = convert(truth[source], x_t, t, path, source, target)
        # float64 with conditioning <= 1/min(alpha, sigma) ~ 20: 1e-9 is far above round-off.
        torch.testing.assert_close(got, truth[target], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", PATHS, ids=["linear", "vp"])
@pytest.mark.parametrize("source,target", list(itertools.permutations(PARAMETERIZATIONS, 2)))
def test_convert_round_trips(path: GaussianPath, source: str, target: str) -> None:
    g = torch.Generator().manual_seed(3)
    pred, x_t = torch.randn(5, 2, 3, generator=g, dtype=F64), torch.randn(5, 2, 3, generator=g)
    x_t = x_t.to(F64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=F64)
    there = convert(pred, x_t, t, path, source, target)
    back = convert(there, x_t, t, path, target, source)
    # Two affine maps with condition <= ~20 in float64: round-off stays below 1e-10.
    torch.testing.assert_close(back, pred, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS, ids=["linear", "vp"])
@pytest.mark.parametrize("t_value", [0.1, 0.4, 0.8, 0.99])
def test_converted_score_equals_autograd_of_marginal_log_density(
    path: GaussianPath, t_value: float
) -> None:
    mu, cov = random_gaussian(3, seed=4)
    truth = GaussianPathTruth(path, mu, cov)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=g, dtype=F64).requires_grad_()
    t = torch.full((7,), t_value, dtype=F64)
    (score,) = torch.autograd.grad(truth.log_prob(x, t).sum(), x)
    velocity = truth.predictions(x.detach(), t)["velocity"]
    converted = convert(velocity, x.detach(), t, path, "velocity", "score")
    # float64 dense solves vs autograd of a Cholesky log-density: agreement to ~1e-9.
    torch.testing.assert_close(converted, score, rtol=1e-8, atol=1e-8)


def test_to_dict_round_trips() -> None:
    for path in [LinearPath(), VPPath(), VPPath(beta_min=0.5, beta_max=10.0, eps=1e-4)]:
        assert path_from_dict(path.to_dict()) == path


def test_vp_path_stays_finite_on_closed_interval() -> None:
    t = torch.linspace(0, 1, 101)
    c = VPPath().coefficients(t)
    for value in (c.alpha_t, c.sigma_t, c.d_alpha_t, c.d_sigma_t):
        assert bool(torch.isfinite(value).all())
    assert bool((c.sigma_t > 0).all())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta_min": 0.0}, "beta_min"),
        ({"beta_min": 5.0, "beta_max": 1.0}, "beta_max"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 1.0}, "eps"),
        ({"beta_max": float("inf")}, "beta_max"),
    ],
)
def test_vp_path_rejects_bad_schedule(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VPPath(**kwargs)


def test_path_from_dict_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="kind"):
        path_from_dict({"kind": "cosine"})
    with pytest.raises(ValueError, match="unknown keys"):
        path_from_dict({"kind": "linear", "beta_min": 0.1})
    with pytest.raises(ValueError, match="mapping"):
        path_from_dict("linear")  # type: ignore[arg-type]


def test_bad_input_raises_naming_argument() -> None:
    path = LinearPath()
    x = torch.zeros(3, 2)
    t = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match="source"):
        convert(x, x, t, path, "epsilon", "velocity")
    with pytest.raises(ValueError, match="target"):
        convert(x, x, t, path, "velocity", "x0")
    with pytest.raises(ValueError, match="prediction"):
        convert(torch.zeros(3, 3), x, t, path, "velocity", "score")
    with pytest.raises(ValueError, match="t must lie in"):
        convert(x, x, torch.full((3,), 1.5), path, "velocity", "score")
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        convert(x, x, torch.full((3, 1), 0.5), path, "velocity", "score")
    with pytest.raises(ValueError, match="x_t must contain only finite"):
        convert(x, torch.full((3, 2), float("nan")), t, path, "velocity", "score")
    with pytest.raises(ValueError, match="path"):
        convert(x, x, t, "linear", "velocity", "score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x_1"):
        path.sample_x_t(x, torch.zeros(3, 4), t)
    with pytest.raises(ValueError, match="t must lie in"):
        path.target_velocity(x, x, torch.full((3,), -0.1))
    with pytest.raises(ValueError, match="t must"):
        path.coefficients(torch.zeros(2, 2))
