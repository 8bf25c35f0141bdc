"""`flowserve.v1.Tensor` <-> numpy: little-endian float32, row-major.

Decoding assumes the message passed `server.validation` (shape and byte length agree). numpy
only, so that clients can use it without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from protos.flowserve.v1 import flowserve_pb2 as pb

# The wire format: float32, little-endian whatever the host's byte order.
WIRE_DTYPE = np.dtype("<f4")
BYTES_PER_VALUE = WIRE_DTYPE.itemsize


def num_bytes(shape: Sequence[int]) -> int:
    """Bytes of a float32 tensor of this shape on the wire."""
    return BYTES_PER_VALUE * math.prod(shape)


def decode_array(message: pb.Tensor) -> np.ndarray:
    """A float32 array in native byte order, shaped as the message says (a copy).

    The caller has checked that `len(message.data) == num_bytes(message.shape)`.
    """
    wire = np.frombuffer(message.data, dtype=WIRE_DTYPE)
    return wire.astype(np.float32, copy=True).reshape(tuple(message.shape))


def encode_array(array: np.ndarray) -> pb.Tensor:
    """A Tensor message holding `array` as little-endian float32."""
    wire = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return pb.Tensor(shape=list(wire.shape), data=wire.tobytes())
