"""Writing samples to disk for the command line: `.npy`, or a `.png` picture of them.

A `.png` of 2-D samples is a scatter plot; of images `(channels, height, width)` (1 or 3
channels) a grid. Other shapes can only be written as `.npy`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SUFFIXES = (".npy", ".png")


class OutputError(ValueError):
    """The output path or the samples' shape does not allow the requested format."""


def write_samples(path: Path, samples: np.ndarray, class_labels: np.ndarray | None = None) -> None:
    """Write `samples` `(n, *sample_shape)` to `path` in the format its suffix names.

    Args:
        path: Destination; `.npy` or `.png`.
        samples: The samples.
        class_labels: Optional `(n,)` labels, used to colour a scatter plot.

    Raises:
        OutputError: unknown suffix, or a `.png` of a shape that has no picture.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise OutputError(f"--out must end in {' or '.join(SUFFIXES)}, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(path, samples, allow_pickle=False)
        return
    sample_shape = samples.shape[1:]
    if sample_shape == (2,):
        _scatter(path, samples, class_labels)
    elif len(sample_shape) == 3 and sample_shape[0] in (1, 3):
        _image_grid(path, samples)
    else:
        raise OutputError(
            f"a .png shows 2-D points or (1|3, H, W) images; samples of shape "
            f"{list(sample_shape)} can only be written as .npy"
        )


def _figure() -> Figure:
    # The object-oriented API needs no pyplot state and no display.
    from matplotlib.figure import Figure

    return Figure(figsize=(5, 5), dpi=100)


def _scatter(path: Path, samples: np.ndarray, class_labels: np.ndarray | None) -> None:
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    if class_labels is None:
        axes.scatter(samples[:, 0], samples[:, 1], s=4, alpha=0.7)
    else:
        axes.scatter(samples[:, 0], samples[:, 1], s=4, c=class_labels, cmap="tab10", alpha=0.7)
    axes.set_aspect("equal")
    axes.set_title(f"{len(samples)} samples")
    figure.savefig(path, bbox_inches="tight")


def _image_grid(path: Path, samples: np.ndarray) -> None:
    n, channels, height, width = samples.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (height + 1), columns * (width + 1), channels), dtype=np.float32)
    low, high = float(samples.min()), float(samples.max())
    scaled = (samples - low) / (high - low if high > low else 1.0)
    for index in range(n):
        r, c = divmod(index, columns)
        top, left = r * (height + 1), c * (width + 1)
        grid[top : top + height, left : left + width] = scaled[index].transpose(1, 2, 0)
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(grid[..., 0] if channels == 1 else grid, cmap="gray", interpolation="nearest")
    axes.axis("off")
    figure.savefig(path, bbox_inches="tight")
