"""Run the real flowserve server as a separate process for a benchmark, and stop it.

A benchmark that measures the server over gRPC must not share a process (and its GIL) with the
load generator, or it would measure the two fighting over one interpreter. This starts
`python -m server serve` on 127.0.0.1 with free ports, reads the ports it reports on stdout,
waits (bounded) for `flowserve ready`, and stops it with SIGTERM (then SIGKILL if it hangs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def to_toml(config: Mapping[str, Any]) -> str:
    """A flat-or-one-level config mapping as TOML (scalars first, then one table per section)."""
    scalars = {k: v for k, v in config.items() if not isinstance(v, Mapping)}
    lines = [f"{key} = {_toml_value(value)}" for key, value in scalars.items()]
    for section, table in config.items():
        if isinstance(table, Mapping):
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


class FlowserveProcess:
    """`python -m server serve` in a child process, as a context manager.

    Args:
        store: Model store directory to serve.
        config: Server configuration tables (see server/config.py), written to a TOML file.
        backend: Sampling backend (eager, torchscript, onnxruntime, triton-fused).
        torch_threads: Intra-op threads of the server's torch (0 = torch's default).
    """

    def __init__(
        self,
        store: Path,
        config: Mapping[str, Any] | None = None,
        backend: str = "eager",
        torch_threads: int = 0,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="flowserve-bench-")
        tmp = Path(self._tmp.name)
        config_file = tmp / "flowserve.toml"
        config_file.write_text(to_toml(config or {}))
        self._log_path = tmp / "server.log"
        self._log = self._log_path.open("w")
        self._lines: list[str] = []
        self._final_log: str | None = None
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "serve",
                "--store",
                str(store),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--config",
                str(config_file),
                "--backend",
                backend,
                "--torch-threads",
                str(torch_threads),
                "--log-level",
                "WARNING",
            ],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        try:
            self.target = self._wait_for("flowserve listening on ").rsplit(" ", 1)[1]
            self._wait_for("flowserve ready")
        except BaseException:
            self.stop()
            raise
        # Printed before "ready" when the metrics endpoint is enabled; None when it is not.
        metrics = [line for line in self._lines if line.startswith("flowserve metrics on ")]
        self.metrics_url: str | None = metrics[0].rsplit(" ", 1)[1] if metrics else None

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def _wait_for(self, prefix: str) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        seen = 0
        with self._cond:
            while time.monotonic() < deadline:
                for line in self._lines[seen:]:
                    if line.startswith(prefix):
                        return line
                seen = len(self._lines)
                if self.process.poll() is not None:
                    break
                self._cond.wait(timeout=0.2)
        raise RuntimeError(
            f"flowserve did not print {prefix!r} (exit {self.process.poll()}); "
            f"log tail:\n{self.log()[-3000:]}"
        )

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def log(self) -> str:
        """The server's stderr so far (all of it, once stopped)."""
        if self._final_log is not None:
            return self._final_log
        self._log.flush()
        return self._log_path.read_text(errors="replace")

    def scrape(self, timeout: float = 10.0) -> str:
        """One page of the server's /metrics (its metrics endpoint must be enabled)."""
        if self.metrics_url is None:
            raise RuntimeError("the server was started with its metrics endpoint disabled")
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:
            return str(response.read().decode())

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL; returns the exit status. Idempotent."""
        if self._final_log is not None:
            return self.process.returncode
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=10)
        self._final_log = self.log()  # kept: the directory holding the log goes now
        self._log.close()
        self._tmp.cleanup()
        return code

    def __enter__(self) -> FlowserveProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
