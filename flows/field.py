"""Turn a network `(x, t, class_labels) -> prediction` into a velocity function.

The network may predict any parameterisation of `flows.paths.PARAMETERIZATIONS`; the velocity
comes from the exact conversion `flows.paths.convert`. Classifier-free guidance puts the
conditional and unconditional evaluations in one batched network call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from flows._checks import check_choice
from flows.paths import PARAMETERIZATIONS, GaussianPath, convert_unchecked, expand_like
from flows.solvers import VelocityFn

NetFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""`(x (batch, *sample_shape), t (batch,), class_labels int64 (batch,)) -> prediction`."""


def guided_combine(v_cond: Tensor, v_uncond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond).

    Args:
        v_cond: Conditional output, `(batch, *sample_shape)`.
        v_uncond: Unconditional output, `(batch, *sample_shape)`.
        scale: Guidance scale, a float or one per row `(batch,)`; 1 gives v_cond.

    Returns:
        `(batch, *sample_shape)`.
    """
    if not isinstance(v_cond, Tensor) or not isinstance(v_uncond, Tensor):
        raise ValueError("v_cond and v_uncond must be tensors")
    if v_cond.shape != v_uncond.shape or v_cond.dim() < 1:
        raise ValueError(
            f"v_uncond must have the shape of v_cond {tuple(v_cond.shape)}, "
            f"got {tuple(v_uncond.shape)}"
        )
    if isinstance(scale, Tensor):
        if tuple(scale.shape) != (v_cond.shape[0],):
            raise ValueError(f"scale must be a float or have shape ({v_cond.shape[0]},)")
        return torch.lerp(v_uncond, v_cond, expand_like(scale.to(v_cond.dtype), v_cond))
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or a (batch,) tensor, got {scale!r}")
    return torch.lerp(v_uncond, v_cond, float(scale))


def velocity_field(
    net_fn: NetFn,
    path: GaussianPath,
    parameterization: str,
    class_labels: Tensor | None = None,
    guidance_scale: float | Tensor = 1.0,
    null_label: int | None = None,
) -> VelocityFn:
    """Wrap a network as a velocity function `(x, t) -> v`.

    Because every conversion is affine in the prediction with weights fixed by (x_t, t), and the
    guidance weights sum to 1, guiding the raw predictions and converting once equals converting
    both and guiding the velocities.

    Args:
        net_fn: `(x, t, class_labels) -> prediction` in `parameterization`.
        path: The path the network was trained on.
        parameterization: One of `PARAMETERIZATIONS`.
        class_labels: int64 `(batch,)`, or None for an unconditional call (the network gets
            `null_label`, or 0 when that is None too; unconditional nets ignore labels).
        guidance_scale: A float or `(batch,)`; anything but 1 needs `class_labels` and
            `null_label`, and evaluates the conditional and null rows in one batch of 2 * batch.
        null_label: The label of the unconditional (null) class.

    Returns:
        `(x (batch, *sample_shape), t (batch,)) -> v`, where batch must equal len(class_labels)
        when labels are given.
    """
    if not callable(net_fn):
        raise ValueError("net_fn must be callable (x, t, class_labels) -> prediction")
    if not isinstance(path, GaussianPath):
        raise ValueError(f"path must be a GaussianPath, got {type(path).__name__}")
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if class_labels is not None and (
        not isinstance(class_labels, Tensor)
        or class_labels.dtype != torch.int64
        or class_labels.dim() != 1
    ):
        raise ValueError("class_labels must be an int64 tensor of shape (batch,) or None")
    if null_label is not None and (isinstance(null_label, bool) or not isinstance(null_label, int)):
        raise ValueError(f"null_label must be an int or None, got {null_label!r}")
    guided = _is_guided(guidance_scale, class_labels)
    if guided and (class_labels is None or null_label is None):
        raise ValueError("guidance_scale other than 1 needs class_labels and null_label")

    def labels_for(x: Tensor) -> Tensor:
        if class_labels is not None:
            if class_labels.shape[0] != x.shape[0]:
                raise ValueError(
                    f"class_labels has {class_labels.shape[0]} rows but x has {x.shape[0]}"
                )
            return class_labels.to(x.device)
        fill = 0 if null_label is None else null_label
        return torch.full((x.shape[0],), fill, dtype=torch.int64, device=x.device)

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        labels = labels_for(x)
        if guided:
            assert null_label is not None
            null = torch.full_like(labels, null_label)
            # Conditional and unconditional rows in one network call: (2 * batch, ...).
            both = net_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
            pred_cond, pred_uncond = both.chunk(2)
            prediction = guided_combine(pred_cond, pred_uncond, guidance_scale)
        else:
            prediction = net_fn(x, t, labels)
        return convert_unchecked(prediction, x, path.schedule(t), parameterization, "velocity")

    return velocity_fn


def _is_guided(scale: float | Tensor, class_labels: Tensor | None) -> bool:
    if isinstance(scale, Tensor):
        if scale.dim() != 1 or not scale.is_floating_point():
            raise ValueError("guidance_scale must be a float or a float tensor of shape (batch,)")
        if class_labels is not None and scale.shape[0] != class_labels.shape[0]:
            raise ValueError("guidance_scale must have one entry per class label")
        if not bool(torch.isfinite(scale).all()):
            raise ValueError("guidance_scale must be finite")
        return not bool((scale == 1.0).all())
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite float, got {scale!r}")
    return float(scale) != 1.0
