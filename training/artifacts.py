"""Write a finished run: the model directory, then its loss curve and samples as PNGs beside it.

The PNGs are not part of the model directory (a push sends only config.json and
model.safetensors, and every file listed in config.json must travel with it). They go into
`plots_dir` (default: the model directory's parent) as `NAME-loss.png` and `NAME-samples.png`.
The samples are drawn from the model as written and reloaded with `verify=True`, so the plot
shows exactly what will be served.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flows.solvers import ODE_SOLVERS, sample
from flowserve.modeldir import LoadedModel, load_model_dir, write_model_dir
from training.datasets import make_dataset
from training.plots import plot_image_grid, plot_loss_curve, plot_scatter
from training.trainer import TrainResult

__all__ = ["RunArtifacts", "draw_samples", "write_run"]

_SCATTER_POINTS = 1000
_GRID_COLUMNS = 10
_GRID_GUIDANCE = 2.0


@dataclass(frozen=True)
class RunArtifacts:
    """Where a run's outputs went.

    Attributes:
        model_dir: the model directory.
        loss_plot: the loss-curve PNG.
        samples_plot: the samples PNG (scatter for 2-D data, a grid for images).
    """

    model_dir: Path
    loss_plot: Path
    samples_plot: Path


def draw_samples(
    model: LoadedModel,
    num_samples: int,
    generator: torch.Generator,
    class_labels: Tensor | None = None,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Samples from a model with its default ODE solver and step count.

    Args:
        model: the loaded model.
        num_samples: how many.
        generator: source of the initial noise.
        class_labels: `(num_samples,)` int64 or None.
        guidance_scale: classifier-free guidance weight.

    Returns:
        `(num_samples, *sample_shape)`.
    """
    config = model.config
    # An SDE default needs a score and a noise stream; the ODE with heun shows the same model.
    solver = config.default_solver if config.default_solver in ODE_SOLVERS else "heun"
    x_0 = torch.randn((num_samples, *config.sample_shape), generator=generator)
    velocity_fn = model.velocity_fn(class_labels, guidance_scale)
    return sample(velocity_fn, x_0, config.default_num_steps, solver=solver)


def write_run(
    result: TrainResult,
    out: str | os.PathLike[str],
    plots_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> RunArtifacts:
    """Write the model directory atomically, then the PNGs.

    Args:
        result: the finished run.
        out: the model directory to create.
        plots_dir: where the PNGs go (default: `out`'s parent).
        overwrite: replace an existing model directory.

    Returns:
        The paths written.
    """
    model_dir = Path(out)
    write_model_dir(model_dir, result.model_config, result.state_dict, overwrite=overwrite)
    plots = Path(plots_dir) if plots_dir is not None else model_dir.parent
    plots.mkdir(parents=True, exist_ok=True)
    name = result.model_config.name
    loss_plot = plots / f"{name}-loss.png"
    samples_plot = plots / f"{name}-samples.png"
    plot_loss_curve(result.losses, loss_plot, title=f"{name}: training loss")

    model = load_model_dir(model_dir, verify=True)
    config = model.config
    generator = torch.Generator().manual_seed(result.config.seed)
    if config.sample_shape == (2,):
        points = draw_samples(model, _SCATTER_POINTS, generator)
        reference = make_dataset(result.config.dataset, _SCATTER_POINTS, generator)
        plot_scatter(points, samples_plot, reference, title=f"{name}: samples")
    else:
        if config.num_classes > 0:
            # One row per class: ten samples of each digit at guidance scale 2.
            labels = torch.arange(config.num_classes).repeat_interleave(_GRID_COLUMNS)
            images = draw_samples(model, len(labels), generator, labels, _GRID_GUIDANCE)
            title = f"{name}: one class per row, guidance {_GRID_GUIDANCE}"
        else:
            images = draw_samples(model, _GRID_COLUMNS * _GRID_COLUMNS, generator)
            title = f"{name}: samples"
        plot_image_grid(images, samples_plot, _GRID_COLUMNS, title=title)
    return RunArtifacts(model_dir, loss_plot, samples_plot)
