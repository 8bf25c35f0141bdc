"""PNG plots of a training run: the loss curve, 2-D scatter plots and image grids.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing global is
touched and no display is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["plot_image_grid", "plot_loss_curve", "plot_scatter"]


def _save(figure: Figure, dest: str | os.PathLike[str]) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(os.fspath(dest), dpi=100, format="png")


def plot_loss_curve(
    losses: Sequence[float], dest: str | os.PathLike[str], title: str = "training loss"
) -> None:
    """Per-step loss (faint) and its 1%-window moving average, log scale.

    Args:
        losses: one loss per step (at least one).
        dest: the PNG file to write.
        title: figure title.
    """
    if len(losses) < 1:
        raise ValueError("losses must hold at least one value")
    values = torch.tensor(list(losses), dtype=torch.float64)
    window = max(1, len(values) // 100)
    smooth = values.unfold(0, window, 1).mean(dim=1) if len(values) >= window else values
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    axes.plot(range(len(values)), values.numpy(), color="tab:blue", alpha=0.25, linewidth=0.5)
    axes.plot(range(window - 1, len(values)), smooth.numpy(), color="tab:blue", linewidth=1.5)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    figure.tight_layout()
    _save(figure, dest)


def plot_scatter(
    samples: Tensor,
    dest: str | os.PathLike[str],
    reference: Tensor | None = None,
    title: str = "samples",
) -> None:
    """Scatter plot of 2-D samples, optionally beside reference data.

    Args:
        samples: `(n, 2)` generated points.
        dest: the PNG file to write.
        reference: `(m, 2)` data points drawn in a second panel, or None.
        title: title of the samples panel.
    """
    for name, points in (("samples", samples), ("reference", reference)):
        if points is not None and (points.dim() != 2 or points.shape[1] != 2):
            raise ValueError(f"{name} must have shape (n, 2), got {tuple(points.shape)}")
    panels = [(samples, title)] + ([(reference, "data")] if reference is not None else [])
    figure = Figure(figsize=(4 * len(panels), 4))
    first = None
    for i, (points, panel_title) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1, sharex=first, sharey=first)
        first = first or axes
        cpu = points.detach().cpu().numpy()
        axes.scatter(cpu[:, 0], cpu[:, 1], s=2, alpha=0.5, linewidths=0)
        axes.set_aspect("equal")
        axes.set_title(panel_title)
    figure.tight_layout()
    _save(figure, dest)


def plot_image_grid(
    images: Tensor,
    dest: str | os.PathLike[str],
    num_columns: int,
    title: str = "samples",
) -> None:
    """Grid of single-channel images in [-1, 1], filled row by row.

    Args:
        images: `(n, 1, height, width)`.
        dest: the PNG file to write.
        num_columns: images per row.
        title: figure title.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape (n, 1, height, width), got {images.shape}")
    if num_columns < 1:
        raise ValueError(f"num_columns must be >= 1, got {num_columns}")
    count, _, height, width = images.shape
    rows = -(-count // num_columns)
    canvas = torch.full((rows * (height + 1), num_columns * (width + 1)), -1.0)
    for i in range(count):
        top, left = (i // num_columns) * (height + 1), (i % num_columns) * (width + 1)
        canvas[top : top + height, left : left + width] = images[i, 0].detach().cpu()
    figure = Figure(figsize=(num_columns * 0.5 + 0.5, rows * 0.5 + 0.7))
    axes = figure.add_subplot()
    axes.imshow(canvas.clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
    axes.set_axis_off()
    axes.set_title(title)
    figure.tight_layout()
    _save(figure, dest)
