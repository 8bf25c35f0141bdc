"""Solvers against the exact transport map of the analytic Gaussian flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor

from flows.paths import GaussianPath, LinearPath, VPPath
from flows.reference import (
    gaussian_linear_log_prob,
    gaussian_linear_velocity,
    gaussian_path_velocity,
)
from flows.solvers import (
    ODE_SOLVERS,
    SOLVERS,
    TABLEAUS,
    ButcherTableau,
    euler_maruyama_step,
    euler_step,
    gaussian_diffusion,
    heun_step,
    midpoint_step,
    network_evaluations,
    rk4_step,
    rk_step,
    sample,
    sample_gaussian_sde,
    sample_sde,
)

torch.set_num_threads(1)
F64 = torch.float64
EXPECTED_ORDER = {"euler": 1.0, "midpoint": 2.0, "heun": 2.0, "rk4": 4.0}


def gaussian_problem(d: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=F64)
    a = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    return mu, a @ a.T + 0.5 * torch.eye(d, dtype=F64)


def exact_flow_map(
    x_0: Tensor, path: GaussianPath, mu: Tensor, cov: Tensor, t0: float = 0.0, t1: float = 1.0
) -> Tensor:
    """The marginal flow of a Gaussian path is affine: x_t1 = m_1 + (C_1 C_0^{-1})^{1/2} (x_t0 -
    m_0), with m = alpha mu and C = alpha^2 cov + sigma^2 I (C_0, C_1 commute). The roots are
    scipy's sqrtm on dense matrices, independent of the solvers and of flows.reference."""
    times = torch.tensor([t0, t1], dtype=F64)
    c = path.schedule(times)
    eye = torch.eye(mu.shape[0], dtype=F64)
    cov_0, cov_1 = (c.alpha_t[i] ** 2 * cov + c.sigma_t[i] ** 2 * eye for i in (0, 1))
    root_0 = np.real(scipy.linalg.sqrtm(cov_0.numpy()))
    root_1 = np.real(scipy.linalg.sqrtm(cov_1.numpy()))
    gain = torch.from_numpy(root_1 @ np.linalg.inv(root_0))
    return c.alpha_t[1] * mu + (x_0 - c.alpha_t[0] * mu) @ gain.T


def exact_transport(x_0: Tensor, mu: Tensor, cov: Tensor) -> Tensor:
    """Linear path from N(0, I) to N(mu, cov): x_1 = mu + cov^{1/2} x_0."""
    return exact_flow_map(x_0, LinearPath(), mu, cov)


@pytest.mark.parametrize("solver", ODE_SOLVERS)
@pytest.mark.parametrize("path", [LinearPath(), VPPath()], ids=["linear", "vp"])
def test_convergence_order_on_gaussian_flow(path: GaussianPath, solver: str) -> None:
    mu, cov = gaussian_problem()
    velocity_fn = gaussian_path_velocity(path, mu, cov)
    x_0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x_1 = exact_flow_map(x_0, path, mu, cov)
    # From 32 steps both flows (VP: beta up to 20 near t = 0) are in the asymptotic range.
    steps = [32, 64, 128, 256]
    errors = [(sample(velocity_fn, x_0, n, solver) - x_1).abs().max().item() for n in steps]
    slope = np.polyfit(np.log([1.0 / n for n in steps]), np.log(errors), 1)[0]
    expected = EXPECTED_ORDER[solver]
    if solver == "midpoint" and isinstance(path, LinearPath):
        # On the linear path every eigen-coordinate solves y' = g y with y = sqrt(c), c quadratic
        # in t, so y''' = -3 g (g' + g^2) y and midpoint's h^3 local error coefficient
        # g^3/6 + g''/24 + g g'/4 vanishes identically: it converges at order 3 there. The VP
        # case shows its generic order 2.
        expected = 3.0
    # Required by the issue: the fitted order within 0.3 of the theoretical one. float64 keeps
    # rk4's smallest error (~1e-10) far above round-off (~1e-15).
    assert abs(slope - expected) < 0.3, (solver, slope, errors)


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_step_functions_match_hand_written_formulas(solver: str) -> None:
    mu, cov = gaussian_problem(3, seed=2)
    v = gaussian_linear_velocity(mu, cov)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.rand(5, generator=g, dtype=F64) * 0.5
    dt = 0.1
    dtc = torch.full((5, 1), dt, dtype=F64)
    if solver == "euler":
        expected = x + dt * v(x, t)
    elif solver == "midpoint":
        expected = x + dt * v(x + 0.5 * dt * v(x, t), t + 0.5 * dt)
    elif solver == "heun":
        k1 = v(x, t)
        expected = x + 0.5 * dt * (k1 + v(x + dt * k1, t + dt))
    else:
        k1 = v(x, t)
        k2 = v(x + 0.5 * dtc * k1, t + 0.5 * dt)
        k3 = v(x + 0.5 * dtc * k2, t + 0.5 * dt)
        k4 = v(x + dtc * k3, t + dt)
        expected = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    step = {"euler": euler_step, "midpoint": midpoint_step, "heun": heun_step, "rk4": rk4_step}
    # Same arithmetic in a different order: float64 round-off, ~1e-15.
    torch.testing.assert_close(step[solver](v, x, t, dt), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rk_step(TABLEAUS[solver], v, x, t, dt), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_rows_at_different_times_equal_rows_stepped_alone(solver: str) -> None:
    mu, cov = gaussian_problem(2, seed=4)
    v = gaussian_linear_velocity(mu, cov)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.1, 0.35, 0.5, 0.8, 0.95], dtype=F64)
    dt = torch.tensor([0.1, 0.05, 0.2, 0.01, 0.2, 0.05], dtype=F64)
    batched = rk_step(TABLEAUS[solver], v, x, t, dt)
    for i in range(6):
        alone = rk_step(TABLEAUS[solver], v, x[i : i + 1], t[i : i + 1], float(dt[i]))
        # Each row's arithmetic is identical; only BLAS blocking may differ: 1e-13 in float64.
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-13, atol=1e-13)


def test_backward_integration_inverts_forward() -> None:
    mu, cov = gaussian_problem(2, seed=6)
    v = gaussian_linear_velocity(mu, cov)
    x_0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    x_1 = sample(v, x_0, 50, "rk4")
    back = sample(v, x_1, 50, "rk4", t0=1.0, t1=0.0)
    # rk4 with 50 steps has global error ~1e-8 here (see the convergence test); 1e-6 bounds it.
    torch.testing.assert_close(back, x_0, rtol=0, atol=1e-6)


def test_euler_maruyama_with_zero_diffusion_is_euler() -> None:
    mu, cov = gaussian_problem(2, seed=8)
    v = gaussian_linear_velocity(mu, cov)
    x_0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(9), dtype=F64)

    def zero(t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def score(x: Tensor, t: Tensor) -> Tensor:
        return torch.full_like(x, 7.0)  # any finite score: g = 0 must switch it off

    out = sample_sde(v, score, x_0, 20, zero, torch.Generator().manual_seed(0))
    # Identical operations plus exact zeros: bit-for-bit equality is expected.
    torch.testing.assert_close(out, sample(v, x_0, 20, "euler"), rtol=0, atol=0)
    out = sample_gaussian_sde(v, x_0, 20, LinearPath(), torch.Generator(), scale=0.0)
    torch.testing.assert_close(out, sample(v, x_0, 20, "euler"), rtol=0, atol=0)


def _assert_gaussian_moments(x: Tensor, mu: Tensor, cov: Tensor, n: int) -> None:
    # Monte Carlo: the standard error of a mean is sqrt(cov_ii / n) and of a covariance entry
    # sqrt((cov_ii cov_jj + cov_ij^2) / n); 5 standard errors plus 0.02 for Euler-Maruyama's
    # O(dt) weak bias (200 steps) gives a false failure rate well below 1e-5.
    var = torch.diagonal(cov)
    mean_tol = 5 * torch.sqrt(var / n) + 0.02
    assert bool(((x.mean(0) - mu).abs() <= mean_tol).all()), (x.mean(0), mu)
    cov_tol = 5 * torch.sqrt((var[:, None] * var[None, :] + cov**2) / n) + 0.02
    assert bool(((torch.cov(x.T) - cov).abs() <= cov_tol).all()), (torch.cov(x.T), cov)


def test_euler_maruyama_reaches_gaussian_target_with_autograd_score() -> None:
    mu, cov = gaussian_problem(2, seed=10)
    v = gaussian_linear_velocity(mu, cov)

    def score(x: Tensor, t: Tensor) -> Tensor:
        # Score from autograd of the closed-form log-density, independent of flows.paths.
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(gaussian_linear_log_prob(x, t, mu, cov).sum(), x)
        return grad

    n = 20_000
    g = torch.Generator().manual_seed(11)
    x_0 = torch.randn(n, 2, generator=g, dtype=F64)
    diffusion = gaussian_diffusion(LinearPath(), scale=1.0)
    x_1 = sample_sde(v, score, x_0, 200, diffusion, g)
    _assert_gaussian_moments(x_1, mu, cov, n)
    # The noise must matter: the SDE's endpoints differ from the ODE's (about g * sqrt(dt)).
    assert (x_1 - sample(v, x_0, 200, "euler")).abs().mean() > 1e-2


def test_default_gaussian_sde_reaches_target() -> None:
    mu, cov = gaussian_problem(2, seed=12)
    n = 20_000
    g = torch.Generator().manual_seed(13)
    x_0 = torch.randn(n, 2, generator=g, dtype=F64)
    v = gaussian_linear_velocity(mu, cov)
    x_1 = sample_gaussian_sde(v, x_0, 200, LinearPath(), g, scale=2.0)
    _assert_gaussian_moments(x_1, mu, cov, n)


def test_network_evaluations() -> None:
    assert [network_evaluations(s, 10) for s in SOLVERS] == [10, 20, 20, 40, 10]
    with pytest.raises(ValueError, match="solver"):
        network_evaluations("dopri5", 10)
    with pytest.raises(ValueError, match="num_steps"):
        network_evaluations("euler", 0)


def test_tableaus_satisfy_their_order_conditions() -> None:
    # Classical conditions: sum b = 1 (order 1), sum b c = 1/2 (order 2), and for order 4
    # also sum b c^2 = 1/3, sum b c^3 = 1/4, sum b_i a_ij c_j = 1/6. Exact rationals: 1e-15.
    for name, tab in TABLEAUS.items():
        b, c = np.array(tab.b), np.array(tab.c)
        a = np.zeros((len(b), len(b)))
        for i, row in enumerate(tab.a):
            a[i, : len(row)] = row
        assert b.sum() == pytest.approx(1.0, abs=1e-15)
        if EXPECTED_ORDER[name] >= 2:
            assert b @ c == pytest.approx(0.5, abs=1e-15)
        if EXPECTED_ORDER[name] >= 4:
            assert b @ c**2 == pytest.approx(1 / 3, abs=1e-15)
            assert b @ c**3 == pytest.approx(1 / 4, abs=1e-15)
            assert b @ (a @ c) == pytest.approx(1 / 6, abs=1e-15)


def test_butcher_tableau_rejects_inconsistent_coefficients() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        ButcherTableau("bad", a=((),), b=(0.5,), c=(0.0,))
    with pytest.raises(ValueError, match="c\\[1\\]"):
        ButcherTableau("bad", a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 0.5))
    with pytest.raises(ValueError, match="explicit"):
        ButcherTableau("bad", a=((1.0,),), b=(1.0,), c=(1.0,))


def test_sample_rejects_bad_input() -> None:
    def v(x: Tensor, t: Tensor) -> Tensor:
        return x

    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="num_steps"):
        sample(v, x, 0)
    with pytest.raises(ValueError, match="solver"):
        sample(v, x, 10, "euler_maruyama")
    with pytest.raises(ValueError, match="x0"):
        sample(v, torch.full((4, 2), float("inf")), 10)
    with pytest.raises(ValueError, match="x0"):
        sample(v, torch.zeros(4, 2, dtype=torch.int64), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t1"):
        sample(v, x, 10, t1=1.5)
    with pytest.raises(ValueError, match="velocity_fn"):
        sample(None, x, 10)  # type: ignore[arg-type]


def test_steps_reject_bad_shapes() -> None:
    def v(x: Tensor, t: Tensor) -> Tensor:
        return x

    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(4,\)"):
        euler_step(v, x, torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="dt"):
        heun_step(v, x, torch.zeros(4), torch.zeros(2))
    with pytest.raises(ValueError, match="tableau"):
        rk_step("rk4", v, x, torch.zeros(4), 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise"):
        euler_maruyama_step(v, x, torch.zeros(4), 0.1, 1.0, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="dt"):
        euler_maruyama_step(v, x, torch.zeros(4), -0.1, 1.0, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="g_t"):
        euler_maruyama_step(v, x, torch.zeros(4), 0.1, torch.ones(3), torch.zeros(4, 2))


def test_sde_drivers_reject_bad_input() -> None:
    def v(x: Tensor, t: Tensor) -> Tensor:
        return x

    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="t1 must be > t0"):
        sample_sde(v, v, x, 10, torch.ones_like, None, t0=0.5, t1=0.5)
    with pytest.raises(ValueError, match="score_fn"):
        sample_sde(v, None, x, 10, torch.ones_like, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        sample_gaussian_sde(v, x, 10, LinearPath(), None, scale=-1.0)
    with pytest.raises(ValueError, match="path"):
        sample_gaussian_sde(v, x, 10, "vp", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        gaussian_diffusion(LinearPath(), scale=float("nan"))
