"""The gate of work RPCs: refuse new work while draining before any response header is sent.

A client's retry policy may retry an UNAVAILABLE call only while the call is uncommitted, that
is before response headers arrive. The servicers send headers (the request id) as soon as they
start, so a draining server's refusal must come first: `AdmissionInterceptor` wraps every method
that submits work to the engine, answers UNAVAILABLE with a trailers-only response once the
`WorkGate` is closed (so that a round_robin client retries the call on another replica), and
counts the calls it let in until they end, so that draining can wait for exactly those.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from server.errors import Draining, status_for
from server.metrics import UNKNOWN_MODEL, ServerMetrics

# Methods that submit work to the engine (the others keep answering while draining).
WORK_METHODS: frozenset[str] = frozenset(
    {
        "/flowserve.v1.Generator/Sample",
        "/flowserve.v1.Generator/SampleStream",
        "/flowserve.v1.Generator/LogLikelihood",
        "/inference.GRPCInferenceService/ModelInfer",
    }
)


class WorkGate:
    """Whether new work RPCs are let in, and how many that were let in are still running."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._open = True
        self._in_flight = 0

    def enter(self) -> bool:
        """Let one call in (True) unless the gate is closed (False)."""
        with self._changed:
            if not self._open:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        """A call that was let in has ended."""
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def close(self) -> None:
        """Let no new call in from now on."""
        with self._changed:
            self._open = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call that was let in is running; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout=timeout)


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Answers work methods UNAVAILABLE, counted in the metrics, once the gate has closed."""

    def __init__(self, gate: WorkGate, metrics: ServerMetrics) -> None:
        self._gate = gate
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the handler of a work method with the admission check."""
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method not in WORK_METHODS or handler.request_streaming:
            return handler
        name = method.rsplit("/", 1)[1]
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(handler.unary_stream, name),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._guard(handler.unary_unary, name),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _refuse(self, name: str, context: grpc.ServicerContext) -> None:
        status = status_for(
            Draining("the server is draining before shutdown; retry on another replica"), ""
        )
        self._metrics.observe_request(name, UNKNOWN_MODEL, status.code.name, 0.0)
        context.abort(status.code, status.message)

    def _guard(self, behavior: Callable[..., Any], name: str) -> Callable[..., Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if not self._gate.enter():
                self._refuse(name, context)
            try:
                return behavior(request, context)
            finally:
                self._gate.leave()

        return guarded

    def _guard_stream(self, behavior: Callable[..., Any], name: str) -> Callable[..., Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            # Entered on the first next(), which gRPC calls at once: a stream closed before
            # it starts is never counted.
            if not self._gate.enter():
                self._refuse(name, context)
            try:
                yield from behavior(request, context)
            finally:
                self._gate.leave()

        return guarded
