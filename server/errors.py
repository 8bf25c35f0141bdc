"""Errors a request can meet, and the one function that maps them to gRPC status codes.

Validation, the model store and the engine raise domain errors; the servicer catches whatever
a request raised and answers with `status_for(error)`. Anything unexpected becomes INTERNAL
with a generic message and the request id: its details go to the log, never to the client.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from server.engine import (
    BackendFailed,
    EngineClosed,
    JobCancelled,
    JobDeadlineExceeded,
    QueueFull,
)


class RequestError(Exception):
    """A request the server refuses; the message is written for the client."""


class InvalidArgument(RequestError):
    """A request field is missing, malformed or out of range.

    Attributes:
        field: The field's name as the client wrote it (e.g. "num_steps", "initial_noise").
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(RequestError):
    """No served model has this name, or it is not served at this version."""


class Draining(RequestError):
    """The server is shutting down and admits no new work."""


class Unauthenticated(RequestError):
    """An admin call without well-formed credentials."""


class PermissionDenied(RequestError):
    """An admin call whose credentials are not accepted (or the admin service is off)."""


class PushRejected(RequestError):
    """A pushed model version failed a check; nothing of it was kept.

    Attributes:
        check: The name of the failed check (e.g. "pickle", "smoke test", "quality gate").
    """

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"push rejected by the {check} check: {message}")
        self.check = check


class VersionUnavailable(RequestError):
    """A model version exists but cannot serve (it fails to load or to warm up)."""


class Unimplemented(RequestError):
    """The method exists in the API but this server does not provide it yet."""


@dataclass(frozen=True)
class Status:
    """A gRPC status code and the message sent with it."""

    code: grpc.StatusCode
    message: str


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (Draining, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (PushRejected, grpc.StatusCode.FAILED_PRECONDITION),
    (VersionUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineClosed, grpc.StatusCode.UNAVAILABLE),
    (JobCancelled, grpc.StatusCode.CANCELLED),
    (JobDeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)

_CLIENT_MESSAGES: dict[type[BaseException], str] = {
    QueueFull: "the server's queue is full; retry later with backoff",
    EngineClosed: "the server is shutting down; retry on another replica",
    JobCancelled: "the request was cancelled",
    JobDeadlineExceeded: "the deadline passed before the request finished",
}


# Longest message sent to a client, in characters. Messages quote what the client sent (a model
# name, a version), and the message travels as the grpc-message trailer: a 70000-character model
# name made it exceed the client's metadata limit (8 KiB by default), and the client saw
# RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of NOT_FOUND. 512
# characters stay below 8 KiB even as 4-byte UTF-8, percent-encoded (3 bytes per byte).
MAX_MESSAGE_CHARS = 512


def client_message(text: str) -> str:
    """`text` cut to MAX_MESSAGE_CHARS, keeping its start and its end (which often lists what
    is allowed)."""
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    marker = f" [...{len(text) - MAX_MESSAGE_CHARS} characters cut...] "
    keep = MAX_MESSAGE_CHARS - len(marker)
    return text[: keep // 2] + marker + text[len(text) - (keep - keep // 2) :]


def status_for(error: BaseException, request_id: str) -> Status:
    """The status a client gets for an error raised while serving its request.

    Args:
        error: What the request raised.
        request_id: The request's id, quoted in INTERNAL messages so logs can be matched.

    Returns:
        The code and a message that says what to fix (or, for INTERNAL, whom to tell), at
        most MAX_MESSAGE_CHARS long.
    """
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            if isinstance(error, RequestError):
                return Status(code, client_message(str(error)))
            return Status(code, _CLIENT_MESSAGES[error_type])
    if isinstance(error, BackendFailed):
        return Status(
            grpc.StatusCode.INTERNAL,
            f"the model failed while computing this request (request id {request_id})",
        )
    return Status(grpc.StatusCode.INTERNAL, f"internal server error (request id {request_id})")
