"""Request decoding owned by the server: undecodable bytes are INVALID_ARGUMENT, not INTERNAL.

grpcio decodes each request with the handler's `request_deserializer` before any servicer code
runs, and answers a request that does not parse with INTERNAL "Exception deserializing
request!", a server fault by the gRPC status contract, for what is the client's malformed
input. `DecodingInterceptor` hands the servicers' methods the raw bytes instead (no
deserializer) and parses them itself, answering INVALID_ARGUMENT "request: is not a valid
<message>: <parser's reason>". The servicers see the same message objects as before.

Only the services named at construction are wrapped: health's non-blocking Watch relies on
attributes of its own behaviour that a wrapper would hide, and the library services are not
ours to re-word.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from server.errors import InvalidArgument, client_message

Deserializer = Callable[[bytes], Any]


class UndecodableRequest(InvalidArgument):
    """Request bytes that do not parse as the method's request message."""

    def __init__(self, message_name: str, reason: str) -> None:
        super().__init__("request", f"is not a valid {message_name}: {reason}")


def _message_name(deserializer: Deserializer) -> str:
    """The full protobuf name of what `deserializer` parses (`Message.FromString`)."""
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else "request message"


def _decode(deserializer: Deserializer, name: str, raw: bytes) -> Any:
    try:
        return deserializer(raw)
    except Exception as error:  # protobuf's DecodeError, or anything a custom parser raises
        raise UndecodableRequest(name, str(error) or type(error).__name__) from None


def _decode_unary(
    behavior: Callable[..., Any], deserializer: Deserializer, name: str
) -> Callable[..., Any]:
    """A unary-request behaviour taking raw bytes (its response may be a stream)."""

    def decoded(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = _decode(deserializer, name, raw)
        except UndecodableRequest as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, client_message(str(error)))
        return behavior(request, context)

    return decoded


def _decode_stream(
    behavior: Callable[..., Any], deserializer: Deserializer, name: str
) -> Callable[..., Any]:
    """A stream-request behaviour taking an iterator of raw bytes.

    A message that does not parse surfaces where the servicer reads it, as an
    `UndecodableRequest` (an `InvalidArgument`, which the servicers answer INVALID_ARGUMENT).
    The status is also set on the context first, so that a servicer that lets the exception
    escape still answers INVALID_ARGUMENT (grpcio keeps a code set before the failure).
    """

    def decoded(raw_requests: Iterable[bytes], context: grpc.ServicerContext) -> Any:
        def requests() -> Iterator[Any]:
            for raw in raw_requests:
                try:
                    yield _decode(deserializer, name, raw)
                except UndecodableRequest as error:
                    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                    context.set_details(client_message(str(error)))
                    raise

        return behavior(requests(), context)

    return decoded


def decoding_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, parsing its requests inside the behaviour (see the module doc)."""
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler
    name = _message_name(deserializer)
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _decode_stream(handler.stream_stream, deserializer, name),
            response_serializer=serializer,
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _decode_stream(handler.stream_unary, deserializer, name),
            response_serializer=serializer,
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _decode_unary(handler.unary_stream, deserializer, name),
            response_serializer=serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        _decode_unary(handler.unary_unary, deserializer, name),
        response_serializer=serializer,
    )


class DecodingInterceptor(grpc.ServerInterceptor):
    """Parses the requests of the named services itself (install it last: innermost)."""

    def __init__(self, services: Iterable[str]) -> None:
        self._services = frozenset(services)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Swap the handler of a wrapped service's method for its decoding twin."""
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        service = method.lstrip("/").partition("/")[0]
        if handler is None or service not in self._services:
            return handler
        return decoding_handler(handler)
