"""Regression losses for Gaussian-path generators: flow matching and denoising score matching.

All of them draw x_t = alpha_t * x_1 + sigma_t * x_0 on a `flows.paths` path and regress the
network output on a conditional target whose conditional expectation is the quantity the
network should predict:

- ``velocity`` (conditional flow matching): target d_alpha_t * x_1 + d_sigma_t * x_0.
- ``noise`` (denoising score matching in noise form): target x_0. This is DSM with the usual
  sigma_t^2 weighting, since sigma_t^2 * |s + x_0 / sigma_t|^2 = |sigma_t * s + x_0|^2 and the
  score is s = -eps / sigma_t.
- ``score`` (denoising score matching): |sigma_t * s + x_0|^2, the sigma_t^2-weighted DSM loss.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from flows._checks import check_choice
from flows.paths import GaussianPath, expand_like

__all__ = ["TRAINABLE_PARAMETERIZATIONS", "NetFn", "regression_loss"]

TRAINABLE_PARAMETERIZATIONS: tuple[str, ...] = ("velocity", "score", "noise")

NetFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""`(x_t (batch, *sample_shape), t (batch,), class_labels (batch,)) -> prediction`."""


def regression_loss(
    net: NetFn,
    path: GaussianPath,
    parameterization: str,
    x_0: Tensor,
    x_1: Tensor,
    t: Tensor,
    class_labels: Tensor,
) -> Tensor:
    """Mean squared regression loss of one batch.

    Args:
        net: the network being trained.
        path: the Gaussian path.
        parameterization: "velocity" (flow matching), "noise" or "score" (DSM).
        x_0: noise, `(batch, *sample_shape)`.
        x_1: data, `(batch, *sample_shape)`.
        t: times, `(batch,)` in [0, 1].
        class_labels: `(batch,)` int64 (already with label dropout applied).

    Returns:
        Scalar loss: squared error averaged over the batch and the sample dimensions.
    """
    check_choice("parameterization", parameterization, TRAINABLE_PARAMETERIZATIONS)
    x_t = path.sample_x_t(x_0, x_1, t)
    prediction = net(x_t, t, class_labels)
    if parameterization == "velocity":
        residual = prediction - path.target_velocity(x_0, x_1, t)
    elif parameterization == "noise":
        residual = prediction - x_0
    else:
        # sigma_t^2 weighting: sigma_t * (s - (-x_0 / sigma_t)) without dividing by sigma_t.
        sigma_t = expand_like(path.coefficients(t).sigma_t, x_0)
        residual = sigma_t * prediction + x_0
    return residual.square().mean()
