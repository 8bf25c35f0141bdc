"""The model store manager: loads the serving version of every model in the store directory.

Layout: `STORE/NAME/VERSION/` (VERSION a positive integer) holding a model directory
(`flowserve.modeldir`), and optionally `STORE/NAME/serving.json` = `{"version": N}` to pin the
serving version. Without a pin the serving version is the highest one that loads and verifies;
versions that fail are skipped with the reason logged. A pin to a version that does not load
takes the model out of service (logged as an error) rather than silently serving another.
Hidden entries (names starting with ".") are staging directories and are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from export.contract import SAMPLER_FILE
from flowserve.modeldir import LoadedModel, ModelDirError, load_model_dir, read_config
from server.config import StoreConfig
from server.engine import (
    Backend,
    ServedModel,
    WholeLoopSampler,
    load_backend,
    load_whole_loop_sampler,
)
from server.errors import ModelNotFound

SERVING_FILE = "serving.json"
# Optional exported files and the backend each enables.
_EXPORT_FILES: tuple[tuple[str, str], ...] = (
    ("model.ts", "torchscript"),
    ("model.onnx", "onnxruntime"),
)

logger = logging.getLogger(__name__)


class StoreError(Exception):
    """The store directory itself is unusable (missing, not a directory)."""


@dataclass(frozen=True)
class ModelEntry:
    """One served model.

    Attributes:
        model: The loaded serving version, as the engine runs it.
        directory: The serving version's directory.
        versions: Versions whose config.json validates (minus those that failed to load),
            ascending. Only the serving one has been fully verified.
        pinned: Whether serving.json chose the serving version.
        available_backends: Backends this version's files allow.
    """

    model: ServedModel
    directory: Path
    versions: tuple[int, ...]
    pinned: bool
    available_backends: tuple[str, ...]

    @property
    def name(self) -> str:
        """The model's name."""
        return self.model.name

    @property
    def version(self) -> int:
        """The serving version."""
        return self.model.version


def parse_version(name: str) -> int | None:
    """The version number of a directory name ("3" -> 3), or None if it is not one."""
    if not name.isdigit() or name.startswith("0") or not name.isascii():
        return None
    return int(name)


def read_serving_pin(model_dir: Path) -> int | None:
    """The version pinned by `model_dir/serving.json`, or None when there is no pin.

    Raises:
        StoreError: the file exists but is not `{"version": N}` with N >= 1.
    """
    path = model_dir / SERVING_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{path}: unreadable ({error})") from error
    version = data.get("version") if isinstance(data, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreError(f'{path}: must be {{"version": N}} with N >= 1, got {data!r}')
    return version


def write_serving_pin(model_dir: Path, version: int | None) -> None:
    """Pin `version` in `model_dir/serving.json` (None removes the pin), atomically: readers
    see the old file or the new one, never a partial one."""
    path = model_dir / SERVING_FILE
    if version is None:
        path.unlink(missing_ok=True)
        return
    fd, staging = tempfile.mkstemp(prefix=f".{SERVING_FILE}.", dir=model_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"version": version}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def available_backends(version_dir: Path, device: str) -> tuple[str, ...]:
    """Backends whose files are present in a version directory."""
    kinds = ["eager"]
    kinds += [kind for file, kind in _EXPORT_FILES if (version_dir / file).is_file()]
    if device.startswith("cuda"):
        kinds.append("triton-fused")
    return tuple(kinds)


def valid_versions(model_dir: Path) -> list[int]:
    """Versions whose config.json validates and names this model, ascending."""
    versions = []
    for child in sorted(model_dir.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        version = parse_version(child.name)
        if version is None:
            logger.warning("skipping %s: not a positive integer version", child)
            continue
        try:
            config = read_config(child)
        except ModelDirError as error:
            logger.warning("skipping %s: %s", child, error)
            continue
        if config.name != model_dir.name:
            logger.warning(
                "skipping %s: config.json names model %r, the directory %r",
                child,
                config.name,
                model_dir.name,
            )
            continue
        versions.append(version)
    return sorted(versions)


def _backend(kind: str, version_dir: Path, loaded: LoadedModel, device: str) -> Backend:
    try:
        return load_backend(kind, version_dir, loaded, device)
    except ValueError as error:
        logger.warning("%s: backend %s unavailable (%s); using eager", version_dir, kind, error)
        return load_backend("eager", version_dir, loaded, device)


def load_version(
    name: str, version_dir: Path, config: StoreConfig, device: str, version: int | None = None
) -> ServedModel:
    """Load, verify and wrap one version directory.

    `version` defaults to the directory's name; a staged directory (not yet renamed into
    place) passes the number it will have.

    Raises:
        ModelDirError: the directory fails a check of `flowserve.modeldir.load_model_dir`.
        ValueError: the eager backend cannot be built on `device`.
    """
    loaded = load_model_dir(version_dir, verify=config.verify)
    eager = load_backend("eager", version_dir, loaded, device)
    backend = (
        eager
        if config.backend == "eager"
        else _backend(config.backend, version_dir, loaded, device)
    )
    return ServedModel(
        name=name,
        version=int(version_dir.name) if version is None else version,
        config=loaded.config,
        backend=backend,
        eager=eager,
        whole_loop=_whole_loop(version_dir, backend, device),
    )


def _whole_loop(version_dir: Path, backend: Backend, device: str) -> WholeLoopSampler | None:
    """The exported whole-loop sampler, when the model is served through onnxruntime on the CPU.

    Only there: serving through onnxruntime is the choice to run the exported graphs, and on a
    GPU the per-step network call is not the bottleneck a CPU loop's overhead is at batch 1.
    """
    if backend.name != "onnxruntime" or torch.device(device).type != "cpu":
        return None
    if not (version_dir / SAMPLER_FILE).is_file():
        return None
    try:
        return load_whole_loop_sampler(version_dir)
    except Exception as error:  # onnxruntime raises its own types for a graph it cannot load
        logger.warning(
            "%s: %s unusable (%s); serving step by step", version_dir, SAMPLER_FILE, error
        )
        return None


def load_model(model_dir: Path, config: StoreConfig, device: str) -> ModelEntry | None:
    """Load the serving version of the model in `model_dir`, or None (reason logged)."""
    versions = valid_versions(model_dir)
    try:
        pin = read_serving_pin(model_dir)
    except StoreError as error:
        logger.error("not serving model %s: %s", model_dir.name, error)
        return None
    if pin is not None and pin not in versions:
        logger.error(
            "not serving model %s: serving.json pins version %d, valid versions are %s",
            model_dir.name,
            pin,
            versions,
        )
        return None
    candidates = [pin] if pin is not None else sorted(versions, reverse=True)
    failed: set[int] = set()
    for version in candidates:
        version_dir = model_dir / str(version)
        try:
            served = load_version(model_dir.name, version_dir, config, device)
        except (ModelDirError, ValueError) as error:
            logger.warning("skipping %s: %s", version_dir, error)
            failed.add(version)
            continue
        logger.info(
            "serving model %s version %d (%s backend)%s",
            served.name,
            version,
            served.backend.name,
            " pinned by serving.json" if pin is not None else "",
        )
        return ModelEntry(
            model=served,
            directory=version_dir,
            versions=tuple(v for v in versions if v not in failed),
            pinned=pin is not None,
            available_backends=available_backends(version_dir, device),
        )
    logger.error("not serving model %s: no version loads (tried %s)", model_dir.name, candidates)
    return None


class ServedModels(Protocol):
    """What request handlers read: `ModelStore`, or `server.lifecycle.LiveStore` whose
    snapshot changes when a version is promoted."""

    def get(self, name: str, version: int = 0) -> ModelEntry:
        """The served model `name` (see `ModelStore.get`)."""
        ...

    def entries(self) -> tuple[ModelEntry, ...]:
        """Every served model, sorted by name."""
        ...

    def names(self) -> tuple[str, ...]:
        """The served models' names, sorted."""
        ...

    def __len__(self) -> int: ...


class ModelStore:
    """The served models by name; immutable once built."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._entries = {entry.name: entry for entry in sorted(entries, key=lambda e: e.name)}

    @classmethod
    def load(cls, config: StoreConfig, device: str) -> ModelStore:
        """Scan the store directory and load every model's serving version.

        Raises:
            StoreError: the store directory does not exist.
        """
        root = config.path
        if not root.is_dir():
            raise StoreError(f"model store {root} is not a directory")
        entries = []
        for model_dir in sorted(root.iterdir()):
            if model_dir.name.startswith(".") or not model_dir.is_dir():
                continue
            entry = load_model(model_dir, config, device)
            if entry is not None:
                entries.append(entry)
        if not entries:
            logger.warning("model store %s holds no servable model", root)
        return cls(entries)

    def entries(self) -> tuple[ModelEntry, ...]:
        """Every served model, sorted by name."""
        return tuple(self._entries.values())

    def names(self) -> tuple[str, ...]:
        """The served models' names, sorted."""
        return tuple(self._entries)

    def get(self, name: str, version: int = 0) -> ModelEntry:
        """The served model `name`, checked against a requested version (0 = serving).

        Raises:
            ModelNotFound: no such model, or `version` is not the one being served.
        """
        entry = self._entries.get(name)
        if entry is None:
            served = ", ".join(self._entries) or "none"
            raise ModelNotFound(f"model {name!r} is not served (served models: {served})")
        if version not in (0, entry.version):
            known = "exists but is not loaded" if version in entry.versions else "does not exist"
            raise ModelNotFound(
                f"model {name!r} version {version} {known}; this server serves version "
                f"{entry.version} (send version 0 for the serving version)"
            )
        return entry

    def with_entry(self, entry: ModelEntry) -> ModelStore:
        """A store where `entry` replaces (or adds) the model of its name."""
        return ModelStore([*(e for e in self._entries.values() if e.name != entry.name), entry])

    def without(self, name: str) -> ModelStore:
        """A store without model `name` (used when its warm-up fails)."""
        return ModelStore(e for e in self._entries.values() if e.name != name)

    def __len__(self) -> int:
        return len(self._entries)
