"""Cheap input validation shared by the public functions of flows/.

Each helper runs once per public call, never inside a solver step, and raises ValueError with
a message that names the offending argument and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_tensor(name: str, value: object, min_dim: int = 1) -> Tensor:
    """Require a floating tensor of at least `min_dim` dimensions with only finite values."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must contain only finite values (no nan or inf)")
    return value


def check_batch(name: str, value: object) -> Tensor:
    """Require a finite batch `(batch, *sample_shape)` with batch >= 1."""
    tensor = check_tensor(name, value, min_dim=1)
    if tensor.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one row, got shape {tuple(tensor.shape)}")
    return tensor


def check_time(name: str, t: object, batch: int | None = None) -> Tensor:
    """Require a finite time tensor of shape `(batch,)` with every entry in [0, 1].

    With `batch` None any one-dimensional length is accepted.
    """
    tensor = check_tensor(name, t, min_dim=1)
    if tensor.dim() != 1 or (batch is not None and tensor.shape[0] != batch):
        expected = "batch" if batch is None else str(batch)
        raise ValueError(f"{name} must have shape ({expected},), got {tuple(tensor.shape)}")
    if bool((tensor < 0).any()) or bool((tensor > 1).any()):
        raise ValueError(f"{name} must lie in [0, 1]")
    return tensor


def check_scalar_time(name: str, value: object) -> float:
    """Require a finite Python number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    return number


def check_step_size(name: str, dt: object, batch: int) -> float | Tensor:
    """Require dt to be a finite float or a finite tensor of shape `(batch,)`."""
    if isinstance(dt, Tensor):
        check_tensor(name, dt, min_dim=1)
        if tuple(dt.shape) != (batch,):
            raise ValueError(f"{name} must be a float or have shape ({batch},), got {dt.shape}")
        return dt
    if isinstance(dt, bool) or not isinstance(dt, int | float):
        raise ValueError(f"{name} must be a float or a tensor, got {type(dt).__name__}")
    if not math.isfinite(float(dt)):
        raise ValueError(f"{name} must be finite, got {dt!r}")
    return float(dt)


def check_positive_int(name: str, value: object) -> int:
    """Require an int >= 1 (bools are rejected: they are ints by accident)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """Require one of a fixed set of names."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def check_same_shape(name: str, value: Tensor, reference_name: str, reference: Tensor) -> None:
    """Require two tensors to have the same shape."""
    if value.shape != reference.shape:
        raise ValueError(
            f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, "
            f"got {tuple(value.shape)}"
        )
