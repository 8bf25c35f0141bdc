"""Model lifecycle: validate, version, promote and hot-swap model versions.

Two ways in, one pipeline. `push` takes a `ModelAdmin.PushModel` stream into
`STORE/.staging/push-*/`; `poll_once` (directory mode) finds version directories that ops or a
training job dropped into `STORE/NAME/VERSION/`. Both go through the same checks
(`server.push_checks`, then the quality gate against the serving version), load and warm the
new version up beside the running one, and only then swap the serving pointer
(`server.live_store.LiveStore`). A pushed version appears atomically: the staged directory is
renamed to `NAME/VERSION` (the next integer) once it has passed; a rejected push leaves nothing.
`set_serving` pins a version (or unpins) in `NAME/serving.json`, so a restart serves the same
one. One lock serialises every change, so versions are numbered without races.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flowserve.modeldir import LoadedModel, ModelDirError, load_model_dir
from protos.flowserve.v1 import flowserve_pb2 as pb
from server.config import PushConfig, StoreConfig
from server.engine import Engine
from server.errors import InvalidArgument, ModelNotFound, PushRejected, VersionUnavailable
from server.live_store import LiveStore
from server.metrics import ServerMetrics
from server.push_checks import (
    check_onnx,
    load_checked,
    rebuild_exports,
    rename_model,
    smoke_test,
)
from server.push_receive import receive_push
from server.quality import QualityMeter, QualityScore
from server.store import (
    ModelEntry,
    StoreError,
    available_backends,
    load_version,
    parse_version,
    read_serving_pin,
    valid_versions,
    write_serving_pin,
)
from server.warmup import WarmupFailed, warm_up

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
_POLL_JOIN_SECONDS = 30.0


@dataclass(frozen=True)
class PushOutcome:
    """A promoted push.

    Attributes:
        entry: The pushed version, loaded.
        serving_version: The version serving now (the pushed one unless another is pinned).
    """

    entry: ModelEntry
    serving_version: int


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes of a directory's files: changes while it is being written."""
    try:
        return tuple(
            (child.name, child.stat().st_size, child.stat().st_mtime_ns)
            for child in sorted(directory.iterdir())
        )
    except OSError:
        return ()


class ModelLifecycle:
    """Pushes, directory mode and pins of one server's model store."""

    def __init__(
        self,
        live: LiveStore,
        store_config: StoreConfig,
        push_config: PushConfig,
        engine: Engine,
        metrics: ServerMetrics,
        exact_max_dimension: int,
        device: str,
    ) -> None:
        self._live = live
        self._store_config = store_config
        self._push_config = push_config
        self._engine = engine
        self._metrics = metrics
        self._exact_max_dimension = exact_max_dimension
        self._device = device
        self._meter = QualityMeter(push_config.quality_samples, push_config.quality_seed)
        self._lock = threading.Lock()
        # Version directories already handled (loaded at start-up, pushed, or adopted).
        self._seen: set[tuple[str, int]] = set(self._version_dirs())
        # Dropped-in directories that failed, with their fingerprint (re-checked if it changes).
        self._rejected: dict[tuple[str, int], tuple[tuple[str, int, int], ...]] = {}
        self._reference_scores: dict[tuple[str, int], tuple[QualityScore, ...]] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def root(self) -> Path:
        """The store directory."""
        return self._store_config.path

    @property
    def staging_root(self) -> Path:
        """Where pushes are received (hidden: the loader ignores it)."""
        return self.root / STAGING_DIR

    def prepare_staging(self) -> None:
        """Create the staging directory and clear what a crashed push left there."""
        try:
            self.staging_root.mkdir(exist_ok=True)
            for leftover in self.staging_root.iterdir():
                logger.warning("removing %s left by an interrupted push", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError as error:
            logger.warning("pushes will fail: cannot prepare %s (%s)", self.staging_root, error)

    def _version_dirs(self) -> Iterator[tuple[str, int]]:
        for model_dir in sorted(self.root.iterdir()):
            if model_dir.name.startswith(".") or not model_dir.is_dir():
                continue
            for child in sorted(model_dir.iterdir()):
                version = parse_version(child.name)
                if version is not None and child.is_dir():
                    yield model_dir.name, version

    # Checks shared by pushes and directory mode.

    def _check(self, directory: Path, name: str | None, force: bool) -> LoadedModel:
        loaded = load_checked(directory, name)
        smoke_test(loaded, self._push_config)
        check_onnx(directory, loaded)
        self._quality_gate(loaded, force)
        rebuild_exports(directory, self._store_config.backend)
        return loaded

    def _reference_scores_of(self, entry: ModelEntry) -> tuple[QualityScore, ...]:
        """The serving version's scores, measured once per version."""
        key = (entry.name, entry.version)
        if key not in self._reference_scores:
            serving = load_model_dir(entry.directory, verify=False)
            self._reference_scores[key] = self._meter.measure(serving)
        return self._reference_scores[key]

    def _margin(self, score: QualityScore) -> float:
        if score.relative:
            return self._push_config.quality_margin
        return self._push_config.likelihood_margin

    def _quality_gate(self, loaded: LoadedModel, force: bool) -> None:
        """Refuse a version worse than the serving one by more than a margin on any metric.

        Relative metrics (distances, accuracies) use `push.quality_margin`, a fraction of the
        serving version's value; held-out log-likelihoods use `push.likelihood_margin`, in nats
        per dimension.
        """
        current = self._live.find(loaded.config.name)
        if current is None:
            return
        old_scores = {score.metric: score for score in self._reference_scores_of(current)}
        failures = []
        for new in self._meter.measure(loaded):
            old = old_scores.get(new.metric)
            if old is None:
                continue
            loss, margin = new.loss(old), self._margin(new)
            shown = f"{100 * loss:.1f}% worse" if new.relative else f"worse by {loss:.4g}"
            limit = (
                f"push.quality_margin {100 * margin:.1f}%"
                if new.relative
                else f"push.likelihood_margin {margin:.4g}"
            )
            logger.info(
                "quality gate for %s: %s %.4g vs serving version %d's %.4g (%s)",
                loaded.config.name,
                new.metric,
                new.value,
                current.version,
                old.value,
                shown,
            )
            if loss > margin:
                failures.append(
                    f"{new.metric} is {new.value:.4g} against {old.value:.4g} for serving "
                    f"version {current.version}: {shown}, beyond {limit}"
                )
        if not failures:
            return
        if force:
            logger.warning("quality gate overridden by force for %s", loaded.config.name)
            return
        raise PushRejected(
            "quality gate", "; ".join(failures) + "; retrain, or push with force to override"
        )

    def _load_entry(self, name: str, files: Path, final: Path, version: int) -> ModelEntry:
        """Load a checked version from `files` and warm it up, as `final` will hold it."""
        try:
            served = load_version(name, files, self._store_config, self._device, version)
        except (ModelDirError, ValueError) as error:
            raise VersionUnavailable(f"{name} version {version} does not load: {error}") from None
        entry = ModelEntry(
            model=served,
            directory=final,
            versions=(),
            pinned=False,
            available_backends=available_backends(files, self._device),
        )
        try:
            warm_up(entry, self._engine, self._exact_max_dimension)
        except WarmupFailed as error:
            raise VersionUnavailable(str(error)) from None
        return entry

    def _serve(self, entry: ModelEntry, pinned: bool) -> None:
        versions = tuple(valid_versions(self.root / entry.name))
        self._live.replace(dataclasses.replace(entry, versions=versions, pinned=pinned))
        self._metrics.set_models(self._live.entries())
        logger.info(
            "serving model %s version %d (%s backend)%s",
            entry.name,
            entry.version,
            entry.model.backend.name,
            " pinned" if pinned else "",
        )

    def _refresh_versions(self, name: str) -> None:
        current = self._live.find(name)
        if current is not None:
            versions = tuple(valid_versions(self.root / name))
            self._live.replace(dataclasses.replace(current, versions=versions))

    def _pin(self, name: str) -> int | None:
        try:
            return read_serving_pin(self.root / name)
        except StoreError as error:
            raise VersionUnavailable(f"{error}; fix or remove it first") from None

    def _next_version(self, name: str) -> int:
        model_dir = self.root / name
        existing = [
            version
            for child in (model_dir.iterdir() if model_dir.is_dir() else ())
            if (version := parse_version(child.name)) is not None
        ]
        return max(existing, default=0) + 1

    # Pushes.

    def push(self, chunks: Iterator[pb.PushModelChunk]) -> PushOutcome:
        """Receive, check and promote one pushed version.

        Raises:
            InvalidArgument: a malformed stream.
            PushRejected: a failed check (nothing of the push is kept).
            VersionUnavailable: the version passed its checks but does not load or warm up.
        """
        self.staging_root.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="push-", dir=self.staging_root))
        try:
            received = receive_push(chunks, staging, self._push_config)
            if received.name:
                rename_model(staging, received.name)
            with self._lock:
                loaded = self._check(staging, None, received.force)
                name = loaded.config.name
                pin = self._pin(name)
                version = self._next_version(name)
                final = self.root / name / str(version)
                entry = self._load_entry(name, staging, final, version)
                final.parent.mkdir(exist_ok=True)
                os.rename(staging, final)  # the version appears whole, or not at all
                self._seen.add((name, version))
                logger.info("stored pushed model %s version %d", name, version)
                if received.make_serving:
                    write_serving_pin(final.parent, version)
                    self._serve(entry, pinned=True)
                elif pin is None:
                    self._serve(entry, pinned=False)
                else:
                    self._refresh_versions(name)
                serving = self._live.find(name)
                serving_version = serving.version if serving is not None else version
                return PushOutcome(
                    entry=dataclasses.replace(entry, versions=tuple(valid_versions(final.parent))),
                    serving_version=serving_version,
                )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # Pins and rollbacks.

    def set_serving(self, name: str, version: int) -> ModelEntry:
        """Pin `version` of model `name` (0: unpin, serve the highest valid version).

        Raises:
            InvalidArgument: a negative version.
            ModelNotFound: no such model or version in the store.
            VersionUnavailable: the version does not load or warm up.
        """
        if version < 0:
            raise InvalidArgument("version", f"must be >= 0 (0 removes the pin), got {version}")
        model_dir = self.root / name
        if not name or name.startswith(".") or "/" in name or not model_dir.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the store")
        with self._lock:
            versions = valid_versions(model_dir)
            if version and version not in versions:
                raise ModelNotFound(
                    f"model {name!r} has no valid version {version} (valid versions: {versions})"
                )
            candidates = [version] if version else sorted(versions, reverse=True)
            current = self._live.find(name)
            failures = []
            for candidate in candidates:
                directory = model_dir / str(candidate)
                if current is not None and current.version == candidate:
                    # Serving from memory says nothing about the files, and the pin is what a
                    # restart loads: a version whose files were deleted or corrupted since it
                    # was loaded would take the model out of service at the next start.
                    try:
                        load_model_dir(directory, verify=self._store_config.verify)
                    except ModelDirError as error:
                        failures.append(
                            f"{name} version {candidate} serves from memory but its files no "
                            f"longer load: {error}"
                        )
                        continue
                    entry = current
                else:
                    try:
                        entry = self._load_entry(name, directory, directory, candidate)
                    except VersionUnavailable as error:
                        failures.append(str(error))
                        continue
                write_serving_pin(model_dir, version or None)
                self._serve(entry, pinned=bool(version))
                found = self._live.find(name)
                assert found is not None
                return found
            raise VersionUnavailable("; ".join(failures) or f"model {name!r} has no valid version")

    # Directory mode.

    def poll_once(self) -> list[tuple[str, int]]:
        """Check version directories that appeared since the last look; serve passing ones.

        A new version serves if it is the model's highest and nothing is pinned; one that
        fails a check is logged and skipped (and looked at again only if its files change).

        Returns:
            The (name, version) pairs adopted by this call.
        """
        adopted = []
        for name, version in list(self._version_dirs()):
            key = (name, version)
            directory = self.root / name / str(version)
            fingerprint = _fingerprint(directory)
            if key in self._seen or self._rejected.get(key) == fingerprint:
                continue
            with self._lock:
                if key in self._seen:  # a push stored it while this poll was listing
                    continue
                try:
                    self._adopt(name, directory, version)
                except (PushRejected, VersionUnavailable) as error:
                    logger.warning("not serving dropped-in %s: %s", directory, error)
                    self._rejected[key] = fingerprint
                    continue
                self._seen.add(key)
                adopted.append(key)
        return adopted

    def _adopt(self, name: str, directory: Path, version: int) -> None:
        self._check(directory, name, force=False)
        entry = self._load_entry(name, directory, directory, version)
        current = self._live.find(name)
        if self._pin(name) is None and (current is None or version > current.version):
            self._serve(entry, pinned=False)
        else:
            self._refresh_versions(name)
            self._metrics.set_models(self._live.entries())
        logger.info("adopted dropped-in model %s version %d", name, version)

    def start_polling(self) -> None:
        """Poll the store every `store.poll_seconds` in a daemon thread (0: never)."""
        if self._store_config.poll_seconds <= 0 or self._poller is not None:
            return
        self._poller = threading.Thread(
            target=self._poll_loop, name="flowserve-store-poll", daemon=True
        )
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self._store_config.poll_seconds):
            try:
                self.poll_once()
            except Exception:
                logger.exception("polling the model store failed; trying again next time")

    def stop(self) -> None:
        """Stop polling (waits for a poll in progress, bounded)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(_POLL_JOIN_SECONDS)
