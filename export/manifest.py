"""`manifest.json`: what export wrote, from which weights, with which tools, and how close it is.

`config.json` lists the sha256 of the files training wrote; the manifest does the same for the
exporter's files, and also records the digests of the config and weights it was exported from,
so a stale export (weights replaced afterwards) is detectable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: Tensor name in the exported graph.
        dtype: `float32` or `int64`.
        shape: Dimensions; the string `batch` marks the dynamic batch axis.
        doc: What the tensor means.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    doc: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.doc:
            data["doc"] = self.doc
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        """Inverse of `to_dict`."""
        return cls(
            name=str(data["name"]),
            dtype=str(data["dtype"]),
            shape=tuple(data["shape"]),
            doc=str(data.get("doc", "")),
        )


@dataclass(frozen=True)
class ExportedFile:
    """One exported file and its checks.

    Attributes:
        file: File name inside the model directory.
        format: `torchscript`, `onnx`, `onnx_sampler` or `mar`.
        sha256: Hex digest of the file.
        size_bytes: File size.
        inputs: Graph inputs (empty for archives).
        outputs: Graph outputs.
        parity: Measured parity figures (JSON values), e.g. `max_abs_error`, `rows`.
        details: Format-specific facts (JSON values), e.g. the sampler's solver codes.
    """

    file: str
    format: str
    sha256: str
    size_bytes: int
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    parity: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "file": self.file,
            "format": self.format,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "parity": dict(self.parity),
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportedFile:
        """Inverse of `to_dict`."""
        return cls(
            file=str(data["file"]),
            format=str(data["format"]),
            sha256=str(data["sha256"]),
            size_bytes=int(data["size_bytes"]),
            inputs=tuple(TensorSpec.from_dict(spec) for spec in data.get("inputs", [])),
            outputs=tuple(TensorSpec.from_dict(spec) for spec in data.get("outputs", [])),
            parity=dict(data.get("parity", {})),
            details=dict(data.get("details", {})),
        )


@dataclass(frozen=True)
class Manifest:
    """The content of `manifest.json`.

    Attributes:
        model: Model name from `config.json`.
        source_sha256: sha256 of `config.json` and of every file it lists, at export time.
        exporter: Tool versions (`torch`, `onnx`, `onnxruntime`, `onnxscript`, `opset`, ...).
        batch_axis: The dynamic axis of every batched input and output (always 0).
        files: The exported files, by file name order.
        format_version: Version of this manifest format.
    """

    model: str
    source_sha256: Mapping[str, str]
    exporter: Mapping[str, Any]
    files: tuple[ExportedFile, ...]
    batch_axis: int = 0
    format_version: int = MANIFEST_FORMAT_VERSION

    def file(self, name: str) -> ExportedFile:
        """The entry for one exported file.

        Raises:
            KeyError: no such file in the manifest.
        """
        for entry in self.files:
            if entry.file == name:
                return entry
        raise KeyError(f"manifest has no entry for {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "format_version": self.format_version,
            "model": self.model,
            "source_sha256": dict(sorted(self.source_sha256.items())),
            "exporter": dict(self.exporter),
            "batch_axis": self.batch_axis,
            "files": [entry.to_dict() for entry in sorted(self.files, key=lambda e: e.file)],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Inverse of `to_dict`.

        Raises:
            ValueError: a missing field or an unknown format version.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"manifest must be a JSON object, got {type(data).__name__}")
        if data.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version must be {MANIFEST_FORMAT_VERSION}, "
                f"got {data.get('format_version')!r}"
            )
        try:
            return cls(
                model=str(data["model"]),
                source_sha256=dict(data["source_sha256"]),
                exporter=dict(data["exporter"]),
                files=tuple(ExportedFile.from_dict(entry) for entry in data["files"]),
                batch_axis=int(data.get("batch_axis", 0)),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"manifest is missing or has a malformed field: {error}") from error


def manifest_json(manifest: Manifest) -> str:
    """The manifest as indented JSON text (NaN refused: parity figures must be finite)."""
    return json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n"


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read `manifest.json`.

    Raises:
        ValueError: unreadable JSON or an invalid manifest.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read manifest ({error})") from error
    return Manifest.from_dict(data)


def merge_files(
    previous: Sequence[ExportedFile], fresh: Sequence[ExportedFile]
) -> tuple[ExportedFile, ...]:
    """Fresh entries replace previous ones of the same file; the rest are kept."""
    by_name = {entry.file: entry for entry in previous}
    by_name.update({entry.file: entry for entry in fresh})
    return tuple(by_name[name] for name in sorted(by_name))
