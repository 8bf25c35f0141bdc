"""The gRPC transport from the config: channel options, TLS / mutual TLS, the inference token.

`grpc_options(config)` lists the options the server is built with (message size and stream
limits), `bind(server, config)` adds the port (plain or TLS, with client certificates required
when a client CA is configured), and `token_interceptor(config, metrics)` builds the bearer-token
check for Generator and the Open Inference Protocol when an inference token file is configured.
Files are read here, once, at start-up.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from server.config import ConfigError, SecurityConfig, ServerConfig
from server.errors import PermissionDenied, Unauthenticated, status_for
from server.metrics import UNKNOWN_MODEL, ServerMetrics

# Services whose calls need the inference token when one is configured. Health, reflection and
# ModelAdmin (which has its own token) are not among them: probes must get through.
PROTECTED_SERVICES: tuple[str, ...] = ("flowserve.v1.Generator", "inference.GRPCInferenceService")


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The options the gRPC server is built with."""
    message_bytes = config.limits.max_message_bytes
    return [
        ("grpc.max_receive_message_length", message_bytes),
        ("grpc.max_send_message_length", message_bytes),
        ("grpc.http2.max_concurrent_streams", config.grpc.max_concurrent_streams),
        # gRPC shares ports by default: a second server on a busy port would start and split
        # the traffic. Refuse instead.
        ("grpc.so_reuseport", 0),
    ]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {what} {path}: {error.strerror}") from error


def server_credentials(security: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files, or None for a plaintext port.

    Raises:
        ConfigError: a file cannot be read.
    """
    if security.tls_cert_file is None or security.tls_key_file is None:
        return None
    key = _read(security.tls_key_file, "security.tls_key_file")
    cert = _read(security.tls_cert_file, "security.tls_cert_file")
    client_ca = None
    if security.tls_client_ca_file is not None:
        client_ca = _read(security.tls_client_ca_file, "security.tls_client_ca_file")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def bind(server: grpc.Server, config: ServerConfig) -> int:
    """Add the configured listening port (TLS when configured) and return the bound port.

    Raises:
        ConfigError: a TLS file cannot be read.
        OSError: the port cannot be bound.
    """
    address = f"{config.grpc.host}:{config.grpc.port}"
    credentials = server_credentials(config.security)
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise OSError(f"cannot bind gRPC port {address}: is another server using it?") from error


def read_inference_token(security: SecurityConfig) -> str | None:
    """The inference bearer token, or None when Generator and OIP are open.

    Raises:
        ConfigError: the file cannot be read or holds no token.
    """
    if security.inference_token_file is None:
        return None
    raw = _read(security.inference_token_file, "security.inference_token_file")
    token = raw.decode("utf-8", errors="replace").strip()
    if not token or " " in token or not token.isprintable():
        raise ConfigError(
            f"security.inference_token_file {security.inference_token_file} must hold one "
            "printable token without spaces"
        )
    return token


def check_bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> None:
    """Accept only calls carrying `authorization: Bearer TOKEN` with the inference token.

    Raises:
        Unauthenticated: no well-formed authorization metadata.
        PermissionDenied: the token does not match.
    """
    values = [value for key, value in metadata or () if key == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str) or not values[0].startswith("Bearer "):
        raise Unauthenticated(
            "this server requires the inference token: send metadata 'authorization: Bearer TOKEN'"
        )
    # Constant-time comparison: the time taken must not reveal how much of the token matched.
    if not hmac.compare_digest(values[0][len("Bearer ") :].encode(), token.encode()):
        raise PermissionDenied("the inference token is not accepted")


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls to the protected services without `authorization: Bearer TOKEN`.

    A refused call is answered UNAUTHENTICATED or PERMISSION_DENIED and counted in
    `flowserve_requests_total` with the model label `_unknown`.
    """

    def __init__(self, token: str, metrics: ServerMetrics) -> None:
        self._token = token
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Check the token of a protected call; pass every other call through."""
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        service, _, name = method.lstrip("/").partition("/")
        if service not in PROTECTED_SERVICES:
            return continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        try:
            check_bearer_token(metadata, self._token)
        except Exception as error:
            status = status_for(error, "")
            self._metrics.observe_request(name, UNKNOWN_MODEL, status.code.name, 0.0)
            return _refusal(continuation(handler_call_details), status.code, status.message)
        return continuation(handler_call_details)


def _refusal(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind (unary or streaming) that answers with `code`."""
    if handler is None:
        return None

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def token_interceptors(
    config: ServerConfig, metrics: ServerMetrics
) -> list[grpc.ServerInterceptor]:
    """The interceptors for the configured inference token (none when there is no token)."""
    token = read_inference_token(config.security)
    return [] if token is None else [TokenInterceptor(token, metrics)]
