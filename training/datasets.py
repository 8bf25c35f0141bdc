"""Training data: four seeded 2-D toy distributions and scikit-learn's 8x8 digits.

Every sampler draws from the `torch.Generator` it is given, so the same seed gives the same
points. The toy sets also return the component each point came from (which moon, which
Gaussian, which square, which spiral) as a label; digits return the digit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DIGITS_SIZE",
    "DatasetInfo",
    "LabeledData",
    "load_digits_data",
    "make_dataset",
    "make_labeled_dataset",
]

DIGITS_SIZE = 1797  # images in sklearn.datasets.load_digits


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set looks like.

    Attributes:
        name: the name `make_dataset` takes.
        sample_shape: shape of one sample.
        num_classes: number of distinct labels.
        max_size: most distinct points available (None: unlimited, generated on demand).
        conditional: whether its default model is class-conditional.
    """

    name: str
    sample_shape: tuple[int, ...]
    num_classes: int
    max_size: int | None
    conditional: bool


@dataclass(frozen=True)
class LabeledData:
    """Samples and their labels.

    Attributes:
        x: `(n, *sample_shape)` float32.
        labels: `(n,)` int64 in [0, num_classes).
    """

    x: Tensor
    labels: Tensor


DATASETS: dict[str, DatasetInfo] = {
    "moons": DatasetInfo("moons", (2,), 2, None, conditional=False),
    "eight_gaussians": DatasetInfo("eight_gaussians", (2,), 8, None, conditional=False),
    "checkerboard": DatasetInfo("checkerboard", (2,), 8, None, conditional=False),
    "spirals": DatasetInfo("spirals", (2,), 2, None, conditional=False),
    "digits": DatasetInfo("digits", (1, 8, 8), 10, DIGITS_SIZE, conditional=True),
}


def _moons(n: int, generator: torch.Generator | None) -> LabeledData:
    # scikit-learn's two moons, centred on the origin, with Gaussian noise of std 0.05.
    labels = torch.randint(0, 2, (n,), generator=generator)
    theta = math.pi * torch.rand(n, generator=generator)
    outer = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    inner = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    points = torch.where(labels.unsqueeze(1) == 0, outer, inner) - torch.tensor([0.5, 0.25])
    noise = 0.05 * torch.randn(n, 2, generator=generator)
    return LabeledData(points + noise, labels)


def _eight_gaussians(n: int, generator: torch.Generator | None) -> LabeledData:
    # Eight equal Gaussians (std 0.15) on the circle of radius 2.
    labels = torch.randint(0, 8, (n,), generator=generator)
    angle = labels.to(torch.float32) * (math.pi / 4)
    centers = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return LabeledData(centers + 0.15 * torch.randn(n, 2, generator=generator), labels)


def _checkerboard(n: int, generator: torch.Generator | None) -> LabeledData:
    # Uniform on the 8 dark squares of a 4x4 board covering [-2, 2]^2.
    labels = torch.randint(0, 8, (n,), generator=generator)
    column = labels % 4
    row = 2 * (labels // 4) + (column % 2)  # alternate rows per column: a checkerboard
    corner = torch.stack([column, row], dim=1).to(torch.float32) - 2.0
    return LabeledData(corner + torch.rand(n, 2, generator=generator), labels)


def _spirals(n: int, generator: torch.Generator | None) -> LabeledData:
    # Two interleaved Archimedean spirals of 1.5 turns, point-symmetric, noise std 0.1.
    labels = torch.randint(0, 2, (n,), generator=generator)
    # sqrt of a uniform spreads points evenly along the arc, whose length grows with radius.
    angle = torch.sqrt(torch.rand(n, generator=generator)) * 3.0 * math.pi
    radius = angle / math.pi  # reaches 3 at the outer end
    arm = torch.stack([-torch.cos(angle) * radius, torch.sin(angle) * radius], dim=1)
    sign = 1.0 - 2.0 * labels.to(torch.float32).unsqueeze(1)
    return LabeledData(sign * arm + 0.1 * torch.randn(n, 2, generator=generator), labels)


_TOY_SAMPLERS: dict[str, Callable[[int, torch.Generator | None], LabeledData]] = {
    "moons": _moons,
    "eight_gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "spirals": _spirals,
}


def load_digits_data() -> LabeledData:
    """All of scikit-learn's 8x8 digits, scaled from [0, 16] to [-1, 1].

    Returns:
        `x` of shape `(1797, 1, 8, 8)` float32 and `labels` `(1797,)` int64 in [0, 10).
    """
    from sklearn.datasets import load_digits  # the data ship inside scikit-learn: no download

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (n, 1, 8, 8)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return LabeledData(images / 8.0 - 1.0, labels)


def _check_args(name: object, n: object, generator: object) -> DatasetInfo:
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    info = DATASETS[name]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if info.max_size is not None and n > info.max_size:
        raise ValueError(f"n must be <= {info.max_size} for {name!r} (its size), got {n}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
    return info


def make_labeled_dataset(name: str, n: int, generator: torch.Generator | None) -> LabeledData:
    """Draw `n` labelled samples of a data set.

    Args:
        name: one of `DATASETS`.
        n: number of samples; for digits at most 1797, drawn without replacement.
        generator: source of randomness (None: torch's global generator).

    Returns:
        `x` `(n, *sample_shape)` float32 and `labels` `(n,)` int64.
    """
    _check_args(name, n, generator)
    if name == "digits":
        digits = load_digits_data()
        index = torch.randperm(DIGITS_SIZE, generator=generator)[:n]
        return LabeledData(digits.x[index], digits.labels[index])
    return _TOY_SAMPLERS[name](n, generator)


def make_dataset(name: str, n: int, generator: torch.Generator | None) -> Tensor:
    """Draw `n` samples of a data set, `(n, *sample_shape)` float32 (see `make_labeled_dataset`)."""
    return make_labeled_dataset(name, n, generator).x
