# Triton kernel parameters are untyped by design (triton reads annotations as kernel types).
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Fused Triton kernels for the sampling step loop, with wrappers that check, allocate and launch.

Each update reads a handful of `(batch, *sample_shape)` tensors once and writes the next state
once; in torch the same update is two to five separate elementwise kernels. The torch statement
of every kernel is in `export.step_reference` and the tests compare the two.

This module imports triton at import time (the `@triton.jit` decorator decides between compiled
and interpreted mode when it runs), so nothing else in the project imports it eagerly: set
`TRITON_INTERPRET=1` before importing it to run the kernels on CPU tensors.

Layout: a sample is flattened to `(batch, row_size)`; one program handles `BLOCK` consecutive
elements and recovers the row of each element as `offset // row_size` to fetch its per-row
scalars, so rows need not be a multiple of the block and a block may span rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Large blocks: elementwise kernels are bandwidth bound, and the interpreter is slow per program.
DEFAULT_BLOCK = 1024


@triton.jit
def _euler_update_kernel(x_ptr, v_ptr, dt_ptr, out_ptr, numel, row_size, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    row = offsets // row_size
    x = tl.load(x_ptr + offsets, mask=mask)
    v = tl.load(v_ptr + offsets, mask=mask)
    dt = tl.load(dt_ptr + row, mask=mask)
    tl.store(out_ptr + offsets, x + dt * v, mask=mask)


@triton.jit
def _heun_correct_kernel(
    x_ptr, v_t_ptr, v_pred_ptr, dt_ptr, out_ptr, numel, row_size, BLOCK: tl.constexpr
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    row = offsets // row_size
    x = tl.load(x_ptr + offsets, mask=mask)
    v_t = tl.load(v_t_ptr + offsets, mask=mask)
    v_pred = tl.load(v_pred_ptr + offsets, mask=mask)
    dt = tl.load(dt_ptr + row, mask=mask)
    tl.store(out_ptr + offsets, x + (0.5 * dt) * (v_t + v_pred), mask=mask)


@triton.jit
def _guided_euler_update_kernel(
    x_ptr,
    v_cond_ptr,
    v_uncond_ptr,
    scale_ptr,
    dt_ptr,
    out_ptr,
    numel,
    row_size,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    row = offsets // row_size
    x = tl.load(x_ptr + offsets, mask=mask)
    v_cond = tl.load(v_cond_ptr + offsets, mask=mask)
    v_uncond = tl.load(v_uncond_ptr + offsets, mask=mask)
    scale = tl.load(scale_ptr + row, mask=mask)
    dt = tl.load(dt_ptr + row, mask=mask)
    v = v_uncond + scale * (v_cond - v_uncond)
    tl.store(out_ptr + offsets, x + dt * v, mask=mask)


@triton.jit
def _euler_maruyama_update_kernel(
    x_ptr,
    drift_ptr,
    dt_ptr,
    g_ptr,
    noise_ptr,
    out_ptr,
    numel,
    row_size,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    row = offsets // row_size
    x = tl.load(x_ptr + offsets, mask=mask)
    drift = tl.load(drift_ptr + offsets, mask=mask)
    noise = tl.load(noise_ptr + offsets, mask=mask)
    dt = tl.load(dt_ptr + row, mask=mask)
    g = tl.load(g_ptr + row, mask=mask)
    tl.store(out_ptr + offsets, x + drift * dt + (g * tl.sqrt(dt)) * noise, mask=mask)


def _check_state(name: str, value: Tensor, like: Tensor) -> Tensor:
    """Check a `(batch, *sample_shape)` operand against the state; return it contiguous."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {value.dtype}")
    if value.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {value.device}")
    return value.contiguous()


def _check_per_row(name: str, value: Tensor | float, like: Tensor) -> Tensor:
    """Check a per-row operand (a float broadcasts to every row); return it `(batch,)`."""
    batch = like.shape[0]
    if isinstance(value, int | float):
        return torch.full((batch,), float(value), dtype=torch.float32, device=like.device)
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a float or a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {value.dtype}")
    if value.shape != (batch,):
        raise ValueError(
            f"{name} must have shape ({batch},) (one per row), got {tuple(value.shape)}"
        )
    if value.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {value.device}")
    return value.contiguous()


def _prepare(x_t: Tensor, out: Tensor | None, block: int) -> tuple[Tensor, Tensor, int, int]:
    """Validate the state and output; return (x contiguous, out, numel, row_size)."""
    if not isinstance(x_t, Tensor):
        raise ValueError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
    if x_t.dtype != torch.float32:
        raise ValueError(f"x_t must be float32, got {x_t.dtype}")
    if x_t.dim() < 1 or x_t.shape[0] < 1:
        raise ValueError(
            f"x_t must be (batch, *sample_shape) with batch >= 1, got {tuple(x_t.shape)}"
        )
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    x_t = x_t.contiguous()
    if out is None:
        out = torch.empty_like(x_t)
    elif out.shape != x_t.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor of shape {tuple(x_t.shape)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    numel = x_t.numel()
    return x_t, out, numel, numel // x_t.shape[0]


def _grid(numel: int, block: int) -> tuple[int]:
    return (triton.cdiv(numel, block),)


def euler_update(
    x_t: Tensor,
    v: Tensor,
    dt: Tensor | float,
    *,
    out: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    """Fused Euler update `x_t + dt * v` (also the Heun predictor).

    Args:
        x_t: State, float32 `(batch, *sample_shape)`.
        v: Velocity, float32 `(batch, *sample_shape)`.
        dt: Step size per row, float32 `(batch,)`, or one float for every row.
        out: Optional contiguous output buffer (may be `x_t` itself: each element is read
            before it is written by the same program).
        block: Elements per program, a power of two.

    Returns:
        The next state, `(batch, *sample_shape)`.

    Raises:
        ValueError: On a shape, dtype or device mismatch.
    """
    x_t, out, numel, row_size = _prepare(x_t, out, block)
    v = _check_state("v", v, x_t)
    dt = _check_per_row("dt", dt, x_t)
    _euler_update_kernel[_grid(numel, block)](x_t, v, dt, out, numel, row_size, BLOCK=block)
    return out


def heun_predict(
    x_t: Tensor,
    v_t: Tensor,
    dt: Tensor | float,
    *,
    out: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    """Heun predictor `x_t + dt * v_t`: the Euler update under the name the loop reads by.

    Args and returns as `euler_update`.
    """
    return euler_update(x_t, v_t, dt, out=out, block=block)


def heun_correct(
    x_t: Tensor,
    v_t: Tensor,
    v_pred: Tensor,
    dt: Tensor | float,
    *,
    out: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    """Fused Heun corrector `x_t + dt / 2 * (v_t + v_pred)`.

    Args:
        x_t: State at the start of the step, float32 `(batch, *sample_shape)`.
        v_t: Velocity at `(x_t, t)`, float32 `(batch, *sample_shape)`.
        v_pred: Velocity at the predictor `(x_t + dt * v_t, t + dt)`, same shape.
        dt: Step size per row, float32 `(batch,)`, or one float.
        out: Optional contiguous output buffer (may alias `x_t`).
        block: Elements per program, a power of two.

    Returns:
        The next state, `(batch, *sample_shape)`.

    Raises:
        ValueError: On a shape, dtype or device mismatch.
    """
    x_t, out, numel, row_size = _prepare(x_t, out, block)
    v_t = _check_state("v_t", v_t, x_t)
    v_pred = _check_state("v_pred", v_pred, x_t)
    dt = _check_per_row("dt", dt, x_t)
    _heun_correct_kernel[_grid(numel, block)](
        x_t, v_t, v_pred, dt, out, numel, row_size, BLOCK=block
    )
    return out


def guided_euler_update(
    x_t: Tensor,
    v_cond: Tensor,
    v_uncond: Tensor,
    guidance_scale: Tensor | float,
    dt: Tensor | float,
    *,
    out: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    """Classifier-free guidance fused with the Euler update.

    `x_t + dt * (v_uncond + w * (v_cond - v_uncond))` with `w` and `dt` per row.

    Args:
        x_t: State, float32 `(batch, *sample_shape)`.
        v_cond: Conditional velocity, float32 `(batch, *sample_shape)`.
        v_uncond: Unconditional velocity, float32 `(batch, *sample_shape)`.
        guidance_scale: Guidance scale per row, float32 `(batch,)`, or one float.
        dt: Step size per row, float32 `(batch,)`, or one float.
        out: Optional contiguous output buffer (may alias `x_t`).
        block: Elements per program, a power of two.

    Returns:
        The next state, `(batch, *sample_shape)`.

    Raises:
        ValueError: On a shape, dtype or device mismatch.
    """
    x_t, out, numel, row_size = _prepare(x_t, out, block)
    v_cond = _check_state("v_cond", v_cond, x_t)
    v_uncond = _check_state("v_uncond", v_uncond, x_t)
    guidance_scale = _check_per_row("guidance_scale", guidance_scale, x_t)
    dt = _check_per_row("dt", dt, x_t)
    _guided_euler_update_kernel[_grid(numel, block)](
        x_t, v_cond, v_uncond, guidance_scale, dt, out, numel, row_size, BLOCK=block
    )
    return out


def euler_maruyama_update(
    x_t: Tensor,
    drift: Tensor,
    dt: Tensor | float,
    g_t: Tensor | float,
    noise: Tensor,
    *,
    out: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    """Fused Euler-Maruyama update `x_t + drift * dt + g_t * sqrt(dt) * noise`.

    Args:
        x_t: State, float32 `(batch, *sample_shape)`.
        drift: Drift, float32 `(batch, *sample_shape)`.
        dt: Step size per row, float32 `(batch,)`, or one float; must be non-negative.
        g_t: Diffusion coefficient per row, float32 `(batch,)`, or one float.
        noise: Standard normal noise, float32 `(batch, *sample_shape)`.
        out: Optional contiguous output buffer (may alias `x_t`).
        block: Elements per program, a power of two.

    Returns:
        The next state, `(batch, *sample_shape)`.

    Raises:
        ValueError: On a shape, dtype or device mismatch.
    """
    x_t, out, numel, row_size = _prepare(x_t, out, block)
    drift = _check_state("drift", drift, x_t)
    noise = _check_state("noise", noise, x_t)
    dt = _check_per_row("dt", dt, x_t)
    g_t = _check_per_row("g_t", g_t, x_t)
    _euler_maruyama_update_kernel[_grid(numel, block)](
        x_t, drift, dt, g_t, noise, out, numel, row_size, BLOCK=block
    )
    return out
