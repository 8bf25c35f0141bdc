"""Fixed-step solvers for dx/dt = v(x, t) and for the matching SDE, with one time per row.

Every ODE solver is an explicit Runge-Kutta method given by its Butcher tableau in `TABLEAUS`;
the per-step functions are that tableau applied by `rk_step`, so the engine (which steps rows
stage by stage) and `sample` share one source of truth. Every step accepts a different t per
row, `t` of shape `(batch,)`, and `dt` a float or `(batch,)`, because the server batches rows
that sit at different times.

Step functions check shapes only (no device synchronisation) because the engine calls them on
every step; the drivers `sample` and `sample_sde` check values once per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flows._checks import (
    check_batch,
    check_choice,
    check_positive_int,
    check_scalar_time,
)
from flows.paths import GaussianPath, convert_unchecked, expand_like

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""`(x_t (batch, *sample_shape), t (batch,)) -> v (batch, *sample_shape)`."""

DiffusionFn = Callable[[Tensor], Tensor]
"""`t (batch,) -> g_t (batch,)`, the diffusion coefficient of the SDE."""


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Stage i evaluates k_i = v(x + dt * sum_j a[i][j] * k_j, t + c[i] * dt) and the step returns
    x + dt * sum_i b[i] * k_i.

    Attributes:
        name: Solver name.
        a: Row i holds the i coefficients a[i][0..i-1] (strictly lower triangular).
        b: Weights of the stages, summing to 1.
        c: Stage times as fractions of dt; c[i] = sum_j a[i][j].
    """

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]

    def __post_init__(self) -> None:
        stages = len(self.b)
        if stages < 1 or len(self.a) != stages or len(self.c) != stages:
            raise ValueError("a, b and c must all have one entry per stage")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"a[{i}] must have {i} entries (explicit method), got {len(row)}")
            if not math.isclose(sum(row), self.c[i], abs_tol=1e-12):
                raise ValueError(f"c[{i}] must equal sum(a[{i}])")
        if not math.isclose(sum(self.b), 1.0, abs_tol=1e-12):
            raise ValueError("b must sum to 1")

    @property
    def num_stages(self) -> int:
        """Network evaluations per step."""
        return len(self.b)


TABLEAUS: dict[str, ButcherTableau] = {
    "euler": ButcherTableau("euler", a=((),), b=(1.0,), c=(0.0,)),
    "midpoint": ButcherTableau("midpoint", a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5)),
    "heun": ButcherTableau("heun", a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0)),
    "rk4": ButcherTableau(
        "rk4",
        a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        b=(1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0),
        c=(0.0, 0.5, 0.5, 1.0),
    ),
}
ODE_SOLVERS: tuple[str, ...] = tuple(TABLEAUS)
SOLVERS: tuple[str, ...] = (*ODE_SOLVERS, "euler_maruyama")


def _check_step_shapes(x_t: Tensor, t: Tensor, dt: float | Tensor) -> None:
    # Metadata only: reading values would synchronise the device on every step.
    if not isinstance(x_t, Tensor) or x_t.dim() < 1:
        raise ValueError("x_t must be a tensor of shape (batch, *sample_shape)")
    batch = x_t.shape[0]
    if not isinstance(t, Tensor) or tuple(t.shape) != (batch,):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"t must be a tensor of shape ({batch},), got {shape}")
    if isinstance(dt, Tensor):
        if tuple(dt.shape) != (batch,):
            raise ValueError(f"dt must be a float or have shape ({batch},), got {tuple(dt.shape)}")
    elif isinstance(dt, bool) or not isinstance(dt, int | float):
        raise ValueError(f"dt must be a float or a tensor, got {type(dt).__name__}")


def combine_stages(
    x_t: Tensor, dt: float | Tensor, weights: Sequence[float], ks: Sequence[Tensor]
) -> Tensor:
    """x_t + dt * sum_i weights[i] * ks[i], skipping zero weights.

    Args:
        x_t: `(batch, *sample_shape)`.
        dt: A float or `(batch,)`.
        weights: One weight per stage result (at most `len(ks)` are read).
        ks: Stage results, each `(batch, *sample_shape)`.

    Returns:
        `(batch, *sample_shape)`, a new tensor (inputs are never modified).
    """
    terms = [(w, k) for w, k in zip(weights, ks, strict=False) if w != 0.0]
    if not terms:
        return x_t.clone()
    if not isinstance(dt, Tensor):
        # Fused x + alpha * k; in-place accumulation on the fresh result saves allocations.
        out = torch.add(x_t, terms[0][1], alpha=terms[0][0] * dt)
        for w, k in terms[1:]:
            out.add_(k, alpha=w * dt)
        return out
    dt_x = expand_like(dt, x_t)
    w0, k0 = terms[0]
    if len(terms) == 1 and w0 == 1.0:
        return torch.addcmul(x_t, dt_x, k0)
    increment = k0.mul(w0)
    for w, k in terms[1:]:
        increment.add_(k, alpha=w)
    return torch.addcmul(x_t, dt_x, increment)


def stage_time(t: Tensor, c_i: float, dt: float | Tensor) -> Tensor:
    """Time t + c_i * dt of a stage, `(batch,)`; returns `t` itself when c_i is 0."""
    if c_i == 0.0:
        return t
    return t + c_i * dt


def rk_step(
    tableau: ButcherTableau, velocity_fn: VelocityFn, x_t: Tensor, t: Tensor, dt: float | Tensor
) -> Tensor:
    """One explicit Runge-Kutta step of dx/dt = v(x, t).

    Args:
        tableau: The method.
        velocity_fn: `(x (batch, *sample_shape), t (batch,)) -> v`.
        x_t: State, `(batch, *sample_shape)`.
        t: Time of each row, `(batch,)`.
        dt: Step, a float or one per row `(batch,)` (negative integrates backwards).

    Returns:
        The state at t + dt, `(batch, *sample_shape)`.
    """
    if not isinstance(tableau, ButcherTableau):
        raise ValueError(f"tableau must be a ButcherTableau, got {type(tableau).__name__}")
    _check_step_shapes(x_t, t, dt)
    return _rk_step(tableau, velocity_fn, x_t, t, dt)


def _rk_step(
    tableau: ButcherTableau, velocity_fn: VelocityFn, x_t: Tensor, t: Tensor, dt: float | Tensor
) -> Tensor:
    # The unchecked step: drivers validate once per call, not once per step.
    ks: list[Tensor] = []
    for i in range(tableau.num_stages):
        x_i = x_t if i == 0 else combine_stages(x_t, dt, tableau.a[i], ks)
        ks.append(velocity_fn(x_i, stage_time(t, tableau.c[i], dt)))
    return combine_stages(x_t, dt, tableau.b, ks)


def euler_step(velocity_fn: VelocityFn, x_t: Tensor, t: Tensor, dt: float | Tensor) -> Tensor:
    """Euler step x + dt * v(x, t); shapes as in `rk_step`."""
    return rk_step(TABLEAUS["euler"], velocity_fn, x_t, t, dt)


def midpoint_step(velocity_fn: VelocityFn, x_t: Tensor, t: Tensor, dt: float | Tensor) -> Tensor:
    """Explicit midpoint step (second order); shapes as in `rk_step`."""
    return rk_step(TABLEAUS["midpoint"], velocity_fn, x_t, t, dt)


def heun_step(velocity_fn: VelocityFn, x_t: Tensor, t: Tensor, dt: float | Tensor) -> Tensor:
    """Heun's step, the trapezoidal predictor-corrector (second order); shapes as in `rk_step`."""
    return rk_step(TABLEAUS["heun"], velocity_fn, x_t, t, dt)


def rk4_step(velocity_fn: VelocityFn, x_t: Tensor, t: Tensor, dt: float | Tensor) -> Tensor:
    """Classical fourth-order Runge-Kutta step; shapes as in `rk_step`."""
    return rk_step(TABLEAUS["rk4"], velocity_fn, x_t, t, dt)


def euler_maruyama_step(
    drift_fn: VelocityFn,
    x_t: Tensor,
    t: Tensor,
    dt: float | Tensor,
    g_t: float | Tensor,
    noise: Tensor,
) -> Tensor:
    """One Euler-Maruyama step of dx = drift(x, t) dt + g_t dW.

    The drift that keeps the marginals of the flow is v + g_t^2 / 2 * score; the caller builds
    it (see `gaussian_sde_drift`). With g_t = 0 this is the Euler ODE step.

    Args:
        drift_fn: `(x (batch, *sample_shape), t (batch,)) -> drift`.
        x_t: State, `(batch, *sample_shape)`.
        t: Time of each row, `(batch,)`.
        dt: Step >= 0, a float or `(batch,)`.
        g_t: Diffusion coefficient, a float or `(batch,)`.
        noise: Standard normal draws, `(batch, *sample_shape)`.

    Returns:
        The state at t + dt, `(batch, *sample_shape)`.
    """
    _check_step_shapes(x_t, t, dt)
    if not isinstance(noise, Tensor) or noise.shape != x_t.shape:
        raise ValueError(f"noise must be a tensor of shape {tuple(x_t.shape)}")
    if not isinstance(dt, Tensor) and dt < 0:
        raise ValueError(f"dt must be >= 0 for the SDE, got {dt}")
    if isinstance(g_t, Tensor):
        if tuple(g_t.shape) != (x_t.shape[0],):
            raise ValueError(f"g_t must be a float or have shape ({x_t.shape[0]},)")
        g_x: float | Tensor = expand_like(g_t, x_t)
    else:
        g_x = float(g_t)
    sqrt_dt = torch.sqrt(expand_like(dt, x_t)) if isinstance(dt, Tensor) else math.sqrt(dt)
    out = combine_stages(x_t, dt, (1.0,), (drift_fn(x_t, t),))
    return out.add_(noise * (g_x * sqrt_dt))


def network_evaluations(solver: str, num_steps: int) -> int:
    """Network evaluations one row needs: stages per step times steps.

    Euler-Maruyama counts one per step: its velocity and score come from one network output
    (`gaussian_sde_drift`).
    """
    check_choice("solver", solver, SOLVERS)
    check_positive_int("num_steps", num_steps)
    per_step = 1 if solver == "euler_maruyama" else TABLEAUS[solver].num_stages
    return per_step * num_steps


def _check_driver(velocity_fn: object, x0: object, num_steps: object) -> Tensor:
    if not callable(velocity_fn):
        raise ValueError("velocity_fn must be callable (x, t) -> v")
    check_positive_int("num_steps", num_steps)
    return check_batch("x0", x0)


def sample(
    velocity_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    solver: str = "heun",
    t0: float = 0.0,
    t1: float = 1.0,
) -> Tensor:
    """Integrate dx/dt = v(x, t) from t0 to t1 with `num_steps` equal steps, without gradients.

    Args:
        velocity_fn: `(x (batch, *sample_shape), t (batch,)) -> v`; t has x's dtype and device.
        x0: Start state, `(batch, *sample_shape)` (noise when t0 = 0).
        num_steps: Number of steps, >= 1.
        solver: One of `ODE_SOLVERS`.
        t0: Start time in [0, 1].
        t1: End time in [0, 1] (t1 < t0 integrates backwards).

    Returns:
        The state at t1, `(batch, *sample_shape)`.
    """
    x = _check_driver(velocity_fn, x0, num_steps)
    tableau = TABLEAUS[check_choice("solver", solver, ODE_SOLVERS)]
    t0, t1 = check_scalar_time("t0", t0), check_scalar_time("t1", t1)
    dt = (t1 - t0) / num_steps
    with torch.no_grad():
        for i in range(num_steps):
            t = torch.full((x.shape[0],), t0 + i * dt, dtype=x.dtype, device=x.device)
            x = _rk_step(tableau, velocity_fn, x, t, dt)
    return x


def sample_sde(
    velocity_fn: VelocityFn,
    score_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    diffusion_fn: DiffusionFn,
    generator: torch.Generator | None,
    t0: float = 0.0,
    t1: float = 1.0,
) -> Tensor:
    """Euler-Maruyama for dx = (v + g^2/2 * score) dt + g dW, which keeps the flow's marginals.

    Args:
        velocity_fn: `(x, t) -> v`, shapes as in `sample`.
        score_fn: `(x, t) -> grad log p_t(x)`.
        x0: Start state, `(batch, *sample_shape)`.
        num_steps: Number of steps, >= 1.
        diffusion_fn: `t (batch,) -> g_t (batch,)`; g = 0 gives the Euler ODE result.
        generator: Source of the Brownian increments (None: torch's global generator).
        t0: Start time in [0, 1].
        t1: End time in [0, 1], > t0.

    Returns:
        The state at t1, `(batch, *sample_shape)`.
    """
    x = _check_driver(velocity_fn, x0, num_steps)
    if not callable(score_fn) or not callable(diffusion_fn):
        raise ValueError("score_fn and diffusion_fn must be callable")
    t0, t1 = check_scalar_time("t0", t0), check_scalar_time("t1", t1)
    if t1 <= t0:
        raise ValueError(f"t1 must be > t0 for the SDE, got t0={t0}, t1={t1}")

    def drift_fn(x_t: Tensor, t: Tensor) -> Tensor:
        g_t = expand_like(diffusion_fn(t), x_t)
        return velocity_fn(x_t, t) + 0.5 * g_t * g_t * score_fn(x_t, t)

    return _euler_maruyama_loop(drift_fn, diffusion_fn, x, num_steps, generator, t0, t1)


def _euler_maruyama_loop(
    drift_fn: VelocityFn,
    diffusion_fn: DiffusionFn,
    x: Tensor,
    num_steps: int,
    generator: torch.Generator | None,
    t0: float,
    t1: float,
) -> Tensor:
    dt = (t1 - t0) / num_steps
    with torch.no_grad():
        for i in range(num_steps):
            t = torch.full((x.shape[0],), t0 + i * dt, dtype=x.dtype, device=x.device)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = euler_maruyama_step(drift_fn, x, t, dt, diffusion_fn(t), noise)
    return x


def gaussian_diffusion(path: GaussianPath, scale: float = 1.0) -> DiffusionFn:
    """The default diffusion for Euler-Maruyama on a Gaussian path: g_t^2 = 2 * scale * sigma_t.

    With score = -x0_hat / sigma_t the score term g_t^2 / 2 * score = -scale * x0_hat stays
    finite as sigma_t -> 0 (t -> 1 on the linear path), and the injected noise g_t * sqrt(dt)
    fades out at the data end, so the last steps do not leave visible noise.

    Args:
        path: The model's path.
        scale: Strength >= 0 (0 gives back the ODE).

    Returns:
        `t (batch,) -> g_t (batch,)`.
    """
    _check_scale(scale)

    def diffusion_fn(t: Tensor) -> Tensor:
        return torch.sqrt(2.0 * scale * path.schedule(t).sigma_t)

    return diffusion_fn


def gaussian_sde_drift(
    velocity: Tensor, x_t: Tensor, t: Tensor, path: GaussianPath, scale: float = 1.0
) -> Tensor:
    """Drift v + g_t^2/2 * score for `gaussian_diffusion(path, scale)`, from one velocity output.

    Equals v - scale * x0_hat, with x0_hat the noise prediction converted from the velocity, so
    one network evaluation per step suffices.

    Args:
        velocity: v at (x_t, t), `(batch, *sample_shape)`.
        x_t: `(batch, *sample_shape)`.
        t: `(batch,)`.
        path: The model's path.
        scale: As in `gaussian_diffusion`.

    Returns:
        The drift, `(batch, *sample_shape)`.
    """
    _check_step_shapes(x_t, t, 0.0)
    x0_hat = convert_unchecked(velocity, x_t, path.schedule(t), "velocity", "noise")
    return velocity - scale * x0_hat


def sample_gaussian_sde(
    velocity_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    path: GaussianPath,
    generator: torch.Generator | None,
    scale: float = 1.0,
    t0: float = 0.0,
    t1: float = 1.0,
) -> Tensor:
    """Euler-Maruyama with the default diffusion of `gaussian_diffusion`, one evaluation a step.

    Args:
        velocity_fn: `(x, t) -> v`, shapes as in `sample`.
        x0: Start state, `(batch, *sample_shape)`.
        num_steps: Number of steps, >= 1.
        path: The Gaussian path the velocity belongs to (its score is derived exactly).
        generator: Source of the Brownian increments.
        scale: Diffusion strength >= 0.
        t0: Start time in [0, 1].
        t1: End time in [0, 1], > t0.

    Returns:
        The state at t1, `(batch, *sample_shape)`.
    """
    x = _check_driver(velocity_fn, x0, num_steps)
    if not isinstance(path, GaussianPath):
        raise ValueError(f"path must be a GaussianPath, got {type(path).__name__}")
    _check_scale(scale)
    t0, t1 = check_scalar_time("t0", t0), check_scalar_time("t1", t1)
    if t1 <= t0:
        raise ValueError(f"t1 must be > t0 for the SDE, got t0={t0}, t1={t1}")

    def drift_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return gaussian_sde_drift(velocity_fn(x_t, t), x_t, t, path, scale)

    diffusion_fn = gaussian_diffusion(path, scale)
    return _euler_maruyama_loop(drift_fn, diffusion_fn, x, num_steps, generator, t0, t1)


def _check_scale(scale: object) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise ValueError(f"scale must be a float >= 0, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite float >= 0, got {scale}")
