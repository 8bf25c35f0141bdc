"""State updaters: how a row group turns stage results into its next state.

The arithmetic is the tableau's: `x + dt * sum_i w_i * k_i` (flows.solvers.combine_stages) and
the Euler-Maruyama update (flows.solvers.euler_maruyama_step). `TorchUpdater` calls those
functions; `TritonUpdater` sends the updates that export's fused Triton kernels cover (Euler,
the Heun predictor and corrector, Euler-Maruyama) to those kernels on CUDA tensors and everything
else to the torch path, so both compute the same update.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Protocol

import torch
from torch import Tensor

from flows.solvers import combine_stages, euler_maruyama_step


class StateUpdater(Protocol):
    """Computes solver state updates for a row group."""

    name: str

    def combine(
        self, x_t: Tensor, dt: float | Tensor, weights: Sequence[float], ks: Sequence[Tensor]
    ) -> Tensor:
        """`x_t + dt * sum_i weights[i] * ks[i]`; tensors `(rows, *sample_shape)`, dt per row."""
        ...

    def euler_maruyama(
        self, x_t: Tensor, t: Tensor, dt: float | Tensor, drift: Tensor, g_t: Tensor, noise: Tensor
    ) -> Tensor:
        """`x_t + drift * dt + g_t * sqrt(dt) * noise`; `t` and `g_t` are `(rows,)`."""
        ...


class TorchUpdater:
    """The updates as flows.solvers computes them."""

    name = "torch"

    def combine(
        self, x_t: Tensor, dt: float | Tensor, weights: Sequence[float], ks: Sequence[Tensor]
    ) -> Tensor:
        """`x_t + dt * sum_i weights[i] * ks[i]` through flows.solvers.combine_stages."""
        return combine_stages(x_t, dt, weights, ks)

    def euler_maruyama(
        self, x_t: Tensor, t: Tensor, dt: float | Tensor, drift: Tensor, g_t: Tensor, noise: Tensor
    ) -> Tensor:
        """The Euler-Maruyama update through flows.solvers.euler_maruyama_step."""
        return euler_maruyama_step(lambda _x, _t: drift, x_t, t, dt, g_t, noise)


class TritonUpdater:
    """Export's fused Triton kernels for the updates they cover, torch for the rest.

    Args:
        kernels: The `export.triton_kernels` module (imported by the caller, which guards the
            import).
        allow_cpu: Also launch the kernels on CPU tensors; only meaningful when triton runs in
            its interpreter (TRITON_INTERPRET=1), which is how the tests exercise this path
            without a GPU.
    """

    name = "triton"

    def __init__(self, kernels: ModuleType, allow_cpu: bool = False) -> None:
        self._kernels = kernels
        self._allow_cpu = allow_cpu
        self._torch = TorchUpdater()

    def _fused(self, x_t: Tensor) -> bool:
        return x_t.is_cuda or self._allow_cpu

    def combine(
        self, x_t: Tensor, dt: float | Tensor, weights: Sequence[float], ks: Sequence[Tensor]
    ) -> Tensor:
        """Fused Euler update / Heun corrector where the weights match, else torch."""
        if not self._fused(x_t):
            return self._torch.combine(x_t, dt, weights, ks)
        dt_rows = _per_row(dt, x_t)
        live = [(w, k) for w, k in zip(weights, ks, strict=False) if w != 0.0]
        if len(live) == 1 and live[0][0] == 1.0:
            # Euler step, Heun predictor, midpoint's full step: x + dt * k.
            return self._kernels.euler_update(x_t, live[0][1], dt_rows)  # type: ignore[no-any-return]
        if len(live) == 1:
            return self._kernels.euler_update(x_t, live[0][1], dt_rows * live[0][0])  # type: ignore[no-any-return]
        if len(live) == 2 and live[0][0] == 0.5 and live[1][0] == 0.5:
            return self._kernels.heun_correct(x_t, live[0][1], live[1][1], dt_rows)  # type: ignore[no-any-return]
        return self._torch.combine(x_t, dt, weights, ks)

    def euler_maruyama(
        self, x_t: Tensor, t: Tensor, dt: float | Tensor, drift: Tensor, g_t: Tensor, noise: Tensor
    ) -> Tensor:
        """Fused Euler-Maruyama update on CUDA, else torch."""
        if not self._fused(x_t):
            return self._torch.euler_maruyama(x_t, t, dt, drift, g_t, noise)
        return self._kernels.euler_maruyama_update(  # type: ignore[no-any-return]
            x_t, drift, _per_row(dt, x_t), g_t.to(x_t.dtype), noise
        )


def _per_row(dt: float | Tensor, x_t: Tensor) -> Tensor:
    if isinstance(dt, Tensor):
        return dt.to(device=x_t.device, dtype=x_t.dtype)
    return torch.full((x_t.shape[0],), dt, dtype=x_t.dtype, device=x_t.device)
