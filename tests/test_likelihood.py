"""Likelihoods against closed-form Gaussian densities, autograd loops and exact variances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from torch import Tensor, nn

from flows.likelihood import (
    LikelihoodEstimate,
    bits_per_dim,
    exact_divergence,
    finish_likelihood,
    hutchinson_divergence,
    likelihood_step,
    log_likelihood,
    make_probes,
)
from flows.reference import gaussian_linear_velocity
from flows.solvers import ODE_SOLVERS, TABLEAUS
from tests.test_paths import random_gaussian

torch.set_num_threads(1)
F64 = torch.float64


def gaussian_data(d: int, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    mu, cov = random_gaussian(d, seed)
    x1 = torch.distributions.MultivariateNormal(mu, cov).sample((n,))
    return mu, cov, x1


@pytest.mark.parametrize("d", [2, 16])
def test_exact_likelihood_equals_closed_form_gaussian_density(d: int) -> None:
    torch.manual_seed(0)
    mu, cov, x1 = gaussian_data(d, 16, seed=d)
    est = log_likelihood(gaussian_linear_velocity(mu, cov), x1, 100, "rk4", "exact")
    truth = torch.distributions.MultivariateNormal(mu, cov).log_prob(x1)
    # The bound: 1e-4 nats with rk4 and 100 steps (observed ~2e-9 in float64).
    torch.testing.assert_close(est.log_prob, truth, rtol=0, atol=1e-4)
    assert bool((est.std_error == 0).all())
    expected_bpd = -truth / (d * math.log(2))
    torch.testing.assert_close(est.bits_per_dim, expected_bpd, rtol=0, atol=1e-4 / d)


def test_exact_likelihood_on_image_shaped_samples() -> None:
    torch.manual_seed(1)
    mu, cov, x1 = gaussian_data(12, 6, seed=3)
    images = x1.reshape(6, 3, 2, 2)  # the same Gaussian, seen as (batch, C, H, W)
    est = log_likelihood(gaussian_linear_velocity(mu, cov), images, 100, "rk4")
    truth = torch.distributions.MultivariateNormal(mu, cov).log_prob(x1)
    # Same bound as the flat case: the sample shape must not change the answer.
    torch.testing.assert_close(est.log_prob, truth, rtol=0, atol=1e-4)


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_every_solver_converges_to_the_density_at_its_order(solver: str) -> None:
    torch.manual_seed(2)
    mu, cov, x1 = gaussian_data(2, 8, seed=4)
    v = gaussian_linear_velocity(mu, cov)
    truth = torch.distributions.MultivariateNormal(mu, cov).log_prob(x1)
    errors = [
        (log_likelihood(v, x1, n, solver).log_prob - truth).abs().max().item() for n in (32, 128)
    ]
    rate = math.log(errors[0] / errors[1]) / math.log(4)
    # The tableau's order: euler 1, midpoint and heun 2, rk4 4. (Midpoint's order-3 luck on the
    # state does not extend to its quadrature of int div v dt.) 0.3 absorbs pre-asymptotics.
    expected = {"euler": 1.0, "midpoint": 2.0, "heun": 2.0, "rk4": 4.0}[solver]
    assert abs(rate - expected) < 0.3, (solver, rate, errors)


def test_zero_field_gives_standard_normal_density_and_bits_per_dim() -> None:
    x1 = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    est = log_likelihood(lambda x, t: torch.zeros_like(x), x1, 3, "euler")
    truth = torch.from_numpy(scipy.stats.norm.logpdf(x1.numpy()).sum(1))
    # Identity flow: only the standard normal log-density, evaluated in float64.
    torch.testing.assert_close(est.log_prob, truth, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.bits_per_dim, -truth / (3 * math.log(2)), rtol=0, atol=1e-12)
    log_prob, std_error = est
    assert log_prob is est.log_prob and std_error is est.std_error


def matrix_log_half(cov: Tensor) -> np.ndarray:
    """M = int_0^1 dv/dx dt for the linear Gaussian flow. dv/dx = Q diag(c'/(2c)) Q^T with
    c = (1-t)^2 + t^2 lambda, whose integral is Q diag(log(lambda)/2) Q^T = logm(cov) / 2."""
    return np.real(scipy.linalg.logm(cov.numpy())) / 2


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_std_error_matches_exact_probe_variance(probe: str) -> None:
    torch.manual_seed(6)
    mu, cov, x1 = gaussian_data(8, 64, seed=7)
    v = gaussian_linear_velocity(mu, cov)
    k = 32
    est = log_likelihood(v, x1, 20, "rk4", "hutchinson", k, torch.Generator().manual_seed(8), probe)
    # Each probe's estimate is log N(x_0) - eps^T M eps with M fixed: its variance is
    # 2 sum_{i != j} M_ij^2 for Rademacher probes and 2 |M|_F^2 for Gaussian ones.
    m = matrix_log_half(cov)
    off = m - np.diag(np.diag(m))
    var = 2 * (off**2).sum() if probe == "rademacher" else 2 * (m**2).sum()
    observed = (est.std_error**2 * k).mean().item()
    # Mean of 64 sample variances with 31 degrees of freedom: relative spread ~ 3-6%
    # (heavier tails for Gaussian probes); 20% keeps false failures negligible.
    assert observed == pytest.approx(var, rel=0.2)


def test_hutchinson_mean_within_three_standard_errors_and_error_shrinks() -> None:
    torch.manual_seed(9)
    mu, cov, x1 = gaussian_data(16, 64, seed=10)
    v = gaussian_linear_velocity(mu, cov)
    # Both estimators on the same 10-step discretisation: only the probes differ.
    exact = log_likelihood(v, x1, 10, "rk4").log_prob
    probes = [8, 32, 128, 512]
    std_errors, rms_errors = [], []
    for k in probes:
        est = log_likelihood(v, x1, 10, "rk4", "hutchinson", k, torch.Generator().manual_seed(k))
        z = (est.log_prob - exact) / est.std_error
        # A calibrated standard error puts ~99.7% of |z| below 3; with 64 samples allow 2 misses
        # (a binomial tail below 1e-2 even for the t-distribution at k = 8).
        assert int((z.abs() > 3).sum()) <= 2, (k, z)
        std_errors.append(est.std_error.mean().item())
        rms_errors.append((est.log_prob - exact).pow(2).mean().sqrt().item())
    log_k = np.log(probes)
    se_slope = np.polyfit(log_k, np.log(std_errors), 1)[0]
    err_slope = np.polyfit(log_k, np.log(rms_errors), 1)[0]
    # std/sqrt(k): slope -1/2. The mean std estimate carries <3% noise per point: +-0.05. The
    # RMS of 64 actual errors is noisier (~9% per point): +-0.15.
    assert abs(se_slope + 0.5) < 0.05, std_errors
    assert abs(err_slope + 0.5) < 0.15, rms_errors


def test_single_probe_has_nan_standard_error() -> None:
    x1 = torch.randn(4, 3)
    est = log_likelihood(lambda x, t: -x, x1, 2, "euler", "hutchinson", 1, torch.Generator())
    assert bool(torch.isnan(est.std_error).all()) and bool(torch.isfinite(est.log_prob).all())


class SmallConvField(nn.Module):
    """A nonlinear, time-conditioned conv field on (batch, 2, 3, 3) images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t_map = t.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv2(torch.tanh(self.conv1(torch.cat([x, t_map], dim=1))))


def naive_divergence(field: SmallConvField, x: Tensor, t: Tensor) -> Tensor:
    """Trace of the Jacobian by one autograd call per output coordinate and sample."""
    divs = []
    for i in range(x.shape[0]):
        x_i = x[i : i + 1].clone().requires_grad_()
        out = field(x_i, t[i : i + 1]).flatten()
        total = torch.zeros((), dtype=x.dtype)
        for j in range(out.numel()):
            (grad,) = torch.autograd.grad(out[j], x_i, retain_graph=True)
            total = total + grad.flatten()[j]
        divs.append(total)
    return torch.stack(divs)


def conv_setup() -> tuple[SmallConvField, Tensor, Tensor]:
    torch.manual_seed(11)
    field = SmallConvField().to(F64)
    x = torch.randn(3, 2, 3, 3, dtype=F64)
    return field, x, torch.tensor([0.1, 0.5, 0.9], dtype=F64)


def test_exact_divergence_on_images_equals_naive_autograd_loop() -> None:
    field, x, t = conv_setup()
    v, div = exact_divergence(field, x, t)
    # Same derivatives, different evaluation order: float64 round-off.
    torch.testing.assert_close(div, naive_divergence(field, x, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(v, field(x, t).detach(), rtol=1e-12, atol=1e-12)


def test_hutchinson_with_basis_probes_is_exact_and_random_probes_converge() -> None:
    field, x, t = conv_setup()
    _, exact = exact_divergence(field, x, t)
    # Probes e_1..e_D: sum_i e_i^T J e_i is the trace exactly (float64 round-off only).
    basis = torch.eye(18, dtype=F64).reshape(18, 1, 2, 3, 3).expand(18, 3, 2, 3, 3)
    _, per_probe = hutchinson_divergence(field, x, t, basis)
    torch.testing.assert_close(per_probe.sum(0), exact, rtol=1e-10, atol=1e-10)
    probes = make_probes(x.shape, 4000, torch.Generator().manual_seed(12), dtype=F64)
    _, per_probe = hutchinson_divergence(field, x, t, probes)
    std_error = per_probe.std(0) / math.sqrt(4000)
    # Unbiased estimator: the mean of 4000 probes lies within 4 of its standard errors (a
    # 6e-5 two-sided chance per row), and those errors are small: with k = 4000 the standard
    # error is sqrt(Var / 4000) ~ 1.6% of the per-probe spread, below 5% of |div| here.
    assert bool(((per_probe.mean(0) - exact).abs() < 4 * std_error).all())
    assert bool((std_error < 0.05 * exact.abs().clamp_min(1.0)).all())


def test_likelihood_step_rows_at_different_times_equal_rows_alone() -> None:
    field, x, _ = conv_setup()
    t = torch.tensor([0.2, 0.6, 1.0], dtype=F64)
    dt = torch.tensor([-0.1, -0.05, -0.2], dtype=F64)

    def div_fn(x_: Tensor, t_: Tensor) -> tuple[Tensor, Tensor]:
        v, div = exact_divergence(field, x_, t_)
        return v, div.unsqueeze(0)

    x_next, delta = likelihood_step(TABLEAUS["rk4"], div_fn, x, t, dt)
    for i in range(3):
        x_i, d_i = likelihood_step(
            TABLEAUS["rk4"], div_fn, x[i : i + 1], t[i : i + 1], float(dt[i])
        )
        # Identical arithmetic per row up to batched-kernel round-off in float64.
        torch.testing.assert_close(x_next[i : i + 1], x_i, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(delta[:, i : i + 1], d_i, rtol=1e-12, atol=1e-12)


def test_make_probes_are_seeded_and_have_identity_second_moment() -> None:
    a = make_probes((2000, 3), 2, torch.Generator().manual_seed(0))
    b = make_probes((2000, 3), 2, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 2000, 3)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    g = make_probes((4000, 3), 1, torch.Generator().manual_seed(1), "gaussian", F64)[0]
    # Second moment of 4000 draws: each entry has standard error <= sqrt(2/4000) ~ 0.022.
    torch.testing.assert_close(g.T @ g / 4000, torch.eye(3, dtype=F64), rtol=0, atol=0.11)


def test_bad_input_raises_naming_argument() -> None:
    def v(x: Tensor, t: Tensor) -> Tensor:
        return x

    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="num_steps"):
        log_likelihood(v, x, 0)
    with pytest.raises(ValueError, match="solver"):
        log_likelihood(v, x, 10, solver="euler_maruyama")
    with pytest.raises(ValueError, match="estimator"):
        log_likelihood(v, x, 10, estimator="skilling")
    with pytest.raises(ValueError, match="num_probes"):
        log_likelihood(v, x, 10, estimator="hutchinson", num_probes=0)
    with pytest.raises(ValueError, match="probe"):
        log_likelihood(v, x, 10, estimator="hutchinson", probe="sphere")
    with pytest.raises(ValueError, match="generator"):
        log_likelihood(v, x, 10, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x1"):
        log_likelihood(v, torch.full((4, 2), float("nan")), 10)
    with pytest.raises(ValueError, match="x1"):
        log_likelihood(v, torch.zeros(4), 10)
    with pytest.raises(ValueError, match="velocity_fn"):
        log_likelihood(None, x, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probes"):
        hutchinson_divergence(v, x, torch.zeros(4), torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="t must"):
        exact_divergence(v, x, torch.zeros(5))
    with pytest.raises(ValueError, match="dim"):
        bits_per_dim(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="shape"):
        make_probes((4, 0), 1, None)
    with pytest.raises(ValueError, match="kind"):
        make_probes((4, 2), 1, None, kind="uniform")


def test_finish_likelihood_reports_exactness() -> None:
    x_0 = torch.zeros(2, 3, dtype=F64)
    integral = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=F64)
    est = finish_likelihood(x_0, integral, exact=False)
    base = -1.5 * math.log(2 * math.pi)
    assert isinstance(est, LikelihoodEstimate)
    # Arithmetic on small exact numbers in float64: 1e-12 is round-off level. Rows: mean of
    # (1, 3) and (2, 6); std/sqrt(2) = |difference| / 2.
    expected = base + torch.tensor([2.0, 4.0], dtype=F64)
    torch.testing.assert_close(est.log_prob, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        est.std_error, torch.tensor([1.0, 2.0], dtype=F64), rtol=0, atol=1e-12
    )
    exact = finish_likelihood(x_0, integral[:1], exact=True)
    assert bool((exact.std_error == 0).all())
