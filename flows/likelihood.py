"""Log-likelihoods of a flow through the instantaneous change of variables.

The augmented ODE d/dt (x, l) = (v(x, t), div v(x, t)) is integrated backwards from the data
x_1 at t = 1 to x_0 at t = 0 with the same Butcher tableau as sampling, and
log p_1(x_1) = log N(x_0; 0, I) - int_0^1 div v(x_t, t) dt (the density falls where the flow
spreads out). The divergence is exact (Jacobian trace by torch.func, any sample shape) or
Hutchinson's estimate eps^T (dv/dx) eps with k probes drawn once and held fixed along the
trajectory, so each probe gives one unbiased estimate of log p and their spread gives a standard
error.

The per-stage pieces (`exact_divergence`, `hutchinson_divergence`, `make_probes`,
`likelihood_step`, `finish_likelihood`) are public so that the server engine can batch likelihood
rows itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from flows._checks import check_batch, check_choice, check_positive_int
from flows.solvers import (
    ODE_SOLVERS,
    TABLEAUS,
    ButcherTableau,
    VelocityFn,
    combine_stages,
    stage_time,
)

ESTIMATORS: tuple[str, ...] = ("exact", "hutchinson")
PROBE_KINDS: tuple[str, ...] = ("rademacher", "gaussian")

DivergenceFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""`(x (batch, *sample_shape), t (batch,)) -> (v, div (num_estimates, batch))`."""


@dataclass(frozen=True)
class LikelihoodEstimate:
    """Per-sample log-likelihood under the flow, with N(0, I) at t = 0.

    Attributes:
        log_prob: log p_1(x_1) in nats, `(batch,)` (Hutchinson: the mean over probes).
        std_error: Standard error of log_prob, `(batch,)`: the std over probes / sqrt(k);
            0 for the exact estimator and nan for Hutchinson with one probe (no spread to see).
        bits_per_dim: -log_prob / (D ln 2), `(batch,)`, D the number of values per sample.
    """

    log_prob: Tensor
    std_error: Tensor
    bits_per_dim: Tensor

    def __iter__(self) -> Iterator[Tensor]:
        """Yield (log_prob, std_error), so `log_prob, std_error = log_likelihood(...)` works."""
        yield self.log_prob
        yield self.std_error


def bits_per_dim(log_prob: Tensor, dim: int) -> Tensor:
    """Convert nats per sample to bits per dimension: -log_prob / (dim * ln 2).

    Args:
        log_prob: Log-likelihoods in nats, any shape.
        dim: Values per sample (prod of sample_shape), >= 1.

    Returns:
        Bits per dimension, the shape of `log_prob`.
    """
    check_positive_int("dim", dim)
    if not isinstance(log_prob, Tensor):
        raise ValueError(f"log_prob must be a tensor, got {type(log_prob).__name__}")
    return -log_prob / (dim * math.log(2.0))


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) per row of `(batch, *sample_shape)`, returned as `(batch,)`."""
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * (flat.shape[1] * math.log(2.0 * math.pi) + (flat * flat).sum(1))


def exact_divergence(velocity_fn: VelocityFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Velocity and the trace of its Jacobian per sample, for any sample shape.

    The Jacobian of one sample, `(*sample_shape, *sample_shape)`, comes from torch.func.jacrev,
    vectorised over the batch with vmap; it is flattened to `(D, D)` and traced. The velocity
    function is called on single rows `(1, *sample_shape)` under vmap, so it must treat rows
    independently (true of per-sample networks; not of batch norm in training mode). Memory
    grows as batch * D^2.

    Args:
        velocity_fn: `(x, t) -> v`.
        x: `(batch, *sample_shape)`.
        t: `(batch,)`.

    Returns:
        v `(batch, *sample_shape)` and div `(batch,)`.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape (batch, *sample_shape)")
    if not isinstance(t, Tensor) or tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"t must be a tensor of shape ({x.shape[0]},)")
    dim = x[0].numel()

    def one_row(x_i: Tensor, t_i: Tensor) -> tuple[Tensor, Tensor]:
        v_i = velocity_fn(x_i.unsqueeze(0), t_i.unsqueeze(0)).squeeze(0)
        return v_i, v_i

    jacobian, v = torch.func.vmap(torch.func.jacrev(one_row, has_aux=True))(x, t)
    div = jacobian.reshape(x.shape[0], dim, dim).diagonal(dim1=1, dim2=2).sum(-1)
    return v.detach(), div.detach()


def hutchinson_divergence(
    velocity_fn: VelocityFn, x: Tensor, t: Tensor, probes: Tensor
) -> tuple[Tensor, Tensor]:
    """Velocity and Hutchinson's divergence estimates eps^T (dv/dx) eps, one per probe.

    One forward pass and one vector-Jacobian product per probe (vmapped). Rows must not
    interact in `velocity_fn`, because the product runs over the whole batch at once.

    Args:
        velocity_fn: `(x, t) -> v`.
        x: `(batch, *sample_shape)`.
        t: `(batch,)`.
        probes: `(num_probes, batch, *sample_shape)` with E[eps eps^T] = I (`make_probes`).

    Returns:
        v `(batch, *sample_shape)` and div_per_probe `(num_probes, batch)`.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape (batch, *sample_shape)")
    if not isinstance(t, Tensor) or tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"t must be a tensor of shape ({x.shape[0]},)")
    if not isinstance(probes, Tensor) or probes.dim() != x.dim() + 1 or probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape (num_probes, *{tuple(x.shape)})")

    def field(x_: Tensor) -> Tensor:
        return velocity_fn(x_, t)

    # vjp's stub also allows a third (aux) output, so index rather than unpack.
    primal_and_vjp = torch.func.vjp(field, x)
    v, vjp_fn = primal_and_vjp[0], primal_and_vjp[1]
    (eps_jacobian,) = torch.func.vmap(vjp_fn)(probes)  # (num_probes, batch, *sample_shape)
    div = (eps_jacobian * probes).flatten(2).sum(-1)
    return v.detach(), div.detach()


def make_probes(
    shape: tuple[int, ...] | torch.Size,
    num_probes: int,
    generator: torch.Generator | None,
    kind: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw Hutchinson probes with E[eps eps^T] = I.

    Args:
        shape: The batch shape `(batch, *sample_shape)`.
        num_probes: k >= 1.
        generator: Seeded source of randomness (None: torch's global generator).
        kind: "rademacher" (+-1, the lower-variance choice) or "gaussian".
        dtype: Floating dtype of the probes.
        device: Device of the probes (None: the generator's device, else CPU).

    Returns:
        `(num_probes, *shape)`.
    """
    check_positive_int("num_probes", num_probes)
    check_choice("kind", kind, PROBE_KINDS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape) or not shape:
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    full_shape = (num_probes, *shape)
    if kind == "gaussian":
        return torch.randn(full_shape, generator=generator, dtype=dtype, device=device)
    bits = torch.randint(0, 2, full_shape, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def likelihood_step(
    tableau: ButcherTableau,
    divergence_fn: DivergenceFn,
    x_t: Tensor,
    t: Tensor,
    dt: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """One Runge-Kutta step of the augmented ODE d/dt (x, l) = (v, div v).

    Args:
        tableau: The method (the same tableaus as sampling).
        divergence_fn: `(x, t) -> (v, div (num_estimates, batch))`, e.g. a closure over
            `exact_divergence` (one estimate) or `hutchinson_divergence` (one per probe).
        x_t: State, `(batch, *sample_shape)`.
        t: Time of each row, `(batch,)`.
        dt: Step, a float or `(batch,)`; negative from data towards noise.

    Returns:
        x at t + dt `(batch, *sample_shape)` and the increment of int div v dt over the step,
        `(num_estimates, batch)`.
    """
    ks: list[Tensor] = []
    divs: list[Tensor] = []
    for i in range(tableau.num_stages):
        x_i = x_t if i == 0 else combine_stages(x_t, dt, tableau.a[i], ks)
        k_i, div_i = divergence_fn(x_i, stage_time(t, tableau.c[i], dt))
        ks.append(k_i)
        divs.append(div_i)
    terms = [w * d for w, d in zip(tableau.b, divs, strict=True) if w != 0.0]
    weighted = terms[0]
    for term in terms[1:]:
        weighted = weighted + term
    return combine_stages(x_t, dt, tableau.b, ks), weighted * dt


def finish_likelihood(x_0: Tensor, divergence_integral: Tensor, exact: bool) -> LikelihoodEstimate:
    """Turn the state at t = 0 and int_1^0 div v dt into the estimate.

    Args:
        x_0: The data mapped to t = 0, `(batch, *sample_shape)`.
        divergence_integral: int_1^0 div v dt = -int_0^1 div v dt per estimate,
            `(num_estimates, batch)`; one row for the exact estimator, k rows for k probes.
        exact: Whether the rows are exact divergences (std_error 0) or probe estimates.

    Returns:
        The estimate; with one probe std_error is nan (one estimate shows no spread).
    """
    per_estimate = standard_normal_log_prob(x_0) + divergence_integral  # (k, batch)
    k = per_estimate.shape[0]
    log_prob = per_estimate.mean(0)
    if exact:
        std_error = torch.zeros_like(log_prob)
    elif k > 1:
        std_error = per_estimate.std(0, correction=1) / math.sqrt(k)
    else:
        std_error = torch.full_like(log_prob, math.nan)
    return LikelihoodEstimate(log_prob, std_error, bits_per_dim(log_prob, x_0[0].numel()))


def log_likelihood(
    velocity_fn: VelocityFn,
    x1: Tensor,
    num_steps: int,
    solver: str = "rk4",
    estimator: str = "exact",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    probe: str = "rademacher",
) -> LikelihoodEstimate:
    """log p_1(x_1) under the flow of `velocity_fn` with p_0 = N(0, I), integrating t: 1 -> 0.

    Args:
        velocity_fn: `(x (batch, *sample_shape), t (batch,)) -> v`, differentiable in x by
            torch.func (rows must not interact).
        x1: Data, `(batch, *sample_shape)`.
        num_steps: Equal steps from t = 1 to t = 0, >= 1.
        solver: One of `flows.solvers.ODE_SOLVERS`.
        estimator: "exact" (Jacobian trace; cost grows with D) or "hutchinson".
        num_probes: Hutchinson probes k >= 1 (ignored by "exact"); with k = 1 the standard
            error is nan, since one probe shows no spread.
        generator: Seeded source of the probes (None: torch's global generator).
        probe: "rademacher" or "gaussian".

    Returns:
        `LikelihoodEstimate` with log_prob (nats), std_error and bits_per_dim, each `(batch,)`.
        Iterating it yields (log_prob, std_error).
    """
    if not callable(velocity_fn):
        raise ValueError("velocity_fn must be callable (x, t) -> v")
    x = check_batch("x1", x1)
    if x.dim() < 2:
        raise ValueError(f"x1 must have shape (batch, *sample_shape), got {tuple(x.shape)}")
    check_positive_int("num_steps", num_steps)
    tableau = TABLEAUS[check_choice("solver", solver, ODE_SOLVERS)]
    check_choice("estimator", estimator, ESTIMATORS)
    check_positive_int("num_probes", num_probes)
    check_choice("probe", probe, PROBE_KINDS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")

    divergence_fn: DivergenceFn
    if estimator == "exact":

        def divergence_fn(x_: Tensor, t_: Tensor) -> tuple[Tensor, Tensor]:
            v, div = exact_divergence(velocity_fn, x_, t_)
            return v, div.unsqueeze(0)

    else:
        probes = make_probes(x.shape, num_probes, generator, probe, x.dtype, x.device)

        def divergence_fn(x_: Tensor, t_: Tensor) -> tuple[Tensor, Tensor]:
            return hutchinson_divergence(velocity_fn, x_, t_, probes)

    dt = -1.0 / num_steps
    num_estimates = 1 if estimator == "exact" else num_probes
    integral = torch.zeros(num_estimates, x.shape[0], dtype=x.dtype, device=x.device)
    # torch.func transforms ignore an outer no_grad, so the Jacobians still work while the
    # state itself builds no autograd graph.
    with torch.no_grad():
        for i in range(num_steps):
            t = torch.full((x.shape[0],), 1.0 + i * dt, dtype=x.dtype, device=x.device)
            x, increment = likelihood_step(tableau, divergence_fn, x, t, dt)
            integral += increment
    return finish_likelihood(x, integral, exact=estimator == "exact")
