"""PNG line plots for the performance report (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt


def line_plot(
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    log_x: bool = True,
    log_y: bool = True,
) -> Path:
    """One line per series over a shared x axis, markers on the measured points; returns path."""
    figure, axes = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for name, values in series.items():
        axes.plot(x, values, marker="o", label=name)
    if log_x:
        axes.set_xscale("log", base=2)
    if log_y:
        axes.set_yscale("log")
    axes.set_xticks(list(x), [f"{v:g}" for v in x])
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
