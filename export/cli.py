"""`flowserve export MODEL_DIR --format torchscript,onnx`: add exports to a model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from export.contract import FORMATS, parse_formats

__all__ = ["export"]


def export(
    model_dir: Annotated[
        Path, typer.Argument(help="Model directory with config.json and model.safetensors.")
    ],
    formats: Annotated[
        str,
        typer.Option(
            "--format",
            help=f"Comma-separated formats: {', '.join(FORMATS)} "
            "(onnx writes model.onnx and sampler.onnx).",
        ),
    ] = "torchscript,onnx",
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 2,
    max_dir_bytes: Annotated[
        int | None,
        typer.Option(min=1, help="Refuse to grow the directory past this size (write nothing)."),
    ] = None,
) -> None:
    """Export a model directory (TorchScript, ONNX, TorchServe archive) with a parity manifest."""
    try:
        chosen = parse_formats(formats)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--format") from error
    torch.set_num_threads(threads)
    # Imported here: the exporter stack (torch.onnx, onnxscript) is slow to import, and every
    # other flowserve command would pay for it at start-up.
    from export.mar import ArchiverError
    from export.model_export import export_model_dir, manifest_summary

    try:
        manifest = export_model_dir(model_dir, chosen, max_dir_bytes=max_dir_bytes)
    except (ValueError, ArchiverError) as error:
        # ModelDirError and ExportError are ValueErrors: bad input, not a crash.
        typer.echo(f"flowserve export: {error}", err=True)
        raise typer.Exit(code=1) from error
    typer.echo(f"exported {model_dir} ({', '.join(chosen)})")
    typer.echo(manifest_summary(manifest))
