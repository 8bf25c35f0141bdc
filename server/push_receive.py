"""Receive a `ModelAdmin.PushModel` stream into a staging directory.

The stream is a `PushModelHeader`, then the chunks of each file in order (offsets contiguous,
the last chunk carrying the file's sha256). Checked on arrival, before any byte is parsed: file
names are plain names from a fixed list, sizes stay within `PushConfig`, nothing looks like a
pickle or a zip archive (torch.save's format), and each file hashes to the digest the client
sent. Nothing here parses the files; `server.push_checks` does that once they are complete.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from export.contract import ONNX_FILE
from flowserve.modeldir import CONFIG_FILE, WEIGHTS_FILE
from protos.flowserve.v1 import flowserve_pb2 as pb
from server.config import PushConfig
from server.errors import InvalidArgument, PushRejected

PUSH_FILES: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE)
REQUIRED_FILES: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)
# Suffixes of pickled checkpoints (torch.save, pickle, Lightning); loading one runs code.
PICKLE_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
ZIP_MAGIC = b"PK\x03\x04"
# Bytes of a file's head that the magic checks look at.
_HEAD_BYTES = 16
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_CONVERT_HINT = (
    "pickled checkpoints are never loaded (loading one runs arbitrary code); convert it with "
    "safetensors.torch.save_file(state_dict, 'model.safetensors') and push config.json plus "
    "model.safetensors"
)


@dataclass(frozen=True)
class ReceivedPush:
    """What a push stream delivered.

    Attributes:
        name: The header's model name ("" = the name in config.json).
        make_serving: Pin the version as the serving one once it passes.
        force: Skip the quality gate's verdict.
        files: The files written into the staging directory.
        total_bytes: Their total size.
    """

    name: str
    make_serving: bool
    force: bool
    files: tuple[str, ...]
    total_bytes: int


def looks_pickled(head: bytes, filename: str) -> bool:
    """Whether a file's first bytes are those of a pickle or a zip archive.

    A safetensors file starts with an 8-byte little-endian header length and then `{`; a
    pickle of protocol 2 or later starts with 0x80 and the protocol number. The two can share
    their first bytes only if the header length happens to match, so a safetensors file is
    called a pickle only when its ninth byte is not `{`.
    """
    if head.startswith(ZIP_MAGIC):
        return True
    pickle_opcode = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if not pickle_opcode:
        return False
    if filename == WEIGHTS_FILE:
        return head[8:9] != b"{"
    return True


def check_file_name(filename: str) -> None:
    """Accept only the plain names a push may carry.

    Raises:
        InvalidArgument: the name is a path, hidden, or not printable.
        PushRejected: a pickled-checkpoint name, or a name not in `PUSH_FILES`.
    """
    plain = (
        bool(filename)
        and len(filename) <= 255
        and filename.isprintable()
        and "/" not in filename
        and "\\" not in filename
        and not filename.startswith(".")
    )
    if not plain:
        raise InvalidArgument(
            "file.filename",
            f"{filename!r} is not a plain file name; send one of {', '.join(PUSH_FILES)} "
            "without any directory part",
        )
    if filename.lower().endswith(PICKLE_SUFFIXES):
        raise PushRejected("pickle", f"{filename}: {_CONVERT_HINT}")
    if filename not in PUSH_FILES:
        raise PushRejected(
            "file names", f"{filename!r} is not accepted; a push holds {', '.join(PUSH_FILES)}"
        )


class _Sink:
    """One file being written: its handle, running digest, size and first bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: BinaryIO = open(path, "xb")  # noqa: SIM115 (closed in finish/close)
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> None:
        if len(self.head) < _HEAD_BYTES:
            self.head = (self.head + data[:_HEAD_BYTES])[:_HEAD_BYTES]
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)

    def close(self) -> None:
        self.handle.close()


def _header(chunks: Iterator[pb.PushModelChunk]) -> pb.PushModelHeader:
    first = next(chunks, None)
    if first is None or first.WhichOneof("chunk") != "header":
        raise InvalidArgument("header", "the first message of a push must be a PushModelHeader")
    return first.header


def receive_push(
    chunks: Iterator[pb.PushModelChunk], staging: Path, limits: PushConfig
) -> ReceivedPush:
    """Write a push stream's files into `staging` (an empty directory), checking as they come.

    Raises:
        InvalidArgument: the stream is malformed (no header first, a second header, a path as
            a file name, a gap or overlap in offsets, a file without its sha256, a file sent
            twice).
        PushRejected: a file is pickled, not accepted, too large, missing, or corrupted in
            transit (sha256 mismatch).
    """
    header = _header(chunks)
    done: dict[str, int] = {}
    total = 0
    sink: _Sink | None = None
    try:
        for chunk in chunks:
            if chunk.WhichOneof("chunk") != "file":
                raise InvalidArgument("header", "only the first message may be a header")
            piece = chunk.file
            if sink is None or piece.filename != sink.path.name:
                if sink is not None:
                    raise InvalidArgument(
                        "file.sha256",
                        f"{sink.path.name} ended without its sha256 (send it on the last chunk)",
                    )
                check_file_name(piece.filename)
                if piece.filename in done:
                    raise InvalidArgument("file.filename", f"{piece.filename} was sent twice")
                sink = _Sink(staging / piece.filename)
            if piece.offset != sink.size:
                raise InvalidArgument(
                    "file.offset",
                    f"{sink.path.name}: chunk at offset {piece.offset}, expected {sink.size} "
                    "(send each file's chunks in order, without gaps)",
                )
            if sink.size + len(piece.data) > limits.max_file_bytes:
                raise PushRejected(
                    "size",
                    f"{sink.path.name} is larger than push.max_file_bytes "
                    f"({limits.max_file_bytes} bytes)",
                )
            if total + len(piece.data) > limits.max_push_bytes:
                raise PushRejected(
                    "size", f"the push is larger than push.max_push_bytes ({limits.max_push_bytes})"
                )
            sink.write(piece.data)
            total += len(piece.data)
            head_known = len(sink.head) >= _HEAD_BYTES or bool(piece.sha256)
            if head_known and looks_pickled(sink.head, sink.path.name):
                raise PushRejected("pickle", f"{sink.path.name} holds a pickle; {_CONVERT_HINT}")
            if piece.sha256:
                _finish(sink, piece.sha256)
                done[sink.path.name] = sink.size
                sink = None
        if sink is not None:
            raise InvalidArgument(
                "file.sha256",
                f"{sink.path.name} ended without its sha256 (send it on the last chunk)",
            )
    finally:
        if sink is not None:
            sink.close()
    missing = [name for name in REQUIRED_FILES if name not in done]
    if missing:
        raise PushRejected("file names", f"the push lacks {', '.join(missing)}")
    return ReceivedPush(
        name=header.name,
        make_serving=header.make_serving,
        force=header.force,
        files=tuple(done),
        total_bytes=total,
    )


def _finish(sink: _Sink, sent: str) -> None:
    """Close a completed file and compare its digest with the one the client sent."""
    sink.close()
    expected = sent.strip().lower()
    if not _SHA256_PATTERN.match(expected):
        raise InvalidArgument("file.sha256", f"{sink.path.name}: {sent!r} is not a hex sha256")
    actual = sink.digest.hexdigest()
    if actual != expected:
        raise PushRejected(
            "sha256",
            f"{sink.path.name}: the received bytes hash to {actual}, the client sent {expected}; "
            "the upload was corrupted, push again",
        )
