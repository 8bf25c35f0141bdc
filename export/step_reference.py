"""Torch references for the fused solver-update kernels in `export.triton_kernels`.

Each function is the plain-torch statement of one update that a Triton kernel fuses. They are the
ground truth the kernels are tested against, and the CPU path of `export.cuda_graph`. Per-row
quantities (`dt`, `guidance_scale`, `g_t`) are `(batch,)` and broadcast over `sample_shape`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _per_row(value: Tensor, x: Tensor) -> Tensor:
    """Reshape a `(batch,)` tensor to `(batch, 1, ..., 1)` so it broadcasts against `x`."""
    return value.reshape(-1, *([1] * (x.dim() - 1)))


def euler_update(x_t: Tensor, v: Tensor, dt: Tensor) -> Tensor:
    """Euler update `x_t + dt * v` (also the Heun predictor).

    Args:
        x_t: State, `(batch, *sample_shape)`.
        v: Velocity at `(x_t, t)`, `(batch, *sample_shape)`.
        dt: Step size per row, `(batch,)`.

    Returns:
        The next state, `(batch, *sample_shape)`.
    """
    return x_t + _per_row(dt, x_t) * v


def heun_correct(x_t: Tensor, v_t: Tensor, v_pred: Tensor, dt: Tensor) -> Tensor:
    """Heun corrector `x_t + dt / 2 * (v_t + v_pred)`.

    Args:
        x_t: State at the start of the step, `(batch, *sample_shape)`.
        v_t: Velocity at `(x_t, t)`, `(batch, *sample_shape)`.
        v_pred: Velocity at the Euler predictor `(x_t + dt * v_t, t + dt)`, same shape.
        dt: Step size per row, `(batch,)`.

    Returns:
        The next state, `(batch, *sample_shape)`.
    """
    return x_t + _per_row(0.5 * dt, x_t) * (v_t + v_pred)


def guided_euler_update(
    x_t: Tensor, v_cond: Tensor, v_uncond: Tensor, guidance_scale: Tensor, dt: Tensor
) -> Tensor:
    """Classifier-free guidance combined with an Euler update.

    `v = v_uncond + w * (v_cond - v_uncond)`, then `x_t + dt * v`.

    Args:
        x_t: State, `(batch, *sample_shape)`.
        v_cond: Conditional velocity, `(batch, *sample_shape)`.
        v_uncond: Unconditional (null-label) velocity, `(batch, *sample_shape)`.
        guidance_scale: Guidance scale `w` per row, `(batch,)`.
        dt: Step size per row, `(batch,)`.

    Returns:
        The next state, `(batch, *sample_shape)`.
    """
    v = v_uncond + _per_row(guidance_scale, x_t) * (v_cond - v_uncond)
    return x_t + _per_row(dt, x_t) * v


def euler_maruyama_update(
    x_t: Tensor, drift: Tensor, dt: Tensor, g_t: Tensor, noise: Tensor
) -> Tensor:
    """Euler-Maruyama update `x_t + drift * dt + g_t * sqrt(dt) * noise`.

    Args:
        x_t: State, `(batch, *sample_shape)`.
        drift: Drift at `(x_t, t)`, `(batch, *sample_shape)`.
        dt: Step size per row, `(batch,)`, non-negative.
        g_t: Diffusion coefficient per row, `(batch,)`.
        noise: Standard normal noise, `(batch, *sample_shape)`.

    Returns:
        The next state, `(batch, *sample_shape)`.
    """
    return x_t + drift * _per_row(dt, x_t) + _per_row(g_t * torch.sqrt(dt), x_t) * noise
