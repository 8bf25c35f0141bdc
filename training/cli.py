"""`flowserve train`: train a model on a built-in data set and write a model directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer

from flows.paths import PATH_KINDS
from training.artifacts import write_run
from training.datasets import DATASETS
from training.defaults import default_config
from training.losses import TRAINABLE_PARAMETERIZATIONS
from training.trainer import TrainConfig
from training.trainer import train as run_training

__all__ = ["PushFn", "train", "train_command"]


def _choice(allowed: tuple[str, ...]) -> Callable[[str | None], str | None]:
    """A typer callback accepting only `allowed` (None passes: the option was not given)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    return check


# Pushes a model directory: (model_dir, server "HOST:PORT", token_file) -> a line to print.
# Injected by the `flowserve` command, so that training imports nothing of the server; it ends
# the command with a message (typer.Exit) when the push fails.
PushFn = Callable[[Path, str, Path | None], str]


def train_command(push_fn: PushFn | None = None) -> Callable[..., None]:
    """The `train` command; with `push_fn`, `--push HOST:PORT` pushes the result when done."""

    def train(
        dataset: Annotated[
            str,
            typer.Argument(
                help=f"Data set: {', '.join(DATASETS)}.", callback=_choice(tuple(DATASETS))
            ),
        ],
        out: Annotated[Path, typer.Option("--out", help="Model directory to create.")],
        name: Annotated[
            str | None, typer.Option(help="Model name (default: the data set, '-vp' on vp).")
        ] = None,
        steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps.")] = None,
        seed: Annotated[int, typer.Option(min=0, help="Seed of the whole run.")] = 0,
        path: Annotated[
            str,
            typer.Option(help=f"Path: {', '.join(PATH_KINDS)}.", callback=_choice(PATH_KINDS)),
        ] = "linear",
        parameterization: Annotated[
            str | None,
            typer.Option(
                help="What the net predicts: velocity, noise, score (default: velocity on "
                "linear, noise on vp).",
                callback=_choice(TRAINABLE_PARAMETERIZATIONS),
            ),
        ] = None,
        batch_size: Annotated[int | None, typer.Option(min=1, help="Rows per step.")] = None,
        lr: Annotated[float | None, typer.Option(min=0.0, help="Peak learning rate.")] = None,
        ema_decay: Annotated[
            float | None, typer.Option(min=0.0, max=1.0, help="EMA decay, in [0, 1).")
        ] = None,
        plots_dir: Annotated[
            Path | None, typer.Option(help="Where the PNGs go (default: --out's parent).")
        ] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
        threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
        push: Annotated[
            str | None,
            typer.Option(help="When training ends, push the model directory to this server."),
        ] = None,
        push_token_file: Annotated[
            Path | None,
            typer.Option(help="Admin token for --push (else $FLOWSERVE_ADMIN_TOKEN)."),
        ] = None,
    ) -> None:
        """Train a flow-matching or diffusion model; write the --out model dir and PNGs beside
        it (and push it to a server with --push)."""
        if push is not None and push_fn is None:
            raise typer.BadParameter("pushing needs the `flowserve` command", param_hint="--push")
        if out.exists() and not overwrite:
            raise typer.BadParameter(f"{out} already exists (add --overwrite)", param_hint="--out")
        overrides: dict[str, object] = {
            "steps": steps,
            "seed": seed,
            "parameterization": parameterization,
            "batch_size": batch_size,
            "lr": lr,
            "ema_decay": ema_decay,
        }
        changes = {key: value for key, value in overrides.items() if value is not None}
        try:
            config = replace(default_config(dataset, path, name), **changes)  # type: ignore[arg-type]
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint=_option_for(str(error))) from error
        if threads is not None:
            torch.set_num_threads(threads)
        _run(config, out, plots_dir, overwrite, progress)
        if push is not None and push_fn is not None:
            typer.echo(push_fn(out, push, push_token_file))

    return train


train = train_command()


def _run(
    config: TrainConfig, out: Path, plots_dir: Path | None, overwrite: bool, progress: bool
) -> None:
    result = run_training(config, progress=progress)
    artifacts = write_run(result, out, plots_dir=plots_dir, overwrite=overwrite)
    typer.echo(f"model directory: {artifacts.model_dir}")
    typer.echo(f"loss curve:      {artifacts.loss_plot}")
    typer.echo(f"samples:         {artifacts.samples_plot}")


def _option_for(message: str) -> str | None:
    """The CLI option a validation message is about (messages start with the field name)."""
    for field_name in ("parameterization", "steps", "batch_size", "lr", "ema_decay", "name"):
        if field_name in message:
            return "--" + field_name.replace("_", "-")
    return None
