"""Shared fixtures: a tiny model store and a real flowserve server in its own process.

The server runs as `python -m server serve` on 127.0.0.1 with port 0 and reports its bound
ports on stdout; every wait on it is bounded.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from flowserve.modeldir import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 60.0


def _write_model(root: Path, name: str, version: int, config: ModelConfig, seed: int) -> Path:
    import torch

    from flowserve.modeldir import build_net, write_model_dir

    torch.manual_seed(seed)
    net = build_net(config)
    directory = root / name / str(version)
    write_model_dir(directory, config, net.state_dict())
    return directory


def build_tiny_store(root: Path) -> Path:
    """A store of random-weight models small enough to serve on one CPU thread.

    - toy2d: unconditional 2-D velocity model on the linear path; versions 1 and 2 valid,
      version 3 with corrupted weights (must be skipped), and a non-version directory.
    - toycond: 2-D, 3 classes (classifier-free guidance).
    - toyvp: 70-D noise-prediction model on the VP path (above the 64-D EXACT default).
    """
    # Imported here so that collecting other engineers' tests does not depend on these.
    from flows.nets import NetSpec
    from flowserve.modeldir import ModelConfig

    toy2d = ModelConfig(
        name="toy2d",
        architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2}),
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=0,
        default_solver="heun",
        default_num_steps=8,
    )
    _write_model(root, "toy2d", 1, toy2d, seed=1)
    _write_model(root, "toy2d", 2, toy2d, seed=2)
    broken = _write_model(root, "toy2d", 3, toy2d, seed=3)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    (root / "toy2d" / "latest").mkdir()
    toycond = ModelConfig(
        name="toycond",
        architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2, "num_classes": 3}),
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=3,
        default_solver="euler",
        default_num_steps=6,
    )
    _write_model(root, "toycond", 1, toycond, seed=4)
    toyvp = ModelConfig(
        name="toyvp",
        architecture=NetSpec("time_mlp", {"dim": 70, "hidden": 16, "depth": 2}),
        sample_shape=(70,),
        parameterization="noise",
        path={"kind": "vp"},
        num_classes=0,
        default_solver="heun",
        default_num_steps=6,
    )
    _write_model(root, "toyvp", 1, toyvp, seed=5)
    return root


def poll_until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Wait until `condition()` holds, checking every 50 ms; fail naming `what` after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class ServerProcess:
    """`python -m server serve ...` in a child process, with its ports and log."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._lines: queue.Queue[str] = queue.Queue()
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        listening = self.wait_for_line("flowserve listening on ")
        self.target = listening.rsplit(" ", 1)[1]
        self.metrics_url = self.wait_for_line("flowserve metrics on ").rsplit(" ", 1)[1]

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))

    def wait_for_line(self, prefix: str, timeout: float = START_TIMEOUT_SECONDS) -> str:
        """The next stdout line starting with `prefix` (bounded wait)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line
        raise AssertionError(
            f"server did not print {prefix!r} (exit {self.process.poll()}); log:\n{self.log()}"
        )

    def log(self) -> str:
        """The server's stderr so far."""
        self._log.flush()
        return self.log_path.read_text()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """One scrape of /metrics, parsed by prometheus_client's own parser."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from a fresh scrape (0 when the series does not exist yet)."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def terminate(self) -> None:
        """Send SIGTERM (graceful drain)."""
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM, then wait (bounded) for the exit status; kill if it hangs."""
        if self.process.poll() is None:
            self.terminate()
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=10)
        self._log.close()
        return code


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store of tiny random-weight models (built once per session)."""
    return build_tiny_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def shared_server(
    tiny_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server for every test that only makes requests (started once per session).

    Its limits are small so that size checks are cheap to exercise; the file also tests
    `--config`.
    """
    directory = tmp_path_factory.mktemp("shared_server")
    config = directory / "flowserve.toml"
    config.write_text(
        "torch_threads = 1\n"
        "[limits]\nmax_tensor_bytes = 262144\nmax_num_samples = 16384\n"
        "[grpc]\nmax_workers = 16\n"
    )
    server = ServerProcess(
        ["--store", str(tiny_store), "--port", "0", "--metrics-port", "0", "--config", str(config)],
        directory / "server.log",
    )
    server.wait_for_line("flowserve ready")
    yield server
    assert server.stop() == 0, server.log()
