"""The model directory format: `config.json` plus `model.safetensors`, written atomically.

A model directory holds everything needed to rebuild and run a trained generator:

- `config.json`: `ModelConfig.to_dict()`: format version, name, architecture, sample shape,
  parameterisation, path, classes, default solver and steps, data set, training provenance and
  the sha256 of every other file training wrote (`model.safetensors`).
- `model.safetensors`: the (EMA) weights, float32, names exactly those of the architecture.

Files not listed in `config.json`'s `sha256` (the exporter's `model.onnx`, `model.ts`,
`manifest.json`, which carry their own hashes) are ignored by `load_model_dir`. Nothing is
ever unpickled: the config is JSON and the weights are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor, nn

from flows.field import velocity_field
from flows.nets import NetSpec
from flows.nets import build_net as build_net_from_spec
from flows.paths import GaussianPath, path_from_dict
from flows.solvers import SOLVERS, VelocityFn

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "MODEL_PARAMETERIZATIONS",
    "WEIGHTS_FILE",
    "LoadedModel",
    "ModelConfig",
    "ModelDirError",
    "build_net",
    "load_model_dir",
    "read_config",
    "sha256_file",
    "write_model_dir",
]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_PARAMETERIZATIONS: tuple[str, ...] = ("velocity", "score", "noise")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = (
    "format_version",
    "name",
    "architecture",
    "sample_shape",
    "parameterization",
    "path",
    "num_classes",
    "default_solver",
    "default_num_steps",
    "dataset",
    "training",
    "sha256",
)
_REQUIRED_FIELDS = _FIELDS[:9]
_MAX_NUM_STEPS = 1000


class ModelDirError(ValueError):
    """A model directory or its config is missing, corrupt or inconsistent."""


def _field_error(name: str, message: str) -> ModelDirError:
    return ModelDirError(f"config field {name!r}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Everything `config.json` records about a trained model.

    Attributes:
        name: model name, `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 characters.
        architecture: the network and its hyper-parameters.
        sample_shape: shape of one sample; must match the architecture.
        parameterization: what the network predicts: "velocity", "score" or "noise".
        path: the Gaussian path's `to_dict()` (`{"kind": "linear"}` or vp with its schedule).
        num_classes: real classes (0 = unconditional); label `num_classes` is the null class.
        default_solver: one of `flows.solvers.SOLVERS`.
        default_num_steps: solver steps when a request asks for 0, in [1, 1000].
        dataset: name of the training data set (for quality checks), or None.
        training: provenance (seed, steps, optimiser, losses, versions); JSON values only.
        sha256: file name -> hex sha256 for every file beside `config.json` that training wrote.
        format_version: version of this format; only `FORMAT_VERSION` is readable.
    """

    name: str
    architecture: NetSpec
    sample_shape: tuple[int, ...]
    parameterization: str
    path: Mapping[str, Any]
    num_classes: int
    default_solver: str
    default_num_steps: int
    dataset: str | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    sha256: Mapping[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            raise _field_error(
                "format_version", f"must be {FORMAT_VERSION}, got {self.format_version!r}"
            )
        # fullmatch: `$` alone also matches before a trailing newline ("name\n").
        if not isinstance(self.name, str) or not _NAME_PATTERN.fullmatch(self.name):
            raise _field_error(
                "name", f"must match {_NAME_PATTERN.pattern} (at most 64 chars), got {self.name!r}"
            )
        if not isinstance(self.architecture, NetSpec):
            raise _field_error("architecture", "must be a NetSpec")
        shape = self.sample_shape
        if (
            not isinstance(shape, tuple)
            or not shape
            or not all(_is_int(n) and n >= 1 for n in shape)
        ):
            raise _field_error(
                "sample_shape", f"must be a non-empty list of ints >= 1, got {shape}"
            )
        if shape != self.architecture.sample_shape:
            raise _field_error(
                "sample_shape",
                f"{list(shape)} does not match the architecture's "
                f"{list(self.architecture.sample_shape)}",
            )
        if self.parameterization not in MODEL_PARAMETERIZATIONS:
            raise _field_error(
                "parameterization",
                f"must be one of {MODEL_PARAMETERIZATIONS}, got {self.parameterization!r}",
            )
        try:
            path = path_from_dict(self.path)
        except ValueError as error:
            raise _field_error("path", str(error)) from error
        # Store the full schedule, defaults included, so the file alone fixes the path.
        object.__setattr__(self, "path", path.to_dict())
        if path.to_dict().get("kind") == "linear" and self.parameterization != "velocity":
            # Turning a noise or score prediction into a velocity divides by alpha_t = t, which
            # is 0 where every sampler starts on the linear path.
            raise _field_error(
                "parameterization",
                f"{self.parameterization!r} is singular at t=0 on the linear path; use velocity",
            )
        if not _is_int(self.num_classes) or self.num_classes != self.architecture.num_classes:
            raise _field_error(
                "num_classes",
                f"must equal the architecture's {self.architecture.num_classes}, "
                f"got {self.num_classes!r}",
            )
        if self.default_solver not in SOLVERS:
            raise _field_error(
                "default_solver", f"must be one of {SOLVERS}, got {self.default_solver!r}"
            )
        steps = self.default_num_steps
        if not _is_int(steps) or not 1 <= steps <= _MAX_NUM_STEPS:
            raise _field_error(
                "default_num_steps", f"must be an int in [1, {_MAX_NUM_STEPS}], got {steps!r}"
            )
        if self.dataset is not None and not isinstance(self.dataset, str):
            raise _field_error("dataset", f"must be a string or null, got {self.dataset!r}")
        if not isinstance(self.training, Mapping):
            raise _field_error("training", "must be an object")
        try:
            json.dumps(self.training, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise _field_error(
                "training", f"must hold finite JSON values only ({error})"
            ) from error
        if not isinstance(self.sha256, Mapping):
            raise _field_error("sha256", "must be an object mapping file names to hex digests")
        for file_name, digest in self.sha256.items():
            if not isinstance(file_name, str) or not _is_plain_file_name(file_name):
                raise _field_error("sha256", f"{file_name!r} is not a plain file name")
            if file_name == CONFIG_FILE:
                raise _field_error("sha256", f"cannot list {CONFIG_FILE} itself")
            if not isinstance(digest, str) or not _SHA256_PATTERN.match(digest):
                raise _field_error("sha256", f"{file_name!r}: not 64 lowercase hex digits")

    @property
    def gaussian_path(self) -> GaussianPath:
        """The path object described by `path`."""
        return path_from_dict(self.path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the content of `config.json`."""
        return {
            "format_version": self.format_version,
            "name": self.name,
            "architecture": self.architecture.to_dict(),
            "sample_shape": list(self.sample_shape),
            "parameterization": self.parameterization,
            "path": dict(self.path),
            "num_classes": self.num_classes,
            "default_solver": self.default_solver,
            "default_num_steps": self.default_num_steps,
            "dataset": self.dataset,
            "training": dict(self.training),
            "sha256": dict(sorted(self.sha256.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Parse and validate `config.json` content.

        Raises:
            ModelDirError: naming the first missing, unknown or invalid field.
        """
        if not isinstance(data, Mapping):
            raise ModelDirError(f"config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ModelDirError(f"config has unknown fields {unknown}; allowed: {list(_FIELDS)}")
        for name in _REQUIRED_FIELDS:
            if name not in data:
                raise _field_error(name, "is required")
        # Check the version first: a newer format may change every other field.
        if data["format_version"] != FORMAT_VERSION:
            raise _field_error(
                "format_version",
                f"this flowserve reads version {FORMAT_VERSION}, got {data['format_version']!r}",
            )
        try:
            architecture = NetSpec.from_dict(data["architecture"])
        except ValueError as error:
            raise _field_error("architecture", str(error)) from error
        shape = data["sample_shape"]
        if not isinstance(shape, list):
            raise _field_error("sample_shape", f"must be a list of ints, got {shape!r}")
        return cls(
            name=data["name"],
            architecture=architecture,
            sample_shape=tuple(shape),
            parameterization=data["parameterization"],
            path=data["path"],
            num_classes=data["num_classes"],
            default_solver=data["default_solver"],
            default_num_steps=data["default_num_steps"],
            dataset=data.get("dataset"),
            training=data.get("training", {}),
            sha256=data.get("sha256", {}),
            format_version=data["format_version"],
        )


def _is_plain_file_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def build_net(config: ModelConfig | NetSpec) -> nn.Module:
    """A freshly initialised network of the config's architecture (or of a bare `NetSpec`)."""
    if isinstance(config, NetSpec):
        return build_net_from_spec(config)
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig or NetSpec, got {type(config).__name__}")
    return build_net_from_spec(config.architecture)


@dataclass(frozen=True)
class LoadedModel:
    """A verified model: its config and its network in eval mode with frozen weights.

    Attributes:
        config: the parsed `config.json`.
        net: `forward(x, t, class_labels) -> prediction` in the config's parameterisation.
    """

    config: ModelConfig
    net: nn.Module

    def velocity_fn(
        self, class_labels: Tensor | None = None, guidance_scale: float = 1.0
    ) -> VelocityFn:
        """A velocity function `(x_t, t) -> v` for the solvers.

        Args:
            class_labels: `(batch,)` int64 labels in [0, num_classes] (num_classes = null), or
                None: the null class for conditional models, ignored by unconditional ones.
            guidance_scale: classifier-free guidance weight w (1 = plain conditional).

        Returns:
            `VelocityFn` converting the net's prediction to a velocity on the model's path.
        """
        num_classes = self.config.num_classes
        if class_labels is not None:
            if not isinstance(class_labels, Tensor) or class_labels.dtype != torch.int64:
                raise ValueError("class_labels must be an int64 tensor of shape (batch,)")
            if class_labels.dim() != 1:
                raise ValueError(f"class_labels must be 1-D, got shape {tuple(class_labels.shape)}")
            if num_classes == 0:
                raise ValueError(
                    f"class_labels given but model {self.config.name!r} is unconditional"
                )
            if bool((class_labels < 0).any()) or bool((class_labels > num_classes).any()):
                raise ValueError(
                    f"class_labels must lie in [0, {num_classes}] ({num_classes} = null)"
                )
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
            raise ValueError(f"guidance_scale must be a float, got {guidance_scale!r}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        if num_classes == 0 and guidance_scale != 1.0:
            raise ValueError("guidance_scale must be 1.0 for an unconditional model")
        return velocity_field(
            self.net,
            self.config.gaussian_path,
            self.config.parameterization,
            class_labels=class_labels,
            guidance_scale=float(guidance_scale),
            null_label=num_classes if num_classes > 0 else None,
        )


def _skeleton(config: ModelConfig) -> nn.Module:
    """The architecture on the meta device: names, shapes and dtypes, no storage, no RNG use."""
    with torch.device("meta"):
        return build_net(config)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Parse and validate a model directory's `config.json` without touching the weights.

    Raises:
        ModelDirError: missing directory or file, invalid JSON, or an invalid field.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ModelDirError(f"{directory}: not a directory")
    config_path = directory / CONFIG_FILE
    try:
        raw = config_path.read_bytes()
    except FileNotFoundError:
        raise ModelDirError(f"{directory}: missing {CONFIG_FILE}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    # ValueError: undecodable, not JSON, or an int beyond Python's 4300-digit limit;
    # RecursionError: nesting deeper than the interpreter's recursion limit.
    except (ValueError, RecursionError) as error:
        raise ModelDirError(f"{config_path}: not valid JSON ({error})") from error
    try:
        return ModelConfig.from_dict(data)
    except ModelDirError as error:
        raise ModelDirError(f"{config_path}: {error}") from error


def load_model_dir(path: str | os.PathLike[str], verify: bool = True) -> LoadedModel:
    """Load and check a model directory.

    Checks, in order: the config parses and validates; with `verify`, every file listed in
    `sha256` exists and matches its digest; the weights parse as safetensors; their names,
    shapes and dtypes are exactly those of the architecture; every value is finite.

    Args:
        path: the model directory.
        verify: check sha256 digests (the weights are always checked for shape and finiteness).

    Returns:
        The config and the network (eval mode, `requires_grad` off).

    Raises:
        ModelDirError: on any problem, naming the file and the check that failed.
    """
    directory = Path(path)
    config = read_config(directory)
    if WEIGHTS_FILE not in config.sha256:
        raise ModelDirError(f"{directory}: {CONFIG_FILE} has no sha256 for {WEIGHTS_FILE}")
    if verify:
        for file_name, expected in config.sha256.items():
            if file_name == WEIGHTS_FILE:
                continue  # hashed below from the same bytes that are parsed
            file_path = directory / file_name
            if not file_path.is_file():
                raise ModelDirError(f"{directory}: missing {file_name} (listed in sha256)")
            if sha256_file(file_path) != expected:
                raise ModelDirError(f"{file_path}: sha256 mismatch")
    weights_path = directory / WEIGHTS_FILE
    try:
        raw = weights_path.read_bytes()
    except FileNotFoundError:
        raise ModelDirError(f"{directory}: missing {WEIGHTS_FILE}") from None
    # Hash and parse the same bytes so that nothing can change the file in between.
    if verify and hashlib.sha256(raw).hexdigest() != config.sha256[WEIGHTS_FILE]:
        raise ModelDirError(f"{weights_path}: sha256 mismatch")
    try:
        tensors = load_safetensors_bytes(raw)
    except Exception as error:  # safetensors raises its own error types for corrupt input
        raise ModelDirError(f"{weights_path}: not a valid safetensors file ({error})") from error
    net = _skeleton(config)
    try:
        check_state_dict(net, tensors)
    except ModelDirError as error:
        raise ModelDirError(f"{weights_path}: {error}") from error
    # assign=True adopts the file's tensors as the parameters: no random init to overwrite.
    net.load_state_dict(tensors, strict=True, assign=True)
    net.eval()
    net.requires_grad_(False)
    return LoadedModel(config=config, net=net)


def check_state_dict(net: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Require names, shapes and dtypes exactly those of `net`, and finite values.

    Raises:
        ModelDirError: listing missing or unexpected names, or the first mismatch.
    """
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ModelDirError(
            f"weights do not match the architecture: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for name, reference in expected.items():
        tensor = state_dict[name]
        if not isinstance(tensor, Tensor):
            raise ModelDirError(f"weight {name!r} is not a tensor")
        if tensor.shape != reference.shape:
            raise ModelDirError(
                f"weight {name!r} has shape {tuple(tensor.shape)}, "
                f"the architecture needs {tuple(reference.shape)}"
            )
        if tensor.dtype != reference.dtype:
            raise ModelDirError(
                f"weight {name!r} has dtype {tensor.dtype}, "
                f"the architecture needs {reference.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelDirError(f"weight {name!r} has non-finite values")


def write_model_dir(
    dest: str | os.PathLike[str],
    config: ModelConfig,
    state_dict: Mapping[str, Tensor],
    overwrite: bool = False,
) -> ModelConfig:
    """Write a model directory atomically.

    The files are written into a hidden temporary directory beside `dest`, their sha256s go
    into `config.json`, the result is loaded back with `verify=True`, and only then is it
    renamed into place. On any failure the temporary directory is removed and `dest` is
    untouched, so readers never see a partial directory.

    Args:
        dest: the model directory to create (its parent is created if needed).
        config: the model's config; its `sha256` is replaced by the digests of the written files.
        state_dict: weights matching `config.architecture` exactly.
        overwrite: replace an existing `dest` (swapped in by rename; the old one is deleted).

    Returns:
        The config as written, with `sha256` filled in.

    Raises:
        ModelDirError: `dest` exists without `overwrite`, or the weights do not match.
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    destination = Path(dest)
    if destination.exists() and not overwrite:
        raise ModelDirError(f"{destination}: already exists (pass overwrite=True to replace it)")
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(name, str) and isinstance(value, Tensor) for name, value in state_dict.items()
    ):
        raise ValueError("state_dict must map parameter names (str) to tensors")
    # Detach into plain contiguous CPU float tensors: safetensors refuses shared storage.
    tensors = {
        name: value.detach().cpu().contiguous().clone() for name, value in state_dict.items()
    }
    check_state_dict(_skeleton(config), tensors)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    )
    try:
        weights_path = staging / WEIGHTS_FILE
        save_file(tensors, str(weights_path), metadata={"format": "pt"})
        written = replace(config, sha256={WEIGHTS_FILE: sha256_file(weights_path)})
        config_text = json.dumps(written.to_dict(), indent=2, allow_nan=False) + "\n"
        (staging / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        for file_path in (weights_path, staging / CONFIG_FILE):
            # mkdtemp and safetensors create owner-only modes; a store is shared read-only.
            file_path.chmod(0o644)
            _fsync(file_path)
        staging.chmod(0o755)
        load_model_dir(staging, verify=True)
        _promote(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _fsync(file_path: Path) -> None:
    with open(file_path, "rb") as handle:
        os.fsync(handle.fileno())


def _promote(staging: Path, destination: Path) -> None:
    """Rename the staged directory into place, swapping out an existing one if present."""
    if not destination.exists():
        os.rename(staging, destination)
        return
    retired = Path(
        tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old.tmp", dir=destination.parent)
    )
    os.rename(destination, retired / "dir")
    try:
        os.rename(staging, destination)
    except BaseException:
        os.rename(retired / "dir", destination)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)
