"""RPC plumbing shared by every servicer: request scope, admission, deadlines, cancellation.

`RpcScope` gives each RPC a request id (sent back as `x-request-id` metadata), counts it in the
metrics with its final status code, and answers any exception with `errors.status_for`. A
client's deadline becomes the engine job's deadline, and an RPC that ends early (cancelled,
expired, disconnected) cancels its job so that its rows leave the engine at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, NoReturn

import grpc

from server.engine import Engine, JobDeadlineExceeded, JobHandle, LikelihoodJob, SampleJob
from server.errors import Draining, status_for
from server.logs import REQUEST_ID_KEY, RequestLogger, request_id_from
from server.metrics import UNKNOWN_MODEL, ServerMetrics

logger = logging.getLogger(__name__)

# Beyond the client's deadline, how long to wait for the engine to report the expiry itself.
_DEADLINE_SLACK_SECONDS = 5.0
# gRPC reports "no deadline" as an enormous remaining time; beyond this there is none.
_NO_DEADLINE_SECONDS = 1e7


class Admission:
    """Whether new work is admitted; closed once when the server starts draining."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    def close(self) -> None:
        """Refuse new Sample / SampleStream / LogLikelihood requests from now on."""
        self._closed.set()

    def check(self) -> None:
        """Raise Draining if the server no longer admits work."""
        if self._closed.is_set():
            raise Draining("the server is draining before shutdown; retry on another replica")


class RpcScope:
    """Bookkeeping of one RPC: request id, timing, the metrics row and the final status."""

    def __init__(self, method: str, context: grpc.ServicerContext, metrics: ServerMetrics) -> None:
        self.method = method
        self.context = context
        self.metrics = metrics
        self.request_id = request_id_from(context.invocation_metadata())
        self.log = RequestLogger(logger, self.request_id)
        self.model_label = UNKNOWN_MODEL
        self._start = time.perf_counter()
        self._recorded = False
        context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))

    def record(self, code: grpc.StatusCode) -> None:
        """Count the RPC once, with the name of its status code."""
        if self._recorded:
            return
        self._recorded = True
        elapsed = time.perf_counter() - self._start
        self.metrics.observe_request(self.method, self.model_label, code.name, elapsed)
        self.log.info(
            "%s model=%s -> %s in %.4fs", self.method, self.model_label, code.name, elapsed
        )

    def fail(self, error: Exception) -> NoReturn:
        """Answer the RPC with the status that `error` maps to."""
        status = status_for(error, self.request_id)
        if status.code == grpc.StatusCode.INTERNAL:
            self.log.error("%s failed", self.method, exc_info=error)
        if status.code == grpc.StatusCode.CANCELLED and self._deadline_passed():
            # gRPC cancels an RPC whose deadline passes; report it as the deadline it was.
            status = status_for(JobDeadlineExceeded(), self.request_id)
        self.record(status.code)
        self.context.abort(status.code, status.message)
        raise AssertionError("context.abort returned")  # abort always raises

    def _deadline_passed(self) -> bool:
        remaining = self.context.time_remaining()
        return remaining is not None and remaining <= 0


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The client's deadline on the `time.monotonic()` clock, or None without one."""
    remaining: float | None = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_SECONDS:
        return None
    return time.monotonic() + max(0.0, remaining)


def wait_for(handle: JobHandle, deadline: float | None) -> Any:
    """The job's result; if the engine misses the deadline by the slack, cancel the job."""
    timeout = None if deadline is None else deadline - time.monotonic() + _DEADLINE_SLACK_SECONDS
    try:
        return handle.future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        handle.cancel()
        raise JobDeadlineExceeded("the engine did not finish before the deadline") from None


def cancel_with_rpc(context: grpc.ServicerContext, handle: JobHandle) -> None:
    """Cancel the job when the RPC ends early (client cancel, deadline, disconnect)."""
    if not context.add_callback(handle.cancel):
        handle.cancel()  # the RPC had already ended


def run_job(
    engine: Engine,
    job: SampleJob | LikelihoodJob,
    context: grpc.ServicerContext,
    deadline: float | None,
) -> Any:
    """Submit a job that lives and dies with its RPC, and wait for its result."""
    handle = engine.submit(job)
    cancel_with_rpc(context, handle)
    return wait_for(handle, deadline)
