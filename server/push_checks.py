"""Checks a model version directory must pass before it may serve (pushed or dropped in).

In order: the config's schema, sha256s, tensor names / shapes / dtypes and finite weights
(`flowserve.modeldir.load_model_dir`); the config names the model it is pushed as; a smoke test
(samples from noise are finite and bounded); an ONNX file matches the eager network. Each
failure raises `PushRejected` naming the check. The quality gate (which needs the serving
version) lives in `server.lifecycle`; exports the server needs are rebuilt by
`rebuild_exports`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from export.contract import ONNX_FILE
from export.model_export import TOLERANCES, ExportError, export_model_dir
from export.onnx_runtime import open_session
from export.parity import onnx_network_parity, parity_inputs
from flows.solvers import sample
from flowserve.modeldir import CONFIG_FILE, LoadedModel, ModelDirError, load_model_dir
from server.config import PushConfig
from server.errors import PushRejected

# Rows of the ONNX parity batch: enough to cover t in [0, 1] and every class label.
_PARITY_ROWS = 256
# Exports each sampling backend needs, rebuilt by the server from the checked weights.
_BACKEND_EXPORTS = {"torchscript": "torchscript", "onnxruntime": "onnx"}


def _without_path(message: str, directory: Path) -> str:
    """An error message with the server's staging path taken out (clients need not see it)."""
    return message.replace(f"{directory}{os.sep}", "").replace(str(directory), "the version")


def rename_model(directory: Path, name: str) -> None:
    """Set the model name in `directory/config.json` (the push header overrides it).

    Raises:
        PushRejected: config.json is not a JSON object.
    """
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: undecodable, not JSON, or an int beyond Python's 4300-digit limit;
    # RecursionError: nesting deeper than the interpreter's recursion limit.
    except (ValueError, RecursionError) as error:
        raise PushRejected("config", f"{CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise PushRejected("config", f"{CONFIG_FILE} must hold a JSON object")
    data["name"] = name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_checked(directory: Path, name: str | None) -> LoadedModel:
    """Load a version directory with every check of the model directory format.

    Args:
        directory: The version directory.
        name: The model name it must carry, or None to accept the one in config.json.

    Raises:
        PushRejected: naming the failed check.
    """
    try:
        loaded = load_model_dir(directory, verify=True)
    except ModelDirError as error:
        raise PushRejected("model directory", _without_path(str(error), directory)) from None
    if name is not None and loaded.config.name != name:
        raise PushRejected(
            "model directory",
            f"{CONFIG_FILE} names model {loaded.config.name!r}, but it is stored as {name!r}",
        )
    return loaded


def smoke_test(model: LoadedModel, limits: PushConfig) -> None:
    """Draw `limits.smoke_samples` samples with `limits.smoke_steps` Euler steps from a fixed
    seed (conditional models cycle through every label, the null class included); all must be
    finite and within `limits.smoke_bound`.

    Raises:
        PushRejected: a sample is not finite or out of bounds.
    """
    config = model.config
    generator = torch.Generator().manual_seed(0)
    x_0 = torch.randn((limits.smoke_samples, *config.sample_shape), generator=generator)
    labels = (
        torch.arange(limits.smoke_samples) % (config.num_classes + 1)
        if config.num_classes
        else None
    )
    x_1 = sample(model.velocity_fn(labels), x_0, limits.smoke_steps, solver="euler")
    finite = torch.isfinite(x_1)
    if not bool(finite.all()):
        bad = int((~finite.reshape(len(x_1), -1).all(dim=1)).sum())
        raise PushRejected(
            "smoke test",
            f"{bad} of {limits.smoke_samples} samples ({limits.smoke_steps} steps) are not finite",
        )
    peak = float(x_1.abs().max())
    if peak > limits.smoke_bound:
        raise PushRejected(
            "smoke test",
            f"samples reach |x| = {peak:.4g}, beyond push.smoke_bound {limits.smoke_bound:.4g}",
        )


def check_onnx(directory: Path, model: LoadedModel) -> float | None:
    """Compare `model.onnx`, if present, with the eager network on a seeded batch.

    Returns:
        The max abs error, or None without an ONNX file.

    Raises:
        PushRejected: the file does not load, or differs by more than export's tolerance.
    """
    path = directory / ONNX_FILE
    if not path.is_file():
        return None
    inputs = parity_inputs(model.config.sample_shape, model.config.num_classes, _PARITY_ROWS)
    try:
        error = onnx_network_parity(open_session(path, 1), model.net, inputs)
    except Exception as failure:  # onnxruntime raises its own types for malformed graphs
        raise PushRejected(
            "onnx parity", f"{ONNX_FILE} does not run like flowserve's export ({failure})"
        ) from None
    tolerance = TOLERANCES["onnx"]
    if not error <= tolerance:
        raise PushRejected(
            "onnx parity",
            f"{ONNX_FILE} differs from the weights' network by {error:.3g} (tolerance "
            f"{tolerance:g}); re-export it with `flowserve export`",
        )
    return error


def rebuild_exports(directory: Path, backend: str) -> None:
    """Export what the configured sampling backend needs from the checked weights.

    Raises:
        PushRejected: the export failed its parity check.
    """
    export_format = _BACKEND_EXPORTS.get(backend)
    if export_format is None:
        return
    try:
        export_model_dir(directory, formats=export_format)
    except (ExportError, ModelDirError) as error:
        raise PushRejected("export", _without_path(str(error), directory)) from None
