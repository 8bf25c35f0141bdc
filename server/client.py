"""A small gRPC client for the command line and benchmarks: connect, call, explain errors."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from server.options import MIB

DEFAULT_SERVER = "127.0.0.1:8001"
DEFAULT_CONNECT_SECONDS = 5.0
# Accept responses as large as a server with default limits sends (64 MiB tensors).
MAX_MESSAGE_BYTES = 256 * MIB


class ServerUnreachable(ConnectionError):
    """No flowserve server answered at the address."""


@dataclass(frozen=True)
class Connection:
    """An open channel and the Generator stub on it.

    Attributes:
        target: "host:port".
        channel: The gRPC channel; close it when done.
        generator: Stub of `flowserve.v1.Generator`.
    """

    target: str
    channel: grpc.Channel
    generator: pb_grpc.GeneratorStub

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()


def connect(target: str, timeout: float = DEFAULT_CONNECT_SECONDS) -> Connection:
    """Open a plaintext channel and wait until the server answers.

    Fails fast when the connection is refused, instead of retrying until `timeout`.

    Raises:
        ServerUnreachable: the connection failed, or nothing answered within `timeout`.
    """
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    settled = threading.Event()
    states: list[grpc.ChannelConnectivity] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    settled.wait(timeout)
    channel.unsubscribe(watch)
    if not states or states[-1] != grpc.ChannelConnectivity.READY:
        channel.close()
        raise ServerUnreachable(
            f"cannot reach a flowserve server at {target}: start one with "
            f"`flowserve serve --store model_store` (or `make run`), or pass --server HOST:PORT"
        )
    return Connection(target=target, channel=channel, generator=generator_stub(channel))


def generator_stub(channel: grpc.Channel) -> pb_grpc.GeneratorStub:
    """The `flowserve.v1.Generator` stub on a channel."""
    # The generated stubs carry no type hints.
    return pb_grpc.GeneratorStub(channel)  # type: ignore[no-untyped-call]


def explain(error: grpc.RpcError, target: str) -> str:
    """A one-line message for a failed call: the status name and the server's explanation."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"flowserve at {target} is unavailable: {details}"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"
