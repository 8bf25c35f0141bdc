"""TorchServe as a benchmark peer: the `.mar` our export builds, served over REST on loopback.

`TorchServePeer` archives a flowserve model directory with `export.mar.build_mar` (the very
function `flowserve export DIR --format mar` calls; the model directory itself is not touched),
starts TorchServe from this environment (Java frontend + one Python worker running
`export/torchserve_handler.py`), waits (bounded) for the worker to be READY, answers
`predict(...)` over the REST inference API on one keep-alive connection, and stops the whole
process group (bounded) on exit. Everything it writes (archive, config.properties, pid file,
worker sockets, logs) lives in one temporary directory that is removed afterwards.

Settings (TorchServe's defaults unless said otherwise):

* 1 worker, batch size 1: the archive's `model-config.yaml` (minWorkers = maxWorkers = 1,
  batchSize 1, responseTimeout 120 s). `batch_size` > 1 rewrites that file inside the temporary
  copy of the archive (with `max_batch_delay_ms`, TorchServe's default 100 ms): the archive is
  where the export puts serving settings, and TorchServe 0.12 answers management-API model
  registration with 405 unless started with `--enable-model-api`.
* Token authorization off, config snapshots off (`--ncs`), no per-model pip installs, and
  no system-metrics collection (`disable_system_metrics`): it spawns a Python process every
  minute, whose start-up would land in the latency samples.
* `OMP_NUM_THREADS` = `torch_threads` (1 by default) for the worker, matched by flowserve's
  `--torch-threads` in `main()`, so both run the network on the same number of cores.
* JVM `-Xmx512m -XX:+UseSerialGC`: bounded memory beside other jobs, and no concurrent GC threads
  competing with the worker for the machine's cores.

The performance report (`bench/report_serving.py`) times it against flowserve. Usage:

    with TorchServePeer(model_dir) as peer:
        samples = peer.predict(None, num_steps=50, solver="heun", seed=7)
        print(peer.startup_seconds, samples.shape)
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from bench.peers.processes import free_ports, log_tail
from export.mar import build_mar
from flowserve.modeldir import read_config

START_TIMEOUT_SECONDS = 180.0
STOP_TIMEOUT_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 120.0
MODEL_CONFIG_FILE = "model-config.yaml"
JVM_ARGS = "-Xmx512m -XX:+UseSerialGC"


class PeerError(RuntimeError):
    """A benchmark peer failed to start, answered with an error, or could not be reached."""


def seeded_noise(seed: int, num_samples: int, sample_shape: Sequence[int]) -> np.ndarray:
    """The x_0 both servers draw for a seed: `torch.randn` from a seeded CPU generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((num_samples, *sample_shape), generator=generator).numpy()


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc.

    Zombies are left out: an orphan's zombie waits for whichever process adopts it, not us.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # Fields after "(comm)": state, ppid, pgrp, ...; comm may itself hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _stop_group(process: subprocess.Popen[Any], timeout: float) -> bool:
    """SIGTERM a process's group, wait up to `timeout` s for all of it, then SIGKILL the rest.

    Returns True when SIGTERM sufficed.

    The process was started with `start_new_session=True`, so its group holds everything it
    spawned (TorchServe: launcher, JVM, Python worker). Waiting for the whole group, not only
    the leader, lets the JVM finish its shutdown hook (which stops the worker) after the
    launcher is gone.
    """
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    clean = True
    while True:
        process.poll()  # reap the leader, or it stays a member as a zombie
        if not _group_members(process.pid):
            break
        if time.monotonic() > deadline:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            clean = False
            break
        time.sleep(0.1)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    return clean


class KeepAliveJson:
    """JSON POSTs over one persistent HTTP/1.1 connection (no connection set-up per request).

    A connection the server closed is reopened once and the request retried (sampling is
    idempotent for a fixed seed); `reconnects` counts that, so a benchmark can tell.
    """

    def __init__(self, host: str, port: int, timeout: float = REQUEST_TIMEOUT_SECONDS) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.reconnects = 0
        self._connection = http.client.HTTPConnection(host, port, timeout=timeout)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """POST `body` as JSON; returns the status and the response body."""
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Connection": "keep-alive"}
        for attempt in range(2):
            try:
                self._connection.request("POST", path, body=payload, headers=headers)
                response = self._connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._connection.close()
                if attempt == 1:
                    raise
                self.reconnects += 1
                self._connection = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()


class TorchServePeer:
    """TorchServe serving one flowserve model directory, as a context manager.

    Args:
        model_dir: A flowserve model directory (`config.json` + `model.safetensors`); its
            config's name is the TorchServe model name. Only read.
        batch_size: TorchServe's batchSize (1, the archive's setting, by default). The handler
            answers a batch's requests one after another, so > 1 only saves frontend <-> worker
            round trips.
        max_batch_delay_ms: How long TorchServe waits to fill a batch (used when batch_size > 1).
        torch_threads: OMP_NUM_THREADS of the worker, i.e. torch's intra-op threads.
        start_timeout: Seconds to wait for the worker to be READY.
        stop_timeout: Seconds to wait after SIGTERM before SIGKILL.

    Attributes (once started):
        startup_seconds: From launching `torchserve` to the worker being READY.
        first_request_seconds: The first prediction after READY (lazy initialisation).
        stop_seconds, stopped_cleanly: How long `stop()` took, and whether SIGTERM sufficed.
        url_path: The REST path of predictions, `/predictions/NAME`.
        sample_shape: The model's sample shape.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        batch_size: int = 1,
        max_batch_delay_ms: int = 100,
        torch_threads: int = 1,
        start_timeout: float = START_TIMEOUT_SECONDS,
        stop_timeout: float = STOP_TIMEOUT_SECONDS,
    ) -> None:
        if batch_size < 1 or max_batch_delay_ms < 0 or torch_threads < 1:
            raise ValueError(
                "batch_size and torch_threads must be >= 1 and max_batch_delay_ms >= 0, got "
                f"{batch_size}, {torch_threads}, {max_batch_delay_ms}"
            )
        self.model_dir = Path(model_dir)
        config = read_config(self.model_dir)
        self.model_name = config.name
        self.sample_shape: tuple[int, ...] = tuple(config.sample_shape)
        self.batch_size = batch_size
        self.max_batch_delay_ms = max_batch_delay_ms
        self.torch_threads = torch_threads
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.url_path = f"/predictions/{self.model_name}"
        self.startup_seconds = float("nan")
        self.first_request_seconds = float("nan")
        self.stop_seconds = float("nan")
        self.stopped_cleanly = False
        self.inference_port = self.management_port = 0
        self._started_at = 0.0
        self._root: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._client: KeepAliveJson | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> TorchServePeer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        """TorchServe's stdout and stderr (its log4j files are in `logs/` beside it)."""
        if self._root is None:
            raise PeerError("TorchServe is not running")
        return Path(self._root.name) / "torchserve.log"

    def start(self) -> None:
        """Archive the model, start TorchServe and wait until its worker answers.

        Raises:
            PeerError: java or torchserve is missing, TorchServe exited, or it was not READY
                within `start_timeout` (the log's tail is in the message). Nothing is left
                running or on disk then.
        """
        if self._process is not None:
            raise PeerError("TorchServe is already running")
        launcher = Path(sys.executable).with_name("torchserve")
        if not launcher.is_file():
            raise PeerError(f"torchserve is not installed beside {sys.executable}")
        if shutil.which("java") is None and "JAVA_HOME" not in os.environ:
            raise PeerError("TorchServe needs java on PATH (or JAVA_HOME)")
        self._root = tempfile.TemporaryDirectory(prefix="flowserve-torchserve-")
        try:
            self._launch(launcher, Path(self._root.name))
            self._wait_ready()
            self._client = KeepAliveJson("127.0.0.1", self.inference_port)
            start = time.perf_counter()
            self.predict(None, num_steps=1, solver="euler", seed=0)
            self.first_request_seconds = time.perf_counter() - start
        except BaseException:
            self.stop()
            raise

    def _launch(self, launcher: Path, root: Path) -> None:
        store, scratch = root / "model-store", root / "tmp"
        store.mkdir()
        scratch.mkdir()
        archive = store / f"{self.model_name}.mar"
        build_mar(self.model_dir, archive, self.model_name)
        if self.batch_size != 1:
            self._rewrite_model_config(archive)
        inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
        self.inference_port, self.management_port = inference, management
        properties = root / "config.properties"
        # gRPC ports too: TorchServe opens them whether used or not, and its defaults (7070,
        # 7071) would clash with another instance on the machine.
        properties.write_text(
            f"inference_address=http://127.0.0.1:{inference}\n"
            f"management_address=http://127.0.0.1:{management}\n"
            f"metrics_address=http://127.0.0.1:{metrics}\n"
            f"grpc_inference_port={grpc_inference}\n"
            f"grpc_management_port={grpc_management}\n"
            "disable_token_authorization=true\n"
            "default_workers_per_model=1\n"
            "install_py_dep_per_model=false\n"
            "disable_system_metrics=true\n"
            f"vmargs={JVM_ARGS}\n",
            encoding="utf-8",
        )
        # TMPDIR/TEMP hold the pid file, worker sockets and unpacked archive (TEMP becomes
        # java.io.tmpdir); LOG_LOCATION/METRICS_LOCATION and cwd keep logs/ in `root` too.
        env = {
            **os.environ,
            "TMPDIR": str(scratch),
            "TEMP": str(scratch),
            "LOG_LOCATION": str(root / "logs"),
            "METRICS_LOCATION": str(root / "logs"),
            "OMP_NUM_THREADS": str(self.torch_threads),
        }
        self._log = (root / "torchserve.log").open("wb")
        self._started_at = time.perf_counter()
        self._process = subprocess.Popen(
            [
                str(launcher),
                "--start",
                "--foreground",
                "--ncs",
                "--disable-token-auth",
                "--model-store",
                str(store),
                "--models",
                f"{self.model_name}={archive.name}",
                "--ts-config",
                str(properties),
            ],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _rewrite_model_config(self, archive: Path) -> None:
        """Set batchSize/maxBatchDelay in the archive's model-config.yaml (a zip member)."""
        with zipfile.ZipFile(archive) as source:
            members = [(info, source.read(info)) for info in source.infolist()]
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as target:
            for info, data in members:
                if info.filename == MODEL_CONFIG_FILE:
                    text = re.sub(r"(?m)^(batchSize|maxBatchDelay):.*\n", "", data.decode())
                    text += f"batchSize: {self.batch_size}\n"
                    text += f"maxBatchDelay: {self.max_batch_delay_ms}\n"
                    data = text.encode()
                target.writestr(info, data)

    def describe(self) -> dict[str, Any]:
        """TorchServe's management description of the model (batch size, workers, ...)."""
        url = f"http://127.0.0.1:{self.management_port}/models/{self.model_name}"
        with urllib.request.urlopen(url, timeout=10) as response:
            described = json.loads(response.read())
        return dict(described[0])

    def _wait_ready(self) -> None:
        """Poll the management API until every worker is READY (bounded by start_timeout)."""
        assert self._process is not None
        deadline = self._started_at + self.start_timeout
        while True:
            if self._process.poll() is not None:
                raise PeerError(
                    f"TorchServe exited with {self._process.returncode}:\n{log_tail(self.log_path)}"
                )
            try:
                workers = self.describe().get("workers", [])
                if workers and all(worker.get("status") == "READY" for worker in workers):
                    self.startup_seconds = time.perf_counter() - self._started_at
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, IndexError):
                pass  # frontend not listening yet, or the model not registered yet
            if time.perf_counter() > deadline:
                raise PeerError(
                    f"TorchServe not READY within {self.start_timeout:.0f} s:\n"
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(0.25)
        described = self.describe()
        if described.get("batchSize") != self.batch_size:
            raise PeerError(f"TorchServe runs batchSize {described.get('batchSize')}")

    def stop(self) -> None:
        """Stop TorchServe (SIGTERM to its process group, SIGKILL after stop_timeout) and
        remove the temporary directory. Safe to call twice."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            start = time.perf_counter()
            self.stopped_cleanly = _stop_group(self._process, self.stop_timeout)
            self.stop_seconds = time.perf_counter() - start
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._root is not None:
            self._root.cleanup()
            self._root = None

    # -- requests --------------------------------------------------------------------------

    def connection(self) -> KeepAliveJson:
        """A new keep-alive connection of its own (for concurrent clients); close it after."""
        return KeepAliveJson("127.0.0.1", self.inference_port)

    def request(self, body: dict[str, Any], client: KeepAliveJson | None = None) -> dict[str, Any]:
        """POST one JSON request (see `export.sampling_service`) and return the JSON answer.

        Raises:
            PeerError: TorchServe answered with a status other than 200.
        """
        client = client or self._client
        if client is None:
            raise PeerError("TorchServe is not running")
        status, raw = client.post(self.url_path, body)
        if status != 200:
            raise PeerError(f"TorchServe answered {status}: {raw.decode(errors='replace')}")
        reply: dict[str, Any] = json.loads(raw)
        return reply

    def predict(
        self,
        noise: np.ndarray | None,
        num_steps: int,
        solver: str,
        seed: int,
        *,
        num_samples: int = 1,
        client: KeepAliveJson | None = None,
    ) -> np.ndarray:
        """Samples at t=1 as float32 `(num_samples, *sample_shape)`.

        The handler takes a seed, not noise: it draws x_0 as `seeded_noise(seed, ...)`. So
        `noise`, when given, must be exactly that array (checked; its first dimension sets
        the sample count) and is not sent; None sends `num_samples` with the seed.

        Raises:
            ValueError: `noise` is not the seed's noise.
            PeerError: TorchServe refused the request.
        """
        if noise is not None:
            expected = seeded_noise(seed, noise.shape[0], self.sample_shape)
            if noise.shape != expected.shape or not np.array_equal(noise, expected):
                raise ValueError(
                    "the TorchServe handler draws x_0 from the seed: pass noise=None or "
                    "seeded_noise(seed, num_samples, sample_shape)"
                )
            num_samples = noise.shape[0]
        body = {"num_samples": num_samples, "num_steps": num_steps, "solver": solver, "seed": seed}
        reply = self.request(body, client)
        return np.asarray(reply["samples"], dtype=np.float32).reshape(reply["shape"])
