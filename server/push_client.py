"""Client side of `ModelAdmin.PushModel`: stream a model directory's files in chunks.

Only config.json, model.safetensors and (if present) model.onnx leave the directory; each file
is read once, hashed as it streams, and its sha256 rides on its last chunk so that the server
can check what arrived.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from server.auth import AUTHORIZATION_KEY
from server.client import connect
from server.options import MIB
from server.push_receive import PUSH_FILES, REQUIRED_FILES

CHUNK_BYTES = 1 * MIB
DEFAULT_PUSH_TIMEOUT_SECONDS = 600.0


class PushError(ValueError):
    """The directory cannot be pushed (a required file is missing)."""


def files_to_push(directory: Path) -> tuple[Path, ...]:
    """The files of `directory` a push sends, in order.

    Raises:
        PushError: config.json or model.safetensors is missing.
    """
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise PushError(f"{directory} lacks {', '.join(missing)}: not a model directory")
    return tuple(directory / name for name in PUSH_FILES if (directory / name).is_file())


def push_chunks(
    directory: Path,
    name: str = "",
    make_serving: bool = False,
    force: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.PushModelChunk]:
    """The PushModel stream for a directory: the header, then each file's chunks in order."""
    files = files_to_push(directory)
    yield pb.PushModelChunk(
        header=pb.PushModelHeader(name=name, make_serving=make_serving, force=force)
    )
    for path in files:
        digest = hashlib.sha256()
        offset = 0
        with path.open("rb") as handle:
            data = handle.read(chunk_bytes)
            while True:
                following = handle.read(chunk_bytes)
                digest.update(data)
                last = not following
                yield pb.PushModelChunk(
                    file=pb.FileChunk(
                        filename=path.name,
                        offset=offset,
                        data=data,
                        sha256=digest.hexdigest() if last else "",
                    )
                )
                if last:
                    break
                offset += len(data)
                data = following


def admin_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the admin token."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


def admin_stub(channel: grpc.Channel) -> pb_grpc.ModelAdminStub:
    """The `flowserve.v1.ModelAdmin` stub on a channel."""
    return pb_grpc.ModelAdminStub(channel)  # type: ignore[no-untyped-call]


def push_model_dir(
    target: str,
    directory: Path,
    token: str,
    name: str = "",
    make_serving: bool = False,
    force: bool = False,
    timeout: float = DEFAULT_PUSH_TIMEOUT_SECONDS,
) -> pb.PushModelResponse:
    """Push a model directory to the server at `target` and return its answer.

    Raises:
        PushError: the directory is not a model directory.
        server.client.ServerUnreachable: no server answers at `target`.
        grpc.RpcError: the server refused the push (the status says why).
    """
    files_to_push(directory)  # fail before connecting
    connection = connect(target)
    try:
        response: pb.PushModelResponse = admin_stub(connection.channel).PushModel(
            push_chunks(directory, name, make_serving, force),
            metadata=admin_metadata(token),
            timeout=timeout,
        )
        return response
    finally:
        connection.close()
