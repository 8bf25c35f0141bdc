"""Gaussian probability paths and exact conversions between network parameterisations.

Every path here is Gaussian: x_t = alpha_t * x_1 + sigma_t * x_0 with x_0 ~ N(0, I) the noise
(t = 0) and x_1 the data (t = 1). Its conditional velocity is v = d_alpha_t * x_1 + d_sigma_t *
x_0. A network may predict any of four quantities, all functions of the posterior means
x1_hat = E[x_1 | x_t] and x0_hat = E[x_0 | x_t]:

- ``velocity``: v = d_alpha_t * x1_hat + d_sigma_t * x0_hat
- ``score``: grad log p_t(x_t) = -x0_hat / sigma_t
- ``noise``: x0_hat
- ``data``: x1_hat

Because x_t = alpha_t * x1_hat + sigma_t * x0_hat also holds, any one prediction and x_t fix both
posterior means, so `convert` is exact for every Gaussian path.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flows._checks import check_batch, check_choice, check_same_shape, check_time

PARAMETERIZATIONS: tuple[str, ...] = ("velocity", "score", "noise", "data")
PATH_KINDS: tuple[str, ...] = ("linear", "vp")


@dataclass(frozen=True)
class PathCoefficients:
    """Schedule values at a batch of times, each of shape `(batch,)`.

    Attributes:
        alpha_t: Weight of the data x_1 in x_t.
        sigma_t: Weight of the noise x_0 in x_t.
        d_alpha_t: Time derivative of alpha_t.
        d_sigma_t: Time derivative of sigma_t.
    """

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


def expand_like(coefficient: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-row tensor `(batch,)` to `(batch, 1, ..., 1)` so it broadcasts against x."""
    return coefficient.reshape(coefficient.shape[0], *([1] * (x.dim() - 1)))


class GaussianPath(ABC):
    """A path x_t = alpha_t * x_1 + sigma_t * x_0 from N(0, I) at t=0 to data at t=1."""

    @abstractmethod
    def schedule(self, t: Tensor) -> PathCoefficients:
        """Coefficients at times `t` `(batch,)` without validation (the per-step hot path)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; `path_from_dict` inverts it."""

    def coefficients(self, t: Tensor) -> PathCoefficients:
        """Schedule values at times `t`.

        Args:
            t: Times in [0, 1], shape `(batch,)`.

        Returns:
            The coefficients, each `(batch,)`, in the dtype of `t`.
        """
        check_time("t", t)
        return self.schedule(t)

    def sample_x_t(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> Tensor:
        """Point on the path between noise and data.

        Args:
            x_0: Noise, `(batch, *sample_shape)`.
            x_1: Data, `(batch, *sample_shape)`.
            t: Times in [0, 1], `(batch,)`.

        Returns:
            x_t, `(batch, *sample_shape)`.
        """
        self._check_pair(x_0, x_1, t)
        c = self.schedule(t)
        return expand_like(c.alpha_t, x_1) * x_1 + expand_like(c.sigma_t, x_0) * x_0

    def target_velocity(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> Tensor:
        """Conditional velocity d/dt x_t, the regression target of flow matching.

        Args:
            x_0: Noise, `(batch, *sample_shape)`.
            x_1: Data, `(batch, *sample_shape)`.
            t: Times in [0, 1], `(batch,)`.

        Returns:
            d_alpha_t * x_1 + d_sigma_t * x_0, `(batch, *sample_shape)`.
        """
        self._check_pair(x_0, x_1, t)
        c = self.schedule(t)
        return expand_like(c.d_alpha_t, x_1) * x_1 + expand_like(c.d_sigma_t, x_0) * x_0

    @staticmethod
    def _check_pair(x_0: Tensor, x_1: Tensor, t: Tensor) -> None:
        check_batch("x_0", x_0)
        check_batch("x_1", x_1)
        check_same_shape("x_1", x_1, "x_0", x_0)
        check_time("t", t, x_0.shape[0])


@dataclass(frozen=True)
class LinearPath(GaussianPath):
    """The linear (conditional optimal transport) path: alpha_t = t, sigma_t = 1 - t."""

    def schedule(self, t: Tensor) -> PathCoefficients:
        """Coefficients at times `t` `(batch,)` without validation."""
        one = torch.ones_like(t)
        return PathCoefficients(alpha_t=t, sigma_t=1.0 - t, d_alpha_t=one, d_sigma_t=-one)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: ``{"kind": "linear"}``."""
        return {"kind": "linear"}


@dataclass(frozen=True)
class VPPath(GaussianPath):
    """Variance-preserving diffusion path with a linear beta schedule, in flow time.

    Diffusion time s runs from 1 (noise) to eps (data): s = eps + (1 - eps) * (1 - t), so
    alpha_t = exp(-0.5 * int_0^s beta(u) du) with beta(u) = beta_min + u * (beta_max - beta_min)
    and sigma_t = sqrt(1 - alpha_t^2). Stopping at s = eps keeps sigma_t > 0 and every
    conversion finite on all of t in [0, 1].

    Attributes:
        beta_min: beta(0), > 0.
        beta_max: beta(1), >= beta_min.
        eps: Smallest diffusion time, in (0, 1).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("beta_min", "beta_max", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a float, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if self.beta_min <= 0:
            raise ValueError(f"beta_min must be > 0, got {self.beta_min}")
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min ({self.beta_min}), got {self.beta_max}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps}")

    def schedule(self, t: Tensor) -> PathCoefficients:
        """Coefficients at times `t` `(batch,)` without validation."""
        slope = self.beta_max - self.beta_min
        s = self.eps + (1.0 - self.eps) * (1.0 - t)
        integral = self.beta_min * s + 0.5 * slope * s * s
        beta_s = self.beta_min + slope * s
        alpha_t = torch.exp(-0.5 * integral)
        # 1 - alpha^2 = -expm1(-integral) without cancellation when the integral is tiny.
        sigma_t = torch.sqrt(-torch.expm1(-integral))
        # ds/dt = -(1 - eps), so d alpha/dt = alpha * (-beta(s)/2) * ds/dt.
        d_alpha_t = 0.5 * (1.0 - self.eps) * beta_s * alpha_t
        d_sigma_t = -alpha_t * d_alpha_t / sigma_t
        return PathCoefficients(alpha_t, sigma_t, d_alpha_t, d_sigma_t)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description with the schedule."""
        return {"kind": "vp", "beta_min": self.beta_min, "beta_max": self.beta_max, "eps": self.eps}


def path_from_dict(d: Mapping[str, Any]) -> GaussianPath:
    """Rebuild a path from `GaussianPath.to_dict()` output.

    Args:
        d: ``{"kind": "linear"}`` or ``{"kind": "vp", "beta_min": .., "beta_max": .., "eps": ..}``
            (schedule keys optional, defaults as in `VPPath`).

    Returns:
        The path.

    Raises:
        ValueError: Unknown kind or unknown keys.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"path must be a mapping, got {type(d).__name__}")
    kind = check_choice("path kind", d.get("kind"), PATH_KINDS)
    allowed = {"kind"} if kind == "linear" else {"kind", "beta_min", "beta_max", "eps"}
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"path has unknown keys {sorted(unknown)}; allowed {sorted(allowed)}")
    if kind == "linear":
        return LinearPath()
    return VPPath(**{key: value for key, value in d.items() if key != "kind"})


def convert(
    prediction: Tensor,
    x_t: Tensor,
    t: Tensor,
    path: GaussianPath,
    source: str,
    target: str,
) -> Tensor:
    """Convert a network prediction between parameterisations, exactly, for any Gaussian path.

    Singular points are those of the path itself: on the linear path, recovering the data
    prediction (or velocity) from a noise/score prediction divides by alpha_t = t (t = 0), and
    recovering noise/score from data divides by sigma_t = 1 - t (t = 1). The VP path has none.

    Args:
        prediction: The `source` prediction, `(batch, *sample_shape)`.
        x_t: The point it was made at, `(batch, *sample_shape)`.
        t: Times in [0, 1], `(batch,)`.
        path: The Gaussian path the network was trained on.
        source: One of `PARAMETERIZATIONS`.
        target: One of `PARAMETERIZATIONS`.

    Returns:
        The `target` prediction, `(batch, *sample_shape)`.
    """
    check_choice("source", source, PARAMETERIZATIONS)
    check_choice("target", target, PARAMETERIZATIONS)
    if not isinstance(path, GaussianPath):
        raise ValueError(f"path must be a GaussianPath, got {type(path).__name__}")
    check_batch("x_t", x_t)
    check_same_shape("prediction", prediction, "x_t", x_t)
    check_time("t", t, x_t.shape[0])
    return convert_unchecked(prediction, x_t, path.schedule(t), source, target)


def convert_unchecked(
    prediction: Tensor, x_t: Tensor, c: PathCoefficients, source: str, target: str
) -> Tensor:
    """`convert` without validation, from precomputed coefficients (for per-step hot paths).

    Args:
        prediction: The `source` prediction, `(batch, *sample_shape)`.
        x_t: The point it was made at, `(batch, *sample_shape)`.
        c: `path.schedule(t)` at the rows' times.
        source: One of `PARAMETERIZATIONS` (not checked).
        target: One of `PARAMETERIZATIONS` (not checked).

    Returns:
        The `target` prediction, `(batch, *sample_shape)`.
    """
    if source == target:
        return prediction
    alpha_t, sigma_t = expand_like(c.alpha_t, x_t), expand_like(c.sigma_t, x_t)
    d_alpha_t, d_sigma_t = expand_like(c.d_alpha_t, x_t), expand_like(c.d_sigma_t, x_t)
    # Only compute the posterior means the target needs, so that e.g. noise -> score never
    # divides by alpha_t (which is 0 at t=0 on the linear path).
    need_x1 = target in ("velocity", "data")
    need_x0 = target in ("velocity", "score", "noise")
    x0_hat: Tensor | None = None
    x1_hat: Tensor | None = None
    if source == "velocity":
        # Solve [[alpha, sigma], [d_alpha, d_sigma]] @ [x1_hat, x0_hat] = [x_t, v].
        det = alpha_t * d_sigma_t - sigma_t * d_alpha_t
        if need_x1:
            x1_hat = (d_sigma_t * x_t - sigma_t * prediction) / det
        if need_x0:
            x0_hat = (alpha_t * prediction - d_alpha_t * x_t) / det
    elif source in ("score", "noise"):
        x0_hat = -sigma_t * prediction if source == "score" else prediction
        if need_x1:
            x1_hat = (x_t - sigma_t * x0_hat) / alpha_t
    else:  # data
        x1_hat = prediction
        if need_x0:
            x0_hat = (x_t - alpha_t * x1_hat) / sigma_t
    if target == "velocity":
        assert x1_hat is not None and x0_hat is not None
        return d_alpha_t * x1_hat + d_sigma_t * x0_hat
    if target == "data":
        assert x1_hat is not None
        return x1_hat
    assert x0_hat is not None
    return -x0_hat / sigma_t if target == "score" else x0_hat
