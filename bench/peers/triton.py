"""A real Triton Inference Server peer, started and stopped from the main venv.

`TritonPeer` builds (once) the peer venv of `bench.peers.triton_env`, starts
`bench/peers/triton_server.py` in it on free loopback ports, waits until Triton's OIP
`ServerReady` and `ModelReady` say yes (asked with this repository's own `protos.inference`
stubs, as any OIP client would), and stops it with SIGTERM, then SIGKILL for the whole process
group if that hangs. What it writes at run time (PyTriton's workspace with its copy of the Triton
binaries and the model store, the logs, PyTriton's temp files) goes into one temporary directory,
removed on stop. Two things lie outside it and are Triton's own: the Python backend's
`/tmp/folderXXXXXX` (a hard-coded path; removed when the model unloads on a clean stop) and
shared-memory segments in /dev/shm (released by the peer's resource tracker).

    with TritonPeer(model_dir, steps=100, solver="euler") as triton:
        result = run_closed_loop(triton.target, oip_infer(triton.model_name, (2,)), ...)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc

from bench.peers.processes import free_ports, log_tail
from bench.peers.triton_env import ensure_venv
from flowserve.modeldir import read_config
from protos.inference import grpc_predict_v2_pb2 as oip
from protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = Path(__file__).with_name("triton_server.py")
HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.25
LOG_TAIL_LINES = 40
# The main venv's Python settings must not leak into the peer's other interpreter.
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


class TritonPeerError(RuntimeError):
    """Triton did not start, did not become ready in time, or died."""


class TritonPeer:
    """Triton 2.51 (PyTriton 0.7.0) serving a flowserve model directory, as a context manager.

    The model is served under its config.json name with input NOISE and output SAMPLES, each of
    the model's sample shape, batched by Triton's dynamic batcher; see `triton_server.py`.

    Args:
        model_dir: A flowserve model directory (e.g. `STORE/NAME/1`).
        steps: Fixed solver steps of every request.
        solver: Fixed ODE solver (`flows.solvers.ODE_SOLVERS`).
        max_batch_size: Largest batch the dynamic batcher forms.
        queue_delay_us: How long the batcher waits to fill a batch.
        torch_threads: Intra-op threads of the peer's torch (0 = torch's default).
        start_timeout_s: Bound on start-up (venv already built) until the model is ready.
        root: Repository root holding `.bench-venvs/`.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        steps: int,
        solver: str = "euler",
        max_batch_size: int = 256,
        queue_delay_us: int = 2000,
        torch_threads: int = 0,
        start_timeout_s: float = START_TIMEOUT_S,
        root: Path = REPO_ROOT,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        # Read here, in the main venv, so that a bad directory fails before anything starts.
        self.model_name = read_config(self.model_dir).name
        self.steps = steps
        self.solver = solver
        self.max_batch_size = max_batch_size
        self.queue_delay_us = queue_delay_us
        self.torch_threads = torch_threads
        self.start_timeout_s = start_timeout_s
        self.root = root
        self.grpc_port = self.http_port = self.metrics_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._log_handle: IO[bytes] | None = None

    @property
    def target(self) -> str:
        """`127.0.0.1:PORT` of Triton's gRPC endpoint (OIP `inference.GRPCInferenceService`)."""
        if self._process is None:
            raise TritonPeerError("TritonPeer is not running; use it as a context manager")
        return f"{HOST}:{self.grpc_port}"

    @property
    def pid(self) -> int:
        """Process id of the peer script; Triton's server processes are its descendants."""
        if self._process is None:
            raise TritonPeerError("TritonPeer is not running; use it as a context manager")
        return self._process.pid

    def logs(self) -> str:
        """The last lines of the peer script's output and of Triton's own log."""
        if self._tmp is None:
            return "(not started)"
        return (
            f"--- triton_server.py output (last {LOG_TAIL_LINES} lines) ---\n"
            f"{log_tail(self._tmp / 'peer.log', LOG_TAIL_LINES)}\n"
            f"--- tritonserver log (last {LOG_TAIL_LINES} lines) ---\n"
            f"{log_tail(self._tmp / 'tritonserver.log', LOG_TAIL_LINES)}"
        )

    def start(self) -> None:
        """Build the venv if needed, start Triton and wait until the model is ready.

        Raises:
            TritonPeerError: the process exits or is not ready within `start_timeout_s`
                (the message holds the tails of its logs); it is stopped before raising.
        """
        if self._process is not None:
            raise TritonPeerError("TritonPeer is already running")
        python = ensure_venv(self.root)
        self._tmp = Path(tempfile.mkdtemp(prefix="flowserve-triton-peer-"))
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        # PyTriton and the Python backend make temp files; keep them in our directory.
        env["TMPDIR"] = str(self._tmp)
        env["PYTHONUNBUFFERED"] = "1"
        command = [
            str(python),
            str(SERVER_SCRIPT),
            f"--model-dir={self.model_dir}",
            f"--steps={self.steps}",
            f"--solver={self.solver}",
            f"--host={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--max-batch-size={self.max_batch_size}",
            f"--queue-delay-us={self.queue_delay_us}",
            f"--torch-threads={self.torch_threads}",
            f"--workspace={self._tmp / 'workspace'}",
            f"--log-file={self._tmp / 'tritonserver.log'}",
        ]
        self._log_handle = (self._tmp / "peer.log").open("wb")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=self._tmp,
            env=env,
            # Its own process group: tritonserver and the backend stubs can be killed together.
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except TritonPeerError as error:
            logs = self.logs()  # read before stop() removes the directory
            self.stop()
            raise TritonPeerError(
                f"Triton peer for {self.model_dir} did not become ready ({error}):\n{logs}"
            ) from None
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Poll OIP ServerReady and ModelReady until both say yes (bounded)."""
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        with grpc.insecure_channel(f"{HOST}:{self.grpc_port}") as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            while True:
                code = self._process.poll()
                if code is not None:
                    raise TritonPeerError(f"triton_server.py exited with status {code}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TritonPeerError(f"not ready after {self.start_timeout_s:.0f} s")
                try:
                    timeout = min(2.0, remaining)
                    server = stub.ServerReady(oip.ServerReadyRequest(), timeout=timeout)
                    model = stub.ModelReady(
                        oip.ModelReadyRequest(name=self.model_name), timeout=timeout
                    )
                    if server.ready and model.ready:
                        return
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(POLL_INTERVAL_S)

    def stop(self) -> None:
        """SIGTERM, wait (bounded), SIGKILL the process group if needed; remove the temp dir."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=STOP_TIMEOUT_S)
            # Also reaps a tritonserver or stub left behind by a script that has exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            try:
                process.wait(timeout=KILL_TIMEOUT_S)
            except subprocess.TimeoutExpired as error:
                raise TritonPeerError(f"Triton peer pid {process.pid} did not die") from error
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TritonPeer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
