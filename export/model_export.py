"""Export a model directory: add `model.ts`, `model.onnx`, `sampler.onnx` (and `model.mar`).

The model directory is loaded and verified first (so a missing or corrupt weights file, or a
config that does not match the weights, fails before anything is written). Every output is
written aside, reloaded from its file and compared with the eager model; only when all of them
pass are they renamed into place, `manifest.json` last. `config.json` and the weights are never
touched, so their sha256s stay valid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import onnx
import onnxruntime as ort
import torch

from export import mar as mar_export
from export.contract import (
    BATCH_AXIS_NAME,
    INPUT_NAMES,
    MANIFEST_FILE,
    MAR_FILE,
    ONNX_FILE,
    ONNX_OPSET,
    OUTPUT_NAME,
    SAMPLER_FILE,
    SAMPLER_INPUT_NAMES,
    SAMPLER_OUTPUT_NAME,
    SAMPLER_SOLVER_CODES,
    TORCHSCRIPT_FILE,
    parse_formats,
)
from export.manifest import (
    ExportedFile,
    Manifest,
    TensorSpec,
    manifest_json,
    merge_files,
    read_manifest,
)
from export.onnx_network import export_network_onnx
from export.onnx_runtime import open_session
from export.onnx_sampler import export_sampler_onnx
from export.parity import (
    PARITY_ROWS,
    module_parity,
    onnx_network_parity,
    parity_inputs,
    sampler_parity,
)
from export.staging import Staging
from export.torchscript import load_torchscript, save_torchscript
from flowserve.modeldir import CONFIG_FILE, LoadedModel, load_model_dir, sha256_file

# fp32 parity bounds. TorchScript runs the same ATen kernels as eager (1e-6 leaves room for a
# different fusion order); onnxruntime has its own Gemm/Conv kernels whose summation order
# differs (1e-5 is ~100 ulps at O(1) outputs).
TOLERANCES: Mapping[str, float] = MappingProxyType({"torchscript": 1e-6, "onnx": 1e-5})
# The sampler accumulates num_steps rounding differences; the bound scales with the samples'
# magnitude because fp32 error is relative (1e-4 absolute at O(1) samples).
SAMPLER_TOLERANCE = 1e-4
# The limit on one shipped model directory in model_store/ (pass as `max_dir_bytes`).
SHIPPED_MAX_DIR_BYTES = 5 * 1024 * 1024
# Step count of the sampler parity check: the model's default, capped to bound export time.
MAX_SAMPLER_PARITY_STEPS = 100


class ExportError(ValueError):
    """An export failed a check (parity, file size); nothing was written."""


def _network_specs(model: LoadedModel) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    shape: tuple[int | str, ...] = (BATCH_AXIS_NAME, *model.config.sample_shape)
    x, t, labels = INPUT_NAMES
    inputs = (
        TensorSpec(x, "float32", shape, "state x_t, (batch, *sample_shape)"),
        TensorSpec(t, "float32", (BATCH_AXIS_NAME,), "time per row in [0, 1]; 0 noise, 1 data"),
        TensorSpec(
            labels,
            "int64",
            (BATCH_AXIS_NAME,),
            "class per row; num_classes is the null class; ignored by unconditional nets",
        ),
    )
    outputs = (
        TensorSpec(OUTPUT_NAME, "float32", shape, f"{model.config.parameterization} prediction"),
    )
    return inputs, outputs


def _sampler_specs(model: LoadedModel) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    shape: tuple[int | str, ...] = (BATCH_AXIS_NAME, *model.config.sample_shape)
    x0, num_steps, labels, guidance, solver = SAMPLER_INPUT_NAMES
    inputs = (
        TensorSpec(x0, "float32", shape, "noise at t=0, (batch, *sample_shape)"),
        TensorSpec(num_steps, "int64", (), "number of equal steps from t=0 to t=1 (Loop trips)"),
        TensorSpec(
            labels,
            "int64",
            (BATCH_AXIS_NAME,),
            "class per row in [0, num_classes]; ignored by unconditional models",
        ),
        TensorSpec(
            guidance,
            "float32",
            (BATCH_AXIS_NAME,),
            "classifier-free guidance scale per row (1 = conditional); ignored if unconditional",
        ),
        TensorSpec(solver, "int64", (), f"solver code {dict(SAMPLER_SOLVER_CODES)}"),
    )
    outputs = (TensorSpec(SAMPLER_OUTPUT_NAME, "float32", shape, "samples at t=1"),)
    return inputs, outputs


def _exporter_versions() -> dict[str, Any]:
    import onnxscript  # only for its version; torch.onnx has imported it already

    return {
        "name": "flowserve.export",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": onnxscript.__version__,
        "opset": ONNX_OPSET,
        "onnx_exporter": "torch.onnx.export(dynamo=True)",
        "torchscript_exporter": "torch.jit.script",
    }


def _check(name: str, error: float, tolerance: float) -> None:
    if not error <= tolerance:  # also catches NaN
        raise ExportError(f"{name}: parity {error:.3g} exceeds the tolerance {tolerance:.0e}")


def _export_torchscript(model: LoadedModel, staging: Staging) -> ExportedFile:
    dest = staging.path(TORCHSCRIPT_FILE)
    save_torchscript(model.net, dest)
    inputs = parity_inputs(model.config.sample_shape, model.config.num_classes, PARITY_ROWS)
    error = module_parity(load_torchscript(dest), model.net, inputs)
    _check(TORCHSCRIPT_FILE, error, TOLERANCES["torchscript"])
    specs_in, specs_out = _network_specs(model)
    return ExportedFile(
        file=TORCHSCRIPT_FILE,
        format="torchscript",
        sha256=sha256_file(dest),
        size_bytes=dest.stat().st_size,
        inputs=specs_in,
        outputs=specs_out,
        parity={
            "max_abs_error": error,
            "rows": PARITY_ROWS,
            "tolerance": TOLERANCES["torchscript"],
        },
    )


def _export_onnx_network(model: LoadedModel, staging: Staging) -> ExportedFile:
    dest = staging.path(ONNX_FILE)
    proto = export_network_onnx(model.net, model.config.sample_shape)
    dest.write_bytes(proto.SerializeToString())
    inputs = parity_inputs(model.config.sample_shape, model.config.num_classes, PARITY_ROWS)
    error = onnx_network_parity(open_session(dest), model.net, inputs)
    _check(ONNX_FILE, error, TOLERANCES["onnx"])
    specs_in, specs_out = _network_specs(model)
    return ExportedFile(
        file=ONNX_FILE,
        format="onnx",
        sha256=sha256_file(dest),
        size_bytes=dest.stat().st_size,
        inputs=specs_in,
        outputs=specs_out,
        parity={"max_abs_error": error, "rows": PARITY_ROWS, "tolerance": TOLERANCES["onnx"]},
        details={"opset": ONNX_OPSET, "external_data": False},
    )


def _export_onnx_sampler(model: LoadedModel, staging: Staging) -> ExportedFile:
    config = model.config
    dest = staging.path(SAMPLER_FILE)
    proto = export_sampler_onnx(
        model.net,
        config.gaussian_path,
        config.parameterization,
        config.num_classes,
        config.sample_shape,
    )
    dest.write_bytes(proto.SerializeToString())
    session = open_session(dest)
    num_steps = min(config.default_num_steps, MAX_SAMPLER_PARITY_STEPS)
    parity: dict[str, Any] = {}
    for solver in SAMPLER_SOLVER_CODES:
        figures = sampler_parity(session, model, solver, num_steps)
        tolerance = SAMPLER_TOLERANCE * max(1.0, figures.max_abs_sample)
        _check(f"{SAMPLER_FILE} ({solver})", figures.max_abs_error, tolerance)
        parity[solver] = {
            "max_abs_error": figures.max_abs_error,
            "max_abs_sample": figures.max_abs_sample,
            "rows": figures.rows,
            "num_steps": figures.num_steps,
            "guidance_scale": figures.guidance_scale,
            "tolerance": tolerance,
            "reference": "flows.solvers.sample",
        }
    specs_in, specs_out = _sampler_specs(model)
    return ExportedFile(
        file=SAMPLER_FILE,
        format="onnx_sampler",
        sha256=sha256_file(dest),
        size_bytes=dest.stat().st_size,
        inputs=specs_in,
        outputs=specs_out,
        parity=parity,
        details={
            "opset": ONNX_OPSET,
            "solver_codes": dict(SAMPLER_SOLVER_CODES),
            "time_grid": "t_i = i / num_steps, i = 0 .. num_steps - 1",
            "includes": ["network", "classifier-free guidance", "conversion to velocity"],
            "parameterization": config.parameterization,
            "path": dict(config.path),
            "null_label": config.num_classes if config.num_classes > 0 else None,
        },
    )


def _source_digests(directory: Path, model: LoadedModel) -> dict[str, str]:
    digests = {CONFIG_FILE: sha256_file(directory / CONFIG_FILE)}
    digests.update(model.config.sha256)
    return digests


def _previous_entries(directory: Path, source: dict[str, str]) -> tuple[ExportedFile, ...]:
    """Entries of an existing manifest that still describe files on disk from the same source."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return ()
    try:
        previous = read_manifest(path)
    except ValueError:
        return ()  # an unreadable manifest is rewritten from this export's files alone
    if dict(previous.source_sha256) != source:
        return ()
    return tuple(
        entry
        for entry in previous.files
        if (directory / entry.file).is_file()
        and sha256_file(directory / entry.file) == entry.sha256
    )


def _check_size(directory: Path, staging: Staging, max_dir_bytes: int | None) -> None:
    """Refuse an export that would make the directory larger than `max_dir_bytes`."""
    if max_dir_bytes is None:
        return
    staged = staging.staged
    kept = sum(
        path.stat().st_size
        for path in directory.iterdir()
        if path.is_file() and path.name not in staged and not path.name.endswith(".tmp")
    )
    total = kept + sum(path.stat().st_size for path in staged.values())
    if total > max_dir_bytes:
        sizes = ", ".join(f"{name} {path.stat().st_size}" for name, path in staged.items())
        raise ExportError(
            f"{directory}: the export would take the directory to {total} bytes, over the "
            f"{max_dir_bytes}-byte limit (new files: {sizes})"
        )


def export_model_dir(
    path: str | os.PathLike[str],
    formats: str | Iterable[str] = ("torchscript", "onnx"),
    max_dir_bytes: int | None = None,
) -> Manifest:
    """Add exports and `manifest.json` to a model directory.

    Args:
        path: The model directory (`config.json` + `model.safetensors`).
        formats: Any of `torchscript` (model.ts), `onnx` (model.onnx and sampler.onnx) and
            `mar` (model.mar, a TorchServe archive), as a list or a comma-separated string.
        max_dir_bytes: If given, refuse (write nothing) when the directory would end up larger
            (`SHIPPED_MAX_DIR_BYTES` for model_store/).

    Returns:
        The manifest as written.

    Raises:
        ValueError: an unknown format.
        flowserve.modeldir.ModelDirError: a missing or corrupt config or weights file, or
            weights that do not match the config.
        ExportError: an export failed its parity check, or the size limit.
    """
    chosen = parse_formats(formats)
    if max_dir_bytes is not None and (
        isinstance(max_dir_bytes, bool) or not isinstance(max_dir_bytes, int) or max_dir_bytes < 1
    ):
        raise ValueError(f"max_dir_bytes must be a positive int or None, got {max_dir_bytes!r}")
    directory = Path(path)
    model = load_model_dir(directory, verify=True)
    source = _source_digests(directory, model)
    fresh: list[ExportedFile] = []
    with Staging(directory) as staging:
        if "torchscript" in chosen:
            fresh.append(_export_torchscript(model, staging))
        if "onnx" in chosen:
            fresh.append(_export_onnx_network(model, staging))
            fresh.append(_export_onnx_sampler(model, staging))
        if "mar" in chosen:
            dest = staging.path(MAR_FILE)
            details = mar_export.build_mar(directory, dest, model.config.name)
            fresh.append(
                ExportedFile(
                    file=MAR_FILE,
                    format="mar",
                    sha256=sha256_file(dest),
                    size_bytes=dest.stat().st_size,
                    details=details,
                )
            )
        manifest = Manifest(
            model=model.config.name,
            source_sha256=source,
            exporter=_exporter_versions(),
            files=merge_files(_previous_entries(directory, source), fresh),
        )
        staging.path(MANIFEST_FILE).write_text(manifest_json(manifest), encoding="utf-8")
        _check_size(directory, staging, max_dir_bytes)
        staging.commit()
    return manifest


def manifest_summary(manifest: Manifest) -> str:
    """One line per exported file: name, size and parity, for the CLI."""
    lines = []
    for entry in manifest.files:
        parity = json.dumps(dict(entry.parity), sort_keys=True) if entry.parity else "-"
        lines.append(f"{entry.file}: {entry.size_bytes} bytes, parity {parity}")
    return "\n".join(lines)
