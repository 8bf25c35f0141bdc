"""Fuzzing every RPC of both gRPC APIs against a real server process, with hypothesis.

What this file proves, for the methods of flowserve.v1 (Generator: Sample, SampleStream,
LogLikelihood, ListModels, GetModel; ModelAdmin: PushModel, SetServingVersion) and of the Open
Inference Protocol (inference.GRPCInferenceService: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer):

- Every answer is OK or a deliberate status with a message: never INTERNAL or UNKNOWN, for
  requests with extreme and out-of-range values (ints at 0, negative, 2**31, 2**63 - 1, uint64
  max; floats NaN, Inf, -0, huge), negative and huge sizes, tensors whose bytes disagree with
  their shape, NaN and Inf data, shapes whose product overflows, unknown enum values, missing
  fields, unknown models and versions, garbage strings, OIP inputs with wrong names, datatypes,
  shapes and raw_input_contents counts, typed contents in place of raw ones, parameters of the
  wrong type; and for raw bytes that are not a valid message at all (INVALID_ARGUMENT).
- The verdict is right, not merely well-formed: requests built only from valid values succeed,
  requests with at least one invalid value are refused, and admin calls without the token are
  denied.
- The server stays up: the process is alive and health says SERVING after each property.
- No request makes it allocate past its configured limits: the server's peak RSS grows by less
  than a bound derived from those limits (see `rss_bound_bytes`).
- No garbage push is ever stored: after each push the store holds the same versions and the
  staging directory `STORE/.staging` is empty.

Requests are built "near valid": a valid request for a real model with zero, one or several
fields swapped for an invalid value, so that the fuzzer gets past the first check and reaches
every later one. Examples are derandomized (the same inputs on every run, for CI) and bounded:
the number of inputs sent per RPC is printed by the last test.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2 as oip
from protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from tests.conftest import ServerProcess

Code = grpc.StatusCode
MIB = 1 << 20
TOKEN = "fuzz-admin-token-0123456789"
CALL_TIMEOUT = 30.0

# The fuzzed server's limits: small, so that every limit is cheap to reach and to exceed.
MAX_TENSOR_BYTES = 65536
MAX_NUM_SAMPLES = 512
MAX_NUM_STEPS = 32
MAX_NUM_PROBES = 4
DEFAULT_NUM_PROBES = 2
EXACT_MAX_DIMENSION = 64  # the default: toyvp (70-D) defaults to HUTCHINSON
MAX_FILE_BYTES = 65536
MAX_PUSH_BYTES = 131072
MAX_WORKERS = 4
# gRPC's receive limit on the server (server.config.LimitsConfig.max_message_bytes).
MAX_MESSAGE_BYTES = MAX_TENSOR_BYTES + 4 * MIB
SERVER_CONFIG = f"""torch_threads = 1
[limits]
max_tensor_bytes = {MAX_TENSOR_BYTES}
max_num_samples = {MAX_NUM_SAMPLES}
max_num_steps = {MAX_NUM_STEPS}
max_num_probes = {MAX_NUM_PROBES}
default_num_probes = {DEFAULT_NUM_PROBES}
[push]
max_file_bytes = {MAX_FILE_BYTES}
max_push_bytes = {MAX_PUSH_BYTES}
smoke_samples = 16
smoke_steps = 4
quality_samples = 10
[grpc]
max_workers = {MAX_WORKERS}
"""


def rss_bound_bytes() -> int:
    """How much the server's peak RSS may grow while it is fuzzed.

    The fuzzer sends one request at a time, so the peak is the primed baseline plus what one
    request may hold, plus what the allocator keeps:
    - the request message, held by gRPC core, as Python bytes and parsed: 3 x the gRPC limit;
    - tensors decoded from it and results encoded into the response (inputs, samples,
      trajectory, the engine's working copies), each at most max_tensor_bytes: 8 x;
    - for a push, the file being parsed (bytes and tensors): 2 x max_file_bytes;
    - freed message buffers that glibc keeps in each worker thread's arena: 2 x the gRPC
      limit per worker;
    - 32 MiB for interpreter and torch caches.
    About 77 MiB here, against 4 YiB for a [2**40, 2**40] float32 tensor or 560 GiB for 2**31
    samples of toyvp that an unchecked size would ask for.
    """
    per_request = 3 * MAX_MESSAGE_BYTES + 8 * MAX_TENSOR_BYTES + 2 * MAX_FILE_BYTES
    allocator = MAX_WORKERS * 2 * MAX_MESSAGE_BYTES
    return per_request + allocator + 32 * MIB


# Model name -> (sample shape, number of classes, default number of steps): the tiny store.
MODELS: dict[str, tuple[tuple[int, ...], int, int]] = {
    "toy2d": ((2,), 0, 8),
    "toycond": ((2,), 3, 6),
    "toyvp": ((70,), 0, 6),
}
MODEL_NAMES = sorted(MODELS)

# Inputs sent per RPC ("Service.Method"), printed by the last test for docs/RELIABILITY.md.
CALLS: Counter[str] = Counter()
# Their answers, by RPC and status code name (printed beside the counts).
ANSWERS: Counter[tuple[str, str]] = Counter()


def fuzz_settings(examples: int) -> settings:
    """Bounded, reproducible runs: the same inputs every time, no example database."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )


# ----------------------------------------------------------------------------------------------
# Calls and the properties every answer must have.


def check_call(rpc: str, call: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
    """Run one fuzzed call: it must answer OK, or a non-INTERNAL, non-UNKNOWN status with a
    message. Returns the status code and the response (None when the call failed)."""
    CALLS[rpc] += 1
    try:
        response = call()
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        details: str | None = error.details()  # type: ignore[attr-defined]
        assert code not in (Code.INTERNAL, Code.UNKNOWN), f"{rpc} answered {code.name}: {details}"
        assert details, f"{rpc} answered {code.name} without a message"
        # The server's own status reached the client (its message fits the metadata limit).
        assert "metadata size exceeds" not in details, f"{rpc}: {details}"
        ANSWERS[rpc, code.name] += 1
        return code, None
    ANSWERS[rpc, "OK"] += 1
    return Code.OK, response


def check_verdict(code: grpc.StatusCode, valid: bool, what: object) -> None:
    """Valid requests succeed; requests with an invalid value are refused."""
    if valid:
        assert code == Code.OK, f"a valid request was refused ({code.name}): {what}"
    else:
        assert code != Code.OK, f"an invalid request was accepted: {what}"


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def admin_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """`authorization` metadata carrying `token` verbatim (None: no metadata)."""
    return () if token is None else (("authorization", token),)


def store_versions(root: Path) -> set[str]:
    """Every NAME/VERSION directory of the store (what a push would add)."""
    return {
        f"{model.name}/{version.name}"
        for model in root.iterdir()
        if model.is_dir() and not model.name.startswith(".")
        for version in model.iterdir()
        if version.is_dir()
    }


def staging_entries(root: Path) -> list[str]:
    """What is left in the push staging directory."""
    staging = root / ".staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


# ----------------------------------------------------------------------------------------------
# Value strategies.

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
EDGE_INTS: tuple[int, ...] = (0, 1, -1, 2, 2**31 - 1, 2**31, -(2**31), 2**32 - 1, 2**32)
EDGE_INTS += (2**53 + 1, INT64_MAX, INT64_MIN, 2**63, UINT64_MAX)
EDGE_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 100.0, 100.5, 3.4e38, 1e39, 1e308, 5e-324)
NON_FINITE = (math.nan, -math.nan, math.inf, -math.inf)
SEEDS = st.integers(0, 2**32 - 1)
# Odd strings: paths, NULs, control and bidi characters, case and whitespace variants of real
# names, long and huge-number strings.
ODD_STRINGS = (
    "",
    " ",
    "\x00",
    "\t\n",
    "../toy2d",
    "toy2d/../toy2d",
    "/etc/passwd",
    "toy2d\x00",
    "TOY2D",
    " toy2d",
    "toy2d ",
    "toy2d\n",
    "fuzzed\n",
    "toy2d.log_prob.log_prob",
    ".log_prob",
    ".staging",
    ".",
    "..",
    "latest",
    "\u202etoy2d",
    "%s%n%x",
    "é" * 200,
    "\U0001f600" * 50,
    "a" * 300,
    "9" * 5000,
    "x" * 20000,  # quoted in an error message, beyond the 8 KiB metadata limit
)


def enum(value: int) -> Any:
    """An int for an enum field: proto3 enums are open, any int32 is a valid value."""
    return value


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers in [low, high], edge values (0, +-1, 2**31, 2**63 - 1, ...) often."""
    edges = sorted({v for v in EDGE_INTS if low <= v <= high} | {low, high})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def floats() -> st.SearchStrategy[float]:
    """Any double, edge and non-finite values often."""
    return st.one_of(st.sampled_from(EDGE_FLOATS + NON_FINITE), st.floats())


def texts() -> st.SearchStrategy[str]:
    """Unicode text, odd strings often."""
    return st.one_of(st.text(max_size=30), st.sampled_from(ODD_STRINGS))


def is_served_name(name: str) -> bool:
    return name.removesuffix(".log_prob") in MODELS


GARBAGE_NAMES = texts().filter(lambda name: not is_served_name(name))


def corrupted(fields: Sequence[str]) -> st.SearchStrategy[frozenset[str]]:
    """Which fields get an invalid value: none (a valid request), one, or several."""
    some = st.sets(st.sampled_from(list(fields)), min_size=1, max_size=len(fields))
    one = st.sampled_from(list(fields)).map(lambda name: frozenset({name}))
    return st.one_of(st.just(frozenset()), one, some.map(frozenset))


def float32_bytes(seed: int, count: int) -> bytes:
    """`count` finite little-endian float32 values."""
    return np.random.default_rng(seed).standard_normal(count).astype("<f4").tobytes()


# Bit patterns of non-finite float32 values: quiet, signalling and negative NaNs, +-Inf.
POISON_BITS = (0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000)


@st.composite
def poisoned(draw: st.DrawFn, seed: int, count: int) -> bytes:
    """float32 data with one or more non-finite values."""
    values = np.frombuffer(float32_bytes(seed, count), dtype="<u4").copy()
    for _ in range(draw(st.integers(1, 3))):
        values[draw(st.integers(0, count - 1))] = draw(st.sampled_from(POISON_BITS))
    return values.tobytes()


@st.composite
def good_tensor(draw: st.DrawFn, sample_shape: tuple[int, ...]) -> pb.Tensor:
    """A `(rows, *sample_shape)` tensor of finite values, 1 to 8 rows."""
    shape = [draw(st.integers(1, 8)), *sample_shape]
    return pb.Tensor(shape=shape, data=float32_bytes(draw(SEEDS), math.prod(shape)))


# Shapes whose element count overflows int64 (or is absurd), and dimensions that are invalid.
OVERFLOW_SHAPES = (
    [2**40, 2**40],
    [2**32, 2**32, 2**32],
    [INT64_MAX, INT64_MAX],
    [INT64_MIN, INT64_MIN],
    [2**62, 2],
    [1, 2**40],
    [2**31, 70],
    [INT64_MAX],
    [-1, -1],
)
BAD_DIMS = (-1, 0, INT64_MIN, INT64_MAX, 2**31, 2**32, 2**40, 2**62)


@st.composite
def bad_tensor(draw: st.DrawFn, sample_shape: tuple[int, ...]) -> pb.Tensor:
    """A tensor no model of this sample shape accepts."""
    kind = draw(
        st.sampled_from(
            ["shape", "overflow", "bytes", "nonfinite", "rows", "oversize", "giant", "empty"]
        )
    )
    seed = draw(SEEDS)
    rows = draw(st.integers(1, 8))
    shape = [rows, *sample_shape]
    count = math.prod(shape)
    row_bytes = 4 * math.prod(sample_shape)
    if kind == "shape":  # another rank or another sample shape
        dims = st.one_of(st.integers(0, 80), st.sampled_from(BAD_DIMS))
        shape = draw(
            st.lists(dims, max_size=4).filter(
                lambda s: len(s) != 1 + len(sample_shape) or tuple(s[1:]) != sample_shape
            )
        )
        small = all(0 <= n <= 4096 for n in shape) and math.prod(shape) <= 4096
        data = float32_bytes(seed, math.prod(shape)) if small else draw(st.binary(max_size=64))
        return pb.Tensor(shape=shape, data=data)
    if kind == "overflow":
        return pb.Tensor(shape=draw(st.sampled_from(OVERFLOW_SHAPES)), data=draw(st.binary()))
    if kind == "bytes":  # the right shape, the wrong number of bytes
        delta = draw(st.sampled_from([-4, -3, -1, 1, 2, 4, 4096]))
        data = float32_bytes(seed, count) + bytes(max(delta, 0))
        return pb.Tensor(shape=shape, data=data[: 4 * count + delta])
    if kind == "nonfinite":
        return pb.Tensor(shape=shape, data=draw(poisoned(seed, count)))
    if kind == "rows":  # no rows, negative rows, more rows than max_num_samples
        rows = draw(st.sampled_from([0, -1, INT64_MIN, MAX_NUM_SAMPLES + 1]))
        data = bytes(max(rows, 0) * row_bytes)
        return pb.Tensor(shape=[rows, *sample_shape], data=data)
    if kind == "oversize":  # more bytes than max_tensor_bytes (or rows than max_num_samples)
        rows = min(MAX_TENSOR_BYTES // row_bytes + 1, MAX_NUM_SAMPLES + 1)
        return pb.Tensor(shape=[rows, *sample_shape], data=bytes(rows * row_bytes))
    if kind == "giant":  # a message beyond the server's gRPC receive limit
        rows = MAX_MESSAGE_BYTES // row_bytes + 1
        return pb.Tensor(shape=[rows, *sample_shape], data=bytes(rows * row_bytes))
    return pb.Tensor()  # present but empty: shape []


BAD_VERSIONS = (-1, -2, INT64_MIN, 5, 99, 2**31, INT64_MAX)
BAD_SOLVERS = (-1, 6, 99, INT32_MAX, INT32_MIN)


@dataclass(frozen=True)
class Case:
    """A fuzzed request and whether every field of it was drawn from the valid values."""

    request: Any
    valid: bool
    corrupted: frozenset[str]

    def __repr__(self) -> str:
        text = str(self.request)
        shown = text if len(text) < 2000 else text[:2000] + "..."
        return f"Case(corrupted={sorted(self.corrupted)}, request=<{shown}>)"


def bad_labels(draw: st.DrawFn, classes: int, rows: int) -> list[int]:
    """Class labels the model refuses for `rows` rows."""
    if classes == 0:  # an unconditional model takes none
        return draw(st.lists(ints(INT64_MIN, INT64_MAX), min_size=1, max_size=3))
    out_of_range = st.sampled_from([-1, classes + 1, INT64_MAX, INT64_MIN, 2**31])
    wrong_count = st.integers(2, 9).filter(lambda n: n != rows).map(lambda n: [0] * n)
    return draw(st.one_of(out_of_range.map(lambda label: [label]), wrong_count))


def good_labels(draw: st.DrawFn, classes: int, rows: int) -> list[int]:
    """None, one for all rows, or one per row (the null class `classes` included)."""
    if classes == 0:
        return []
    label = st.integers(0, classes)
    return draw(
        st.one_of(
            st.just([]),
            st.lists(label, min_size=1, max_size=1),
            st.lists(label, min_size=rows, max_size=rows),
        )
    )


def guidance(draw: st.DrawFn, bad: bool, guided: bool) -> float:
    """A guidance scale: `guided` when the model is class-conditional and labels are sent."""
    if bad:
        if guided:
            return draw(st.sampled_from([-1.0, -0.5, 100.5, 1e39, 3.4e38, *NON_FINITE]))
        return draw(st.sampled_from([2.0, -1.0, 0.5, 1e39, *NON_FINITE]))
    if guided:
        return draw(st.sampled_from([0.0, -0.0, 1.0, 0.5, 2.5, 100.0]))
    return draw(st.sampled_from([0.0, -0.0, 1.0]))


SAMPLE_FIELDS = (
    "model",
    "version",
    "initial_noise",
    "num_samples",
    "num_steps",
    "solver",
    "class_labels",
    "guidance_scale",
    "trajectory_every",
)


@st.composite
def sample_cases(draw: st.DrawFn) -> Case:
    """SampleRequests: a valid one for a served model with some fields made invalid."""
    name = draw(st.sampled_from(MODEL_NAMES))
    sample_shape, classes, default_steps = MODELS[name]
    bad = draw(corrupted(SAMPLE_FIELDS))
    request = pb.SampleRequest(model=draw(GARBAGE_NAMES) if "model" in bad else name)
    if "version" in bad:
        request.version = draw(st.sampled_from(BAD_VERSIONS))
    if "initial_noise" in bad:
        request.initial_noise.CopyFrom(draw(bad_tensor(sample_shape)))
    elif draw(st.booleans()):
        request.initial_noise.CopyFrom(draw(good_tensor(sample_shape)))
    if request.HasField("initial_noise"):
        noise_rows = list(request.initial_noise.shape[:1]) or [0]
        rows = max(1, min(noise_rows[0], 8))
        if "num_samples" in bad:  # neither 0 nor the noise's rows
            request.num_samples = draw(ints(1, UINT32_MAX).filter(lambda n: n != noise_rows[0]))
        elif 0 <= noise_rows[0] <= UINT32_MAX:
            request.num_samples = draw(st.sampled_from([0, noise_rows[0]]))
    elif "num_samples" in bad:
        oversize = MAX_TENSOR_BYTES // (4 * math.prod(sample_shape)) + 1
        too_many = [0, MAX_NUM_SAMPLES + 1, 2**31, UINT32_MAX]
        request.num_samples = draw(st.sampled_from(too_many + [oversize] * (oversize < 2**32)))
        rows = 1
    else:
        request.num_samples = rows = draw(st.integers(1, 8))
    if "num_steps" in bad:
        request.num_steps = draw(st.sampled_from([MAX_NUM_STEPS + 1, 2**31, UINT32_MAX]))
    else:
        request.num_steps = draw(st.one_of(st.just(0), st.integers(1, 8)))
    steps = request.num_steps or default_steps
    if "trajectory_every" in bad:
        request.trajectory_every = draw(st.sampled_from([steps + 1, 2**31, UINT32_MAX]))
    else:
        request.trajectory_every = draw(st.one_of(st.just(0), st.integers(1, steps)))
    solvers = st.sampled_from(BAD_SOLVERS) if "solver" in bad else st.integers(0, 5)
    request.solver = enum(draw(solvers))
    seed = draw(st.none() | ints(0, UINT64_MAX))
    if seed is not None:
        request.seed = seed
    labels = (bad_labels if "class_labels" in bad else good_labels)(draw, classes, rows)
    request.class_labels.extend(labels)
    guided = classes > 0 and bool(labels)
    request.guidance_scale = guidance(draw, "guidance_scale" in bad, guided)
    return Case(request, valid=not bad, corrupted=bad)


LIKELIHOOD_FIELDS = (
    "model",
    "version",
    "data",
    "num_steps",
    "solver",
    "estimator",
    "num_probes",
    "class_labels",
)


@st.composite
def likelihood_cases(draw: st.DrawFn) -> Case:
    """LogLikelihoodRequests: a valid one for a served model with some fields made invalid."""
    name = draw(st.sampled_from(MODEL_NAMES))
    sample_shape, classes, _ = MODELS[name]
    bad = draw(corrupted(LIKELIHOOD_FIELDS))
    request = pb.LogLikelihoodRequest(model=draw(GARBAGE_NAMES) if "model" in bad else name)
    if "version" in bad:
        request.version = draw(st.sampled_from(BAD_VERSIONS))
    rows = 1
    if "data" not in bad:
        request.data.CopyFrom(draw(good_tensor(sample_shape)))
        rows = request.data.shape[0]
    elif draw(st.booleans()):  # else missing: data is required
        request.data.CopyFrom(draw(bad_tensor(sample_shape)))
    if "num_steps" in bad:
        request.num_steps = draw(st.sampled_from([MAX_NUM_STEPS + 1, 2**31, UINT32_MAX]))
    else:
        request.num_steps = draw(st.one_of(st.just(0), st.integers(1, 4)))
    # EULER_MARUYAMA (5) is an SDE solver: no likelihood.
    solvers = st.sampled_from((5, *BAD_SOLVERS)) if "solver" in bad else st.integers(0, 4)
    request.solver = enum(draw(solvers))
    dimension = math.prod(sample_shape)
    # EXACT above EXACT_MAX_DIMENSION is valid but costs a backward pass per dimension: the
    # priming requests cover it once.
    estimators = [0, 1, 2] if dimension <= EXACT_MAX_DIMENSION else [0, 2]
    bad_estimators = [3, -1, 99, INT32_MIN]
    request.estimator = enum(
        draw(st.sampled_from(bad_estimators if "estimator" in bad else estimators))
    )
    exact = request.estimator == pb.EXACT or (
        request.estimator == pb.ESTIMATOR_UNSPECIFIED and dimension <= EXACT_MAX_DIMENSION
    )
    if "num_probes" in bad:
        too_many = st.sampled_from([MAX_NUM_PROBES + 1, 2**31, UINT32_MAX])
        request.num_probes = draw(ints(1, UINT32_MAX) if exact else too_many)
    else:
        request.num_probes = 0 if exact else draw(st.integers(0, MAX_NUM_PROBES))
    seed = draw(st.none() | ints(0, UINT64_MAX))
    if seed is not None:
        request.seed = seed
    labels = (bad_labels if "class_labels" in bad else good_labels)(draw, classes, rows)
    request.class_labels.extend(labels)
    return Case(request, valid=not bad, corrupted=bad)


@st.composite
def get_model_cases(draw: st.DrawFn) -> Case:
    """GetModelRequests: served or garbage names, the serving version or another."""
    bad = draw(corrupted(("model", "version")))
    model = draw(GARBAGE_NAMES if "model" in bad else st.sampled_from(MODEL_NAMES))
    version = draw(st.sampled_from(BAD_VERSIONS) if "version" in bad else st.just(0))
    return Case(pb.GetModelRequest(model=model, version=version), not bad, bad)


# Open Inference Protocol.

OIP_BAD_VERSIONS = (
    "0",
    "-1",
    "+1",
    "1.0",
    " 1",
    "1 ",
    "5",
    "0x1",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: isdigit() but not ASCII
    "\u00b2",  # SUPERSCRIPT TWO: isdigit() but not int()
    "9" * 19,
    str(2**64),
    "9" * 5000,  # beyond Python's int-from-string digit limit
    "1" * 20000,
)


@st.composite
def oip_model_cases(draw: st.DrawFn, message: type[Message]) -> Case:
    """ModelReady/ModelMetadata requests: NAME or NAME.log_prob, garbage names, odd versions."""
    bad = draw(corrupted(("name", "version")))
    if "name" in bad:
        name = draw(GARBAGE_NAMES)
    else:
        name = draw(st.sampled_from(MODEL_NAMES)) + draw(st.sampled_from(["", ".log_prob"]))
    version = (
        draw(st.one_of(st.sampled_from(OIP_BAD_VERSIONS), texts())) if "version" in bad else ""
    )
    if "version" in bad and (not version or (version.lstrip("0") in "12" and version.isdigit())):
        version = "5"  # texts() may draw a served version
    return Case(message(name=name, version=version), not bad, bad)


INFER_FIELDS = ("model_name", "model_version", "inputs", "raw_count", "outputs", "parameters")
INPUT_FAULTS = (
    "unknown_name",
    "duplicate",
    "datatype",
    "negative_dim",
    "rank",
    "overflow",
    "count",
    "nonfinite",
    "missing_main",
    "wrong_contents",
    "no_rows",
    "too_many_rows",
    "labels",
    "giant",
)
DATATYPES = ("FP32", "FP64", "FP16", "INT64", "INT32", "BYTES", "BOOL", "fp32", "", "FP32 ")
IGNORED_PARAMETERS = ("priority", "timeout", "binary_data_output", "headers")


def parameter(**value: Any) -> oip.InferParameter:
    return oip.InferParameter(**value)


def any_parameter() -> st.SearchStrategy[oip.InferParameter]:
    """A parameter of any type, with edge values."""
    return st.one_of(
        st.builds(lambda v: parameter(bool_param=v), st.booleans()),
        st.builds(lambda v: parameter(int64_param=v), ints(INT64_MIN, INT64_MAX)),
        st.builds(lambda v: parameter(uint64_param=v), ints(0, UINT64_MAX)),
        st.builds(lambda v: parameter(double_param=v), floats()),
        st.builds(lambda v: parameter(string_param=v), texts()),
        st.just(oip.InferParameter()),  # no value set
    )


def int_parameter(value: int) -> oip.InferParameter:
    return parameter(int64_param=value)


@st.composite
def good_parameters(
    draw: st.DrawFn, log_prob: bool, exact: bool, guided: bool
) -> dict[str, oip.InferParameter]:
    """Parameters a request for this model accepts (a random subset)."""
    choices: dict[str, st.SearchStrategy[oip.InferParameter]] = {
        "num_steps": st.integers(0, 4).map(int_parameter),
        "seed": ints(0, INT64_MAX).map(int_parameter),
    }
    if log_prob:
        estimator = "EXACT" if exact else draw(st.sampled_from(["hutchinson", "Hutchinson"]))
        choices["estimator"] = st.just(parameter(string_param=estimator))
        probes = st.just(0) if exact else st.integers(0, MAX_NUM_PROBES)
        choices["num_probes"] = probes.map(int_parameter)
    else:
        solvers = ["euler", "HEUN", "midpoint", "rk4", "euler_maruyama"]
        choices["solver"] = st.sampled_from(solvers).map(lambda s: parameter(string_param=s))
        scales = [0.5, 2.0, 100.0] if guided else [0.0, 1.0]
        choices["guidance_scale"] = st.one_of(
            st.sampled_from(scales).map(lambda v: parameter(double_param=v)),
            st.sampled_from(scales).map(lambda v: parameter(string_param=repr(v))),
            st.sampled_from([s for s in scales if s == int(s)]).map(
                lambda v: parameter(int64_param=int(v))
            ),
        )
    names = draw(st.sets(st.sampled_from(sorted(choices))))
    values = {name: draw(choices[name]) for name in names}
    for name in draw(st.sets(st.sampled_from(IGNORED_PARAMETERS))):
        values[name] = draw(any_parameter())
    return values


@st.composite
def bad_parameter(
    draw: st.DrawFn, log_prob: bool, exact: bool, guided: bool
) -> tuple[str, oip.InferParameter]:
    """One parameter this request refuses: unknown, of the wrong type, or out of range."""
    wrong_type = st.one_of(
        st.builds(lambda v: parameter(bool_param=v), st.booleans()),
        st.builds(lambda v: parameter(double_param=v), floats()),
        st.builds(lambda v: parameter(string_param=v), texts()),
        st.just(oip.InferParameter()),
    )
    steps = st.one_of(
        wrong_type,
        st.sampled_from([-1, INT64_MIN, MAX_NUM_STEPS + 1, 2**32, INT64_MAX]).map(int_parameter),
        st.just(parameter(uint64_param=UINT64_MAX)),
    )
    seed = st.one_of(
        wrong_type,
        st.sampled_from([-1, INT64_MIN]).map(int_parameter),
        st.sampled_from([2**63, UINT64_MAX]).map(lambda v: parameter(uint64_param=v)),
    )
    unknown = GARBAGE_NAMES.filter(lambda name: name not in IGNORED_PARAMETERS)
    choices: dict[str, st.SearchStrategy[oip.InferParameter]] = {
        "num_steps": steps,
        "seed": seed,
    }
    if log_prob:
        bad_estimators = st.one_of(
            st.sampled_from(["bogus", "", "exact ", "EULER"]).map(
                lambda s: parameter(string_param=s)
            ),
            st.sampled_from([1, 2]).map(int_parameter),
        )
        choices["estimator"] = bad_estimators
        probes = [1, 2, MAX_NUM_PROBES] if exact else [MAX_NUM_PROBES + 1, 2**32]
        choices["num_probes"] = st.one_of(
            st.sampled_from([-1, *probes]).map(int_parameter), st.just(parameter(bool_param=True))
        )
        # Sampling parameters mean nothing to NAME.log_prob.
        choices["solver"] = st.just(parameter(string_param="euler"))
        choices["guidance_scale"] = st.just(parameter(double_param=1.0))
    else:
        choices["solver"] = st.one_of(
            st.sampled_from(["bogus", "", "euler ", "EULER-MARUYAMA", "0"]).map(
                lambda s: parameter(string_param=s)
            ),
            st.sampled_from([1, 3]).map(int_parameter),
        )
        numbers = [-1.0, 100.5, 1e39, *NON_FINITE] if guided else [2.0, -1.0, *NON_FINITE]
        choices["guidance_scale"] = st.one_of(
            st.sampled_from(numbers).map(lambda v: parameter(double_param=v)),
            st.sampled_from(["nan", "inf", "-1", "1e999", "abc", "", "1_000"]).map(
                lambda s: parameter(string_param=s)
            ),
            st.just(parameter(bool_param=True)),
        )
        choices["estimator"] = st.just(parameter(string_param="exact"))
        choices["num_probes"] = st.just(int_parameter(1))
    name = draw(st.one_of(st.sampled_from(sorted(choices)), unknown))
    value = draw(choices[name]) if name in choices else draw(any_parameter())
    return name, value


@dataclass
class OipInput:
    """One input tensor under construction: metadata, values and how they travel."""

    tensor: oip.ModelInferRequest.InferInputTensor
    raw: bytes


def fp32_input(name: str, shape: list[int], raw: bytes) -> OipInput:
    tensor = oip.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=shape)
    return OipInput(tensor, raw)


def int64_input(name: str, values: list[int]) -> OipInput:
    tensor = oip.ModelInferRequest.InferInputTensor(
        name=name, datatype="INT64", shape=[len(values)]
    )
    return OipInput(tensor, np.asarray(values, dtype="<i8").tobytes())


def set_typed(item: OipInput) -> None:
    """Put an input's values into the typed `contents` field of its datatype."""
    contents = item.tensor.contents
    if item.tensor.datatype == "INT64":
        contents.int64_contents.extend(np.frombuffer(item.raw, dtype="<i8").tolist())
    else:
        usable = len(item.raw) - len(item.raw) % 4
        contents.fp32_contents.extend(np.frombuffer(item.raw[:usable], dtype="<f4").tolist())


@st.composite
def infer_cases(draw: st.DrawFn) -> Case:
    """ModelInferRequests for NAME (sampling) or NAME.log_prob, some fields made invalid."""
    name = draw(st.sampled_from(MODEL_NAMES))
    sample_shape, classes, _ = MODELS[name]
    log_prob = draw(st.booleans())
    bad = draw(corrupted(INFER_FIELDS))
    main, output = ("DATA", "LOG_PROB") if log_prob else ("NOISE", "SAMPLES")
    request = oip.ModelInferRequest(id=draw(texts()))
    if "model_name" in bad:
        request.model_name = draw(GARBAGE_NAMES)
    else:
        request.model_name = name + (".log_prob" if log_prob else "")
    if "model_version" in bad:
        request.model_version = draw(st.sampled_from(OIP_BAD_VERSIONS))
    rows = draw(st.integers(1, 8))
    shape = [rows, *sample_shape]
    inputs = [fp32_input(main, shape, float32_bytes(draw(SEEDS), math.prod(shape)))]
    labels = good_labels(draw, classes, rows)
    if labels:
        inputs.append(int64_input("CLASS_LABEL", labels))
    typed = draw(st.booleans())  # typed contents instead of raw_input_contents
    if "inputs" in bad:
        typed = corrupt_inputs(draw, inputs, main, sample_shape, classes, typed)
    for item in inputs:
        for key, value in draw(st.dictionaries(texts(), any_parameter(), max_size=2)).items():
            item.tensor.parameters[key].CopyFrom(value)  # per-input parameters are ignored
    raw = [item.raw for item in inputs]
    if "raw_count" in bad:  # one entry more or fewer than there are inputs
        typed = False
        raw = [*raw, b""] if draw(st.booleans()) or len(raw) < 2 else raw[:-1]
        if not raw:
            raw = [b"", b""]
    if typed:
        for item in inputs:
            set_typed(item)
    else:
        request.raw_input_contents.extend(raw)
    request.inputs.extend(item.tensor for item in inputs)
    if "outputs" in bad:
        wrong = st.sampled_from(["SAMPLES" if log_prob else "LOG_PROB", "", "samples", "FOO"])
        request.outputs.add(name=draw(st.one_of(wrong, GARBAGE_NAMES)))
    elif draw(st.booleans()):
        request.outputs.add(name=output)
    dimension = math.prod(sample_shape)
    exact = dimension <= EXACT_MAX_DIMENSION
    guided = classes > 0 and bool(labels)
    parameters = draw(good_parameters(log_prob, exact, guided))
    if "parameters" in bad:
        key, value = draw(bad_parameter(log_prob, exact, guided))
        parameters[key] = value
    for key, value in parameters.items():
        request.parameters[key].CopyFrom(value)
    return Case(request, valid=not bad, corrupted=bad)


def corrupt_inputs(
    draw: st.DrawFn,
    inputs: list[OipInput],
    main: str,
    sample_shape: tuple[int, ...],
    classes: int,
    typed: bool,
) -> bool:
    """Make the inputs invalid in one way; returns whether the values travel typed."""
    fault = draw(st.sampled_from(INPUT_FAULTS))
    first = inputs[0]
    rows = first.tensor.shape[0]
    if fault == "unknown_name":
        other = draw(st.one_of(st.sampled_from(["DATA" if main == "NOISE" else "NOISE"]), texts()))
        other = other if other not in (main, "CLASS_LABEL") else "FOO"
        inputs.append(fp32_input(other, list(first.tensor.shape), first.raw))
    elif fault == "duplicate":
        inputs.append(fp32_input(main, list(first.tensor.shape), first.raw))
    elif fault == "datatype":
        first.tensor.datatype = draw(st.sampled_from([d for d in DATATYPES if d != "FP32"]))
    elif fault == "negative_dim":
        first.tensor.shape[draw(st.integers(0, len(first.tensor.shape) - 1))] = draw(
            st.sampled_from([-1, INT64_MIN])
        )
    elif fault == "rank":  # [rows] or [rows, *sample_shape, 1], same number of values
        shape = (
            [rows * math.prod(sample_shape)] if draw(st.booleans()) else [rows, *sample_shape, 1]
        )
        del first.tensor.shape[:]
        first.tensor.shape.extend(shape)
    elif fault == "overflow":
        del first.tensor.shape[:]
        first.tensor.shape.extend(draw(st.sampled_from(OVERFLOW_SHAPES)))
    elif fault == "count":  # bytes (or values) that do not fill the shape
        cut = draw(st.sampled_from([-8, -4, -1, 1, 4, 8]))
        first.raw = (first.raw + bytes(max(cut, 0)))[: len(first.raw) + cut]
    elif fault == "nonfinite":
        first.raw = draw(poisoned(draw(SEEDS), len(first.raw) // 4))
    elif fault == "missing_main":
        inputs.remove(first)
        if not inputs:
            return typed
    elif fault == "wrong_contents":  # values in the typed field of another datatype
        typed = False
        wrong_field = draw(st.sampled_from(["fp64_contents", "int64_contents", "int_contents"]))
        values = np.frombuffer(first.raw, dtype="<f4")
        getattr(first.tensor.contents, wrong_field).extend(
            int(v) if "int" in wrong_field else float(v) for v in values
        )
        first.raw = b""
        return True
    elif fault == "no_rows":
        del first.tensor.shape[:]
        first.tensor.shape.extend([0, *sample_shape])
        first.raw = b""
    elif fault == "too_many_rows":
        rows = MAX_NUM_SAMPLES + 1
        del first.tensor.shape[:]
        first.tensor.shape.extend([rows, *sample_shape])
        first.raw = bytes(4 * rows * math.prod(sample_shape))
    elif fault == "labels":
        inputs[1:] = []
        if classes == 0:
            inputs.append(
                int64_input(
                    "CLASS_LABEL", draw(st.lists(st.integers(0, 2), min_size=1, max_size=3))
                )
            )
        else:
            labels = bad_labels(draw, classes, rows)
            label_input = int64_input("CLASS_LABEL", labels)
            if draw(st.booleans()):  # a 2-D label tensor
                label_input.tensor.shape.append(1)
            inputs.append(label_input)
    elif fault == "giant":
        rows = MAX_MESSAGE_BYTES // (4 * math.prod(sample_shape)) + 1
        del first.tensor.shape[:]
        first.tensor.shape.extend([rows, *sample_shape])
        first.raw = bytes(4 * rows * math.prod(sample_shape))
        return False
    return typed


# ----------------------------------------------------------------------------------------------
# ModelAdmin strategies.

# Token variants: missing, malformed, wrong; the valid one is `f"Bearer {TOKEN}"`.
BAD_TOKENS = (
    None,
    "",
    TOKEN,
    f"bearer {TOKEN}",
    f"Bearer {TOKEN}x",
    f"Bearer {TOKEN[:-1]}",
    f"Basic {TOKEN}",
    "Bearer ",
    "Bearer",
)


def bad_tokens() -> st.SearchStrategy[str | None]:
    printable = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60)
    return st.one_of(st.sampled_from(BAD_TOKENS), printable, printable.map("Bearer ".__add__))


@st.composite
def admin_tokens(draw: st.DrawFn) -> str | None:
    """The valid token two times in three, else a bad one."""
    if draw(st.integers(0, 2)) < 2:
        return f"Bearer {TOKEN}"
    return draw(bad_tokens())


@st.composite
def set_serving_cases(draw: st.DrawFn) -> tuple[pb.SetServingVersionRequest, str | None]:
    """SetServingVersion requests with any token: names and versions, served and not."""
    names = st.one_of(st.sampled_from(MODEL_NAMES), texts())
    versions = st.one_of(st.integers(0, 4), ints(INT64_MIN, INT64_MAX))
    request = pb.SetServingVersionRequest(model=draw(names), version=draw(versions))
    token = draw(admin_tokens())
    return request, token


@dataclass(frozen=True)
class PushSource:
    """A valid model version's files (toy2d version 1), the material of fuzzed pushes."""

    config: dict[str, Any] = field(repr=False)
    weights: bytes = field(repr=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Values of config.json fields that a model directory must refuse (each on its own).
BAD_CONFIG_VALUES: dict[str, tuple[Any, ...]] = {
    "format_version": (2, 0, -1, "1", None, 1.5, 2**64, True),
    "name": ("", "../evil", "a" * 65, "bad name", None, 7, "é", ".hidden"),
    "architecture": (
        None,
        [],
        "time_mlp",
        {"kind": "nope"},
        {"kind": "time_mlp"},
        {"kind": "time_mlp", "kwargs": {"dim": 2, "hidden": 17, "depth": 2}},
        {"kind": "time_mlp", "kwargs": {"dim": 2, "hidden": 2**40, "depth": 2}},
        {"kind": "time_mlp", "kwargs": {"dim": 2, "hidden": 16, "depth": 40}},
        {"kind": "time_mlp", "kwargs": {"dim": 2, "hidden": -1}},
        {"kind": "time_mlp", "kwargs": {"dim": 2.5}},
        {"kind": "time_mlp", "kwargs": {"dim": True}},
        {"kind": "time_mlp", "kwargs": {"dim": 2, "bogus": 1}},
        {"kind": "time_mlp", "kwargs": "dim=2"},
        {"kind": "conv_unet8", "kwargs": {}},
        {"kind": "time_mlp", "kwargs": {"dim": 2, "hidden": 16, "depth": 2}, "extra": 1},
    ),
    "sample_shape": (
        [2, 1],
        [],
        [-2],
        [0],
        "2",
        [2**40],
        [2**40, 2**40],
        [2.0],
        None,
        [True, True],
    ),
    "parameterization": ("bogus", "", None, 5, "noise", "score"),
    "path": (
        {"kind": "nope"},
        {},
        None,
        "linear",
        [],
        {"kind": "linear", "extra": 1},
        {"kind": "vp", "beta_min": "x"},
        {"kind": "vp", "beta_min": None},
        {"kind": "vp", "beta_min": [1]},
    ),
    "num_classes": (-1, 1, 2**63, "0", None, 0.0, True),
    "default_solver": ("", "EULER", "rk5", None, 3),
    "default_num_steps": (0, -1, 1001, 2**64, "8", 8.0, None, True),
    "dataset": (5, [], {}),
    "training": ("x", [], 5),
    "sha256": ({}, {"model.safetensors": "0" * 64}, {"model.safetensors": "zz"}, "abc", []),
}


@st.composite
def bad_config(draw: st.DrawFn, source: PushSource, weights: bytes) -> bytes:
    """config.json bytes that no model directory accepts (with weights' true sha256)."""
    config = json.loads(json.dumps(source.config))
    config["sha256"] = {"model.safetensors": sha256(weights)}
    kind = draw(
        st.sampled_from(
            ["field", "field", "field", "missing", "unknown", "bytes", "deep", "bigint"]
        )
    )
    if kind == "field":
        key = draw(st.sampled_from(sorted(BAD_CONFIG_VALUES)))
        config[key] = draw(st.sampled_from(BAD_CONFIG_VALUES[key]))
    elif kind == "missing":
        del config[draw(st.sampled_from(sorted(set(config) - {"dataset", "training"})))]
    elif kind == "unknown":
        config[draw(texts().filter(lambda k: k not in config))] = draw(st.integers())
    elif kind == "bytes":  # not JSON (or not UTF-8)
        return draw(st.one_of(st.binary(max_size=200), st.sampled_from([b"", b"{", b"\xff\xfe{}"])))
    elif kind == "deep":  # nesting beyond Python's recursion limit
        depth = draw(st.sampled_from([2000, 20000]))
        key = draw(st.sampled_from(["training", "path", "architecture"]))
        text = json.dumps({**config, key: "__DEEP__"})
        return text.replace('"__DEEP__"', "[" * depth + "]" * depth).encode()
    else:  # an integer with more digits than Python converts from a string
        key = draw(st.sampled_from(["default_num_steps", "num_classes", "format_version"]))
        text = json.dumps({**config, key: "__BIG__"})
        return text.replace('"__BIG__"', "9" * draw(st.sampled_from([4301, 50000]))).encode()
    return json.dumps(config).encode()


@st.composite
def bad_weights(draw: st.DrawFn, weights: bytes) -> bytes:
    """model.safetensors bytes that are not a valid file of the architecture's weights."""
    header_length = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8 : 8 + header_length])
    body = weights[8 + header_length :]
    kind = draw(
        st.sampled_from(
            ["truncate", "garbage", "length", "nan", "header", "shape", "dtype", "pickle", "empty"]
        )
    )
    if kind == "truncate":
        return weights[: draw(st.integers(0, len(weights) - 1))]
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=400))
    if kind == "length":  # a header length that lies
        length = draw(st.sampled_from([0, header_length + 1, 2**31, 2**63, UINT64_MAX]))
        return struct.pack("<Q", length) + weights[8:]
    if kind == "nan":  # finite-weights check: every float32 value non-finite
        bits = draw(st.sampled_from(POISON_BITS))
        return weights[: 8 + header_length] + np.full(len(body) // 4, bits, "<u4").tobytes()
    if kind == "header":  # the header replaced by garbage of the same length
        return weights[:8] + draw(st.binary(min_size=header_length, max_size=header_length)) + body
    tensors = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(tensors))
    if kind == "shape":
        header[key]["shape"] = draw(st.sampled_from([[2**40, 2**40], [0], [-1], [1, 1, 1], []]))
    elif kind == "dtype":
        header[key]["dtype"] = draw(st.sampled_from(["F16", "F64", "I64", "BOOL", "XX"]))
    elif kind == "pickle":
        return pickle.dumps({"weights": [1.0, 2.0]}, protocol=draw(st.integers(2, 5)))
    else:
        return b""
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


# What flowserve.modeldir accepts as a model name.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BAD_FILE_NAMES = (
    "",
    "../config.json",
    "/etc/passwd",
    ".hidden",
    "model.pt",
    "weights.bin",
    "model.ckpt",
    "a" * 300,
    "x\x00y",
    "config.json\n",
    "model.safetensors/",
    "notes.txt",
    "é.json",
    "\\config.json",
    "CONFIG.JSON",
)
STREAM_FAULTS = (
    "no_header",
    "two_headers",
    "header_only",
    "empty",
    "offset",
    "no_sha",
    "sha_format",
    "wrong_sha",
    "file_name",
    "twice",
    "missing_weights",
    "too_big",
    "too_big_total",
    "zip",
)
CONTENT_FAULTS = ("config", "weights", "onnx", "header_name")


def file_chunks(
    filename: str, data: bytes, sizes: Sequence[int], digest: str | None = None
) -> list[pb.PushModelChunk]:
    """A file cut into chunks of the given sizes (the rest in the last), sha256 at the end."""
    chunks: list[pb.PushModelChunk] = []
    offset = 0
    for size in [*sizes, len(data)]:
        piece = data[offset : offset + size]
        last = offset + size >= len(data)
        chunk = pb.FileChunk(filename=filename, offset=offset, data=piece)
        if last:
            chunk.sha256 = sha256(data) if digest is None else digest
        chunks.append(pb.PushModelChunk(file=chunk))
        offset += len(piece)
        if last:
            break
    return chunks


@st.composite
def push_streams(draw: st.DrawFn, source: PushSource) -> tuple[list[pb.PushModelChunk], str]:
    """A push stream with at least one fault that must refuse it; returns it and the fault."""
    weights = source.weights
    config = json.dumps({**source.config, "sha256": {"model.safetensors": sha256(weights)}})
    files = {"config.json": config.encode(), "model.safetensors": weights}
    header = pb.PushModelHeader(
        name=draw(st.sampled_from(["", "toy2d"])),
        make_serving=draw(st.booleans()),
        force=draw(st.booleans()),
    )
    # One fault, sometimes two; content faults about half the time, so that pushes get past
    # the stream checks into the model directory checks.
    faults = {draw(st.sampled_from(CONTENT_FAULTS * 4 + STREAM_FAULTS))}
    if draw(st.integers(0, 3)) == 0:
        faults.add(draw(st.sampled_from(STREAM_FAULTS + CONTENT_FAULTS)))
    if "config" in faults:
        files["config.json"] = draw(bad_config(source, files["model.safetensors"]))
    if "weights" in faults:
        files["model.safetensors"] = draw(bad_weights(weights))
        if "config" not in faults:  # keep config.json's sha256 true, to reach the parser
            files["config.json"] = json.dumps(
                {
                    **source.config,
                    "sha256": {"model.safetensors": sha256(files["model.safetensors"])},
                }
            ).encode()
    if "onnx" in faults:  # everything else valid: the ONNX parity check must refuse it
        files["model.onnx"] = draw(st.binary(min_size=1, max_size=300))
    if "config" in faults:
        header.name = ""  # a header name would replace a bad name in config.json
    if "header_name" in faults:
        header.name = draw(texts().filter(lambda n: n != "" and not MODEL_NAME.fullmatch(n)))
    if "missing_weights" in faults:
        del files["model.safetensors"]
    if "too_big" in faults:
        files["model.safetensors"] = bytes(MAX_FILE_BYTES + 1)
    if "too_big_total" in faults:
        files = {
            name: bytes(MAX_FILE_BYTES - 100)
            for name in ("config.json", "model.safetensors", "model.onnx")
        }
    if "zip" in faults:
        files["model.safetensors"] = b"PK\x03\x04" + bytes(60)
    chunks: list[pb.PushModelChunk] = []
    for filename, data in files.items():
        sizes = draw(st.lists(st.integers(1, 4096), max_size=3))
        digest: str | None = None
        if "no_sha" in faults and filename == "model.safetensors":
            digest = ""
        if "sha_format" in faults and filename == "config.json":
            digest = draw(st.one_of(texts(), st.sampled_from(["0" * 63, "g" * 64, "0" * 65])))
            digest = digest if digest.strip() else "not hex"
        if "wrong_sha" in faults and filename == "config.json":
            digest = sha256(data + b"x")
        if "file_name" in faults and filename == "config.json":
            filename = draw(st.sampled_from(BAD_FILE_NAMES))
        chunks += file_chunks(filename, data, sizes, digest)
    if "offset" in faults and chunks:
        index = draw(st.integers(0, len(chunks) - 1))
        shift = draw(st.sampled_from([1, -1, 2**32, UINT64_MAX]))
        file = chunks[index].file
        file.offset = (file.offset + shift) % 2**64
    if "twice" in faults:
        chunks += file_chunks("config.json", files.get("config.json", b"{}"), [])
    stream = [pb.PushModelChunk(header=header), *chunks]
    if "no_header" in faults:
        stream = stream[1:]
    if "two_headers" in faults:
        stream.insert(draw(st.integers(1, len(stream))), pb.PushModelChunk(header=header))
    if "header_only" in faults:
        stream = stream[:1]
    if "empty" in faults:
        stream = []
    return stream, ",".join(sorted(faults))


# ----------------------------------------------------------------------------------------------
# Raw bytes: undecodable, truncated and mutated messages.


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a 64-bit value (negative: two's complement, 10 bytes)."""
    value &= UINT64_MAX
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# Byte strings that do not parse: an unterminated varint, a truncated length, an end-group
# without a start, an 11-byte varint, field number 0, wire types 6 and 7.
UNDECODABLE = (
    b"\xff\xff\xff",
    b"\x80",
    b"\x08",
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x0a\x05ab",
    b"\x0a\xff\xff\xff\xff\x0f",
    b"\x0c",
    b"\x0b",
    b"\x00",
    b"\x0e\x00",
    b"\x0f\x00",
    b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
)


@st.composite
def wire_field(draw: st.DrawFn, wellformed: bool) -> bytes:
    """One encoded field: well-formed unknown fields, or any tag, wire type and length."""
    if wellformed:  # field numbers none of the messages use, valid wire types
        number = draw(st.integers(100, 2**29 - 1))
        wire_type = draw(st.sampled_from([0, 1, 2, 5]))
    else:
        number = draw(st.one_of(st.integers(1, 16), st.sampled_from([0, 2**29 - 1, 2**29, 2**32])))
        wire_type = draw(st.integers(0, 7))
    if wire_type == 0:
        payload = varint(draw(ints(INT64_MIN, UINT64_MAX)))
    elif wire_type == 1:
        payload = struct.pack("<d", draw(floats()))
    elif wire_type == 2:
        body = draw(st.binary(max_size=40))
        length = (
            len(body) if wellformed else draw(st.one_of(st.just(len(body)), ints(0, UINT64_MAX)))
        )
        payload = varint(length) + body
    elif wire_type == 5:
        payload = struct.pack("<f", draw(st.floats(width=32)))
    else:  # groups (3, 4) and the reserved wire types 6 and 7
        payload = draw(st.binary(max_size=8))
    return varint((number << 3) | wire_type) + payload


def wire_messages(wellformed: bool) -> st.SearchStrategy[bytes]:
    """Concatenated fields; when not well-formed, maybe cut anywhere."""
    fields = st.lists(wire_field(wellformed), max_size=5).map(b"".join)
    if wellformed:
        return fields
    return st.tuples(fields, st.integers(0, 200)).map(lambda t: t[0][: t[1]])


@st.composite
def mutated(draw: st.DrawFn, message: bytes) -> bytes:
    """A valid serialized message, truncated, with bytes flipped or inserted."""
    data = bytearray(message)
    for _ in range(draw(st.integers(1, 3))):
        operation = draw(st.sampled_from(["truncate", "flip", "insert"]))
        position = draw(st.integers(0, len(data)))
        if operation == "truncate":
            del data[position:]
        elif operation == "flip" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def raw_payloads(example: bytes) -> st.SearchStrategy[bytes]:
    """Raw request bytes: random, known-undecodable, random fields, mutations of `example`."""
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from(UNDECODABLE),
        wire_messages(wellformed=False),
        mutated(example),
    )


@dataclass(frozen=True)
class Method:
    """One RPC as raw bytes: its path, kind, request message and a valid example."""

    path: str
    kind: str  # "unary_unary", "unary_stream" or "stream_unary"
    request: type[Message]
    example: bytes

    @property
    def rpc(self) -> str:
        service, name = self.path.lstrip("/").split("/")
        return f"{service.rsplit('.', 1)[-1]}.{name}"


def _serialized(message: Message) -> bytes:
    return message.SerializeToString()


VALID_SAMPLE = pb.SampleRequest(model="toy2d", num_samples=2, num_steps=2)
VALID_INFER = oip.ModelInferRequest(
    model_name="toy2d",
    inputs=[oip.ModelInferRequest.InferInputTensor(name="NOISE", datatype="FP32", shape=[1, 2])],
    raw_input_contents=[bytes(8)],
)
METHODS = (
    Method(
        "/flowserve.v1.Generator/Sample", "unary_unary", pb.SampleRequest, _serialized(VALID_SAMPLE)
    ),
    Method(
        "/flowserve.v1.Generator/SampleStream",
        "unary_stream",
        pb.SampleRequest,
        _serialized(VALID_SAMPLE),
    ),
    Method(
        "/flowserve.v1.Generator/LogLikelihood",
        "unary_unary",
        pb.LogLikelihoodRequest,
        _serialized(
            pb.LogLikelihoodRequest(
                model="toy2d", data=pb.Tensor(shape=[1, 2], data=bytes(8)), num_steps=2
            )
        ),
    ),
    Method("/flowserve.v1.Generator/ListModels", "unary_unary", pb.ListModelsRequest, b""),
    Method(
        "/flowserve.v1.Generator/GetModel",
        "unary_unary",
        pb.GetModelRequest,
        _serialized(pb.GetModelRequest(model="toy2d")),
    ),
    Method(
        "/flowserve.v1.ModelAdmin/PushModel",
        "stream_unary",
        pb.PushModelChunk,
        _serialized(pb.PushModelChunk(header=pb.PushModelHeader(name="toy2d"))),
    ),
    Method(
        "/flowserve.v1.ModelAdmin/SetServingVersion",
        "unary_unary",
        pb.SetServingVersionRequest,
        _serialized(pb.SetServingVersionRequest(model="toy2d", version=2)),
    ),
    Method("/inference.GRPCInferenceService/ServerLive", "unary_unary", oip.ServerLiveRequest, b""),
    Method(
        "/inference.GRPCInferenceService/ServerReady", "unary_unary", oip.ServerReadyRequest, b""
    ),
    Method(
        "/inference.GRPCInferenceService/ModelReady",
        "unary_unary",
        oip.ModelReadyRequest,
        _serialized(oip.ModelReadyRequest(name="toy2d")),
    ),
    Method(
        "/inference.GRPCInferenceService/ServerMetadata",
        "unary_unary",
        oip.ServerMetadataRequest,
        b"",
    ),
    Method(
        "/inference.GRPCInferenceService/ModelMetadata",
        "unary_unary",
        oip.ModelMetadataRequest,
        _serialized(oip.ModelMetadataRequest(name="toy2d")),
    ),
    Method(
        "/inference.GRPCInferenceService/ModelInfer",
        "unary_unary",
        oip.ModelInferRequest,
        _serialized(VALID_INFER),
    ),
)
# Requests without fields: any well-formed bytes are a valid request (unknown fields skipped).
EMPTY_REQUEST_METHODS = tuple(m for m in METHODS if not m.request.DESCRIPTOR.fields)


def decodes(message: type[Message], payload: bytes) -> bool:
    """Whether `payload` parses as `message` (the same parser the server uses)."""
    try:
        message.FromString(payload)
    except DecodeError:
        return False
    return True


def raw_call(
    channel: grpc.Channel, method: Method, payloads: Sequence[bytes], token: str | None = None
) -> Callable[[], Any]:
    """A call sending `payloads` as they are (no serializer): bytes in, bytes out."""
    metadata = admin_metadata(token)
    if method.kind == "unary_unary":
        unary = channel.unary_unary(method.path)
        return lambda: unary(payloads[0], timeout=CALL_TIMEOUT, metadata=metadata)
    if method.kind == "unary_stream":
        stream = channel.unary_stream(method.path)
        return lambda: list(stream(payloads[0], timeout=CALL_TIMEOUT, metadata=metadata))
    upload = channel.stream_unary(method.path)
    return lambda: upload(iter(payloads), timeout=CALL_TIMEOUT, metadata=metadata)


# ----------------------------------------------------------------------------------------------
# The server.


class FuzzServer:
    """The fuzzed server process, its store and its primed peak RSS."""

    def __init__(self, process: ServerProcess, store: Path, source: PushSource) -> None:
        self.process = process
        self.store = store
        self.source = source
        self.baseline_rss = 0

    def __repr__(self) -> str:  # short, for hypothesis' failure reports
        return f"FuzzServer({self.process.target})"


def prime(channel: grpc.Channel, server: FuzzServer) -> None:
    """One request down each lazily initialised path (solvers, estimators, OIP, push checks and
    onnxruntime), so that the RSS baseline holds the libraries and caches they load once."""
    generator = pb_grpc.GeneratorStub(channel)  # type: ignore[no-untyped-call]
    inference = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    admin = pb_grpc.ModelAdminStub(channel)  # type: ignore[no-untyped-call]
    for solver in range(6):
        generator.Sample(
            pb.SampleRequest(
                model="toycond",
                num_samples=8,
                num_steps=4,
                solver=enum(solver),
                class_labels=[1],
                guidance_scale=2.0,
                trajectory_every=1,
            ),
            timeout=CALL_TIMEOUT,
        )
    list(
        generator.SampleStream(
            pb.SampleRequest(model="toyvp", num_samples=8, trajectory_every=2), timeout=CALL_TIMEOUT
        )
    )
    for name, estimator in (("toy2d", pb.EXACT), ("toyvp", pb.HUTCHINSON), ("toyvp", pb.EXACT)):
        dimension = math.prod(MODELS[name][0])
        data = pb.Tensor(shape=[8, dimension], data=float32_bytes(0, 8 * dimension))
        for solver in range(5):
            generator.LogLikelihood(
                pb.LogLikelihoodRequest(
                    model=name, data=data, estimator=estimator, solver=enum(solver), num_steps=4
                ),
                timeout=CALL_TIMEOUT,
            )
    inference.ModelInfer(VALID_INFER, timeout=CALL_TIMEOUT)
    log_prob = oip.ModelInferRequest()
    log_prob.CopyFrom(VALID_INFER)
    log_prob.model_name = "toy2d.log_prob"
    log_prob.inputs[0].name = "DATA"
    inference.ModelInfer(log_prob, timeout=CALL_TIMEOUT)
    # A push of valid files with a garbage ONNX file: load, smoke test, then onnxruntime.
    config = json.dumps(server.source.config).encode()
    stream = [
        pb.PushModelChunk(header=pb.PushModelHeader()),
        *file_chunks("config.json", config, []),
        *file_chunks("model.safetensors", server.source.weights, []),
        *file_chunks("model.onnx", b"not onnx", []),
    ]
    with pytest.raises(grpc.RpcError) as refused:
        admin.PushModel(
            iter(stream), metadata=admin_metadata(f"Bearer {TOKEN}"), timeout=CALL_TIMEOUT
        )
    assert refused.value.code() == Code.FAILED_PRECONDITION, refused.value  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def fuzz_server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    """A server with small limits and an admin token, on its own copy of the tiny store
    (pushes and pins write into the store)."""
    directory = tmp_path_factory.mktemp("fuzz_server")
    store = directory / "store"
    shutil.copytree(tiny_store, store)
    (directory / "flowserve.toml").write_text(SERVER_CONFIG)
    (directory / "admin-token").write_text(TOKEN + "\n")
    args = ["--store", str(store), "--port", "0", "--metrics-port", "0"]
    args += ["--config", str(directory / "flowserve.toml")]
    args += ["--admin-token-file", str(directory / "admin-token")]
    process = ServerProcess(args, directory / "server.log")
    version = store / "toy2d" / "1"
    config = json.loads((version / "config.json").read_text())
    source = PushSource(config=config, weights=(version / "model.safetensors").read_bytes())
    server = FuzzServer(process, store, source)
    try:
        process.wait_for_line("flowserve ready")
        with grpc.insecure_channel(process.target) as channel:
            prime(channel, server)
        server.baseline_rss = peak_rss_bytes(process.process.pid)
        yield server
    finally:
        assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def channel(fuzz_server: FuzzServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.process.target) as open_channel:
        grpc.channel_ready_future(open_channel).result(timeout=CALL_TIMEOUT)
        yield open_channel


@pytest.fixture(scope="module")
def generator(channel: grpc.Channel) -> pb_grpc.GeneratorStub:
    return pb_grpc.GeneratorStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def admin(channel: grpc.Channel) -> pb_grpc.ModelAdminStub:
    return pb_grpc.ModelAdminStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def inference(channel: grpc.Channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(autouse=True)
def server_survives(fuzz_server: FuzzServer, channel: grpc.Channel) -> Iterator[None]:
    """After each property: the process is alive and health says SERVING."""
    yield
    process = fuzz_server.process
    assert process.process.poll() is None, f"the server died:\n{process.log()}"
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def assert_alive(server: FuzzServer) -> None:
    assert server.process.process.poll() is None, f"the server died:\n{server.process.log()}"


# ----------------------------------------------------------------------------------------------
# flowserve.v1.Generator.


@fuzz_settings(80)
@given(case=sample_cases())
def test_sample(fuzz_server: FuzzServer, generator: pb_grpc.GeneratorStub, case: Case) -> None:
    code, _ = check_call(
        "Generator.Sample", lambda: generator.Sample(case.request, timeout=CALL_TIMEOUT)
    )
    check_verdict(code, case.valid, case)
    assert_alive(fuzz_server)


@fuzz_settings(50)
@given(case=sample_cases())
def test_sample_stream(
    fuzz_server: FuzzServer, generator: pb_grpc.GeneratorStub, case: Case
) -> None:
    code, events = check_call(
        "Generator.SampleStream",
        lambda: list(generator.SampleStream(case.request, timeout=CALL_TIMEOUT)),
    )
    check_verdict(code, case.valid, case)
    if code == Code.OK:
        assert events[-1].WhichOneof("event") == "response"
    assert_alive(fuzz_server)


@fuzz_settings(80)
@given(case=likelihood_cases())
def test_log_likelihood(
    fuzz_server: FuzzServer, generator: pb_grpc.GeneratorStub, case: Case
) -> None:
    code, response = check_call(
        "Generator.LogLikelihood",
        lambda: generator.LogLikelihood(case.request, timeout=CALL_TIMEOUT),
    )
    check_verdict(code, case.valid, case)
    if code == Code.OK:
        assert len(response.log_prob) == case.request.data.shape[0]
    assert_alive(fuzz_server)


@fuzz_settings(40)
@given(case=get_model_cases())
def test_get_model(fuzz_server: FuzzServer, generator: pb_grpc.GeneratorStub, case: Case) -> None:
    code, _ = check_call(
        "Generator.GetModel", lambda: generator.GetModel(case.request, timeout=CALL_TIMEOUT)
    )
    check_verdict(code, case.valid, case)
    assert_alive(fuzz_server)


# ----------------------------------------------------------------------------------------------
# Open Inference Protocol.


@fuzz_settings(40)
@given(case=oip_model_cases(oip.ModelReadyRequest))
def test_oip_model_ready(
    fuzz_server: FuzzServer, inference: oip_grpc.GRPCInferenceServiceStub, case: Case
) -> None:
    code, response = check_call(
        "GRPCInferenceService.ModelReady",
        lambda: inference.ModelReady(case.request, timeout=CALL_TIMEOUT),
    )
    # ModelReady answers every name and version: ready or not, never an error.
    assert code == Code.OK
    assert response.ready == case.valid, case
    assert_alive(fuzz_server)


@fuzz_settings(40)
@given(case=oip_model_cases(oip.ModelMetadataRequest))
def test_oip_model_metadata(
    fuzz_server: FuzzServer, inference: oip_grpc.GRPCInferenceServiceStub, case: Case
) -> None:
    code, _ = check_call(
        "GRPCInferenceService.ModelMetadata",
        lambda: inference.ModelMetadata(case.request, timeout=CALL_TIMEOUT),
    )
    check_verdict(code, case.valid, case)
    assert_alive(fuzz_server)


@fuzz_settings(120)
@given(case=infer_cases())
def test_oip_model_infer(
    fuzz_server: FuzzServer, inference: oip_grpc.GRPCInferenceServiceStub, case: Case
) -> None:
    code, response = check_call(
        "GRPCInferenceService.ModelInfer",
        lambda: inference.ModelInfer(case.request, timeout=CALL_TIMEOUT),
    )
    check_verdict(code, case.valid, case)
    if code == Code.OK:
        assert response.id == case.request.id
        assert len(response.raw_output_contents) == 1
    assert_alive(fuzz_server)


@pytest.mark.parametrize("method", EMPTY_REQUEST_METHODS, ids=lambda m: m.rpc)
@fuzz_settings(20)
@given(data=st.data())
def test_unknown_fields_are_ignored(
    fuzz_server: FuzzServer, channel: grpc.Channel, method: Method, data: st.DataObject
) -> None:
    """Requests without fields (ListModels, ServerLive, ServerReady, ServerMetadata): any
    well-formed bytes are a request whose fields are all unknown, which protobuf skips."""
    payload = data.draw(wire_messages(wellformed=True))
    code, _ = check_call(method.rpc, raw_call(channel, method, [payload]))
    assert code == Code.OK
    assert_alive(fuzz_server)


# ----------------------------------------------------------------------------------------------
# Raw bytes to every method.


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rpc)
@fuzz_settings(30)
@given(data=st.data())
def test_raw_bytes(
    fuzz_server: FuzzServer, channel: grpc.Channel, method: Method, data: st.DataObject
) -> None:
    """Bytes that may not parse: INVALID_ARGUMENT when they do not, never INTERNAL."""
    before = store_versions(fuzz_server.store)
    count = data.draw(st.integers(1, 3)) if method.kind == "stream_unary" else 1
    payloads = [data.draw(raw_payloads(method.example)) for _ in range(count)]
    token = data.draw(st.sampled_from([f"Bearer {TOKEN}", None]))
    code, _ = check_call(method.rpc, raw_call(channel, method, payloads, token))
    if method.kind != "stream_unary" and not decodes(method.request, payloads[0]):
        assert code == Code.INVALID_ARGUMENT, payloads
    if method.kind == "stream_unary":
        assert code != Code.OK
        assert store_versions(fuzz_server.store) == before
        assert staging_entries(fuzz_server.store) == []
    assert_alive(fuzz_server)


# ----------------------------------------------------------------------------------------------
# flowserve.v1.ModelAdmin (last: pins change which version serves).


@fuzz_settings(50)
@given(case=set_serving_cases())
def test_set_serving_version(
    fuzz_server: FuzzServer,
    admin: pb_grpc.ModelAdminStub,
    case: tuple[pb.SetServingVersionRequest, str | None],
) -> None:
    request, token = case
    before = store_versions(fuzz_server.store)
    code, response = check_call(
        "ModelAdmin.SetServingVersion",
        lambda: admin.SetServingVersion(
            request, metadata=admin_metadata(token), timeout=CALL_TIMEOUT
        ),
    )
    if token != f"Bearer {TOKEN}":
        assert code in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED), (code, token)
    elif code == Code.OK:
        assert response.name == request.model and request.version in (0, response.version)
    assert store_versions(fuzz_server.store) == before
    assert_alive(fuzz_server)


@fuzz_settings(100)
@given(data=st.data())
def test_push_model(
    fuzz_server: FuzzServer, admin: pb_grpc.ModelAdminStub, data: st.DataObject
) -> None:
    """Garbage pushes, with and without the token: refused, and nothing of them is kept."""
    before = store_versions(fuzz_server.store)
    stream, faults = data.draw(push_streams(fuzz_server.source))
    token = data.draw(admin_tokens())
    code, _ = check_call(
        "ModelAdmin.PushModel",
        lambda: admin.PushModel(iter(stream), metadata=admin_metadata(token), timeout=CALL_TIMEOUT),
    )
    assert code != Code.OK, f"a push with faults {faults} was accepted"
    if token != f"Bearer {TOKEN}":
        assert code in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED), (code, token)
    assert store_versions(fuzz_server.store) == before
    assert staging_entries(fuzz_server.store) == []
    assert_alive(fuzz_server)


# ----------------------------------------------------------------------------------------------
# Regression tests: one for each bug the fuzzer found (not counted as fuzzed inputs).

VALID_TOKEN = f"Bearer {TOKEN}"


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The error `call` fails with."""
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value


def test_regression_undecodable_bytes_are_invalid_argument(
    fuzz_server: FuzzServer, channel: grpc.Channel
) -> None:
    """grpcio answers a request it cannot parse with INTERNAL "Exception deserializing
    request!"; server.decoding answers INVALID_ARGUMENT naming the message, for unary requests,
    streamed responses and streamed requests (a valid first chunk, then garbage)."""
    before = store_versions(fuzz_server.store)
    for method in METHODS:
        payloads = [b"\xff\xff\xff"]
        if method.kind == "stream_unary":
            payloads.insert(0, method.example)
        error = rpc_error(raw_call(channel, method, payloads, VALID_TOKEN))
        assert error.code() == Code.INVALID_ARGUMENT, (method.rpc, error)  # type: ignore[attr-defined]
        expected = f"is not a valid {method.request.DESCRIPTOR.full_name}"
        assert expected in error.details(), (method.rpc, error)  # type: ignore[attr-defined]
    assert store_versions(fuzz_server.store) == before
    assert staging_entries(fuzz_server.store) == []


def test_regression_oip_version_beyond_the_int_digit_limit(
    inference: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    """A model_version of 5000 digits made int() raise ValueError: ModelReady answered UNKNOWN,
    ModelMetadata and ModelInfer INTERNAL."""
    from server.errors import InvalidArgument
    from server.oip_codec import parse_model

    version = "9" * 5000
    ready = inference.ModelReady(oip.ModelReadyRequest(name="toy2d", version=version))
    assert not ready.ready
    infer = oip.ModelInferRequest()
    infer.CopyFrom(VALID_INFER)
    infer.model_version = version
    for call in (
        lambda: inference.ModelMetadata(oip.ModelMetadataRequest(name="toy2d", version=version)),
        lambda: inference.ModelInfer(infer, timeout=CALL_TIMEOUT),
    ):
        error = rpc_error(call)
        assert error.code() == Code.INVALID_ARGUMENT, error  # type: ignore[attr-defined]
        details = error.details()  # type: ignore[attr-defined]
        assert details.startswith("model_version") and len(details) < 200, details
    served = frozenset(MODEL_NAMES)
    assert parse_model("toy2d", "0001", served).version == 1
    assert parse_model("toy2d", str(INT64_MAX), served).version == INT64_MAX
    for bad in (str(2**63), "0", "000", "9" * 20, version):
        with pytest.raises(InvalidArgument):
            parse_model("toy2d", bad, served)


@pytest.mark.parametrize("header_name", ["", "toy2d"])
@pytest.mark.parametrize("nesting", [True, False], ids=["deep_json", "huge_int"])
def test_regression_unparsable_config_json_is_rejected(
    fuzz_server: FuzzServer, admin: pb_grpc.ModelAdminStub, header_name: str, nesting: bool
) -> None:
    """config.json nested beyond the recursion limit, or holding an int of more than 4300
    digits, made json.loads raise RecursionError or ValueError, which neither the push's
    rename (header name) nor the model directory check caught: the push was INTERNAL."""
    weights = fuzz_server.source.weights
    config = {**fuzz_server.source.config, "sha256": {"model.safetensors": sha256(weights)}}
    text = json.dumps({**config, "training": {"x": "__X__"}})
    bad = "[" * 20000 + "]" * 20000 if nesting else "9" * 5000
    stream = [
        pb.PushModelChunk(header=pb.PushModelHeader(name=header_name)),
        *file_chunks("config.json", text.replace('"__X__"', bad).encode(), []),
        *file_chunks("model.safetensors", weights, []),
    ]
    before = store_versions(fuzz_server.store)
    error = rpc_error(
        lambda: admin.PushModel(
            iter(stream), metadata=admin_metadata(VALID_TOKEN), timeout=CALL_TIMEOUT
        )
    )
    assert error.code() == Code.FAILED_PRECONDITION, error  # type: ignore[attr-defined]
    assert "JSON" in error.details(), error  # type: ignore[attr-defined]
    assert store_versions(fuzz_server.store) == before
    assert staging_entries(fuzz_server.store) == []


def test_regression_model_name_with_a_trailing_newline_is_refused(
    fuzz_server: FuzzServer, admin: pb_grpc.ModelAdminStub
) -> None:
    """The model name pattern `^...$` matched "fuzzed\\n" (`$` matches before a final newline):
    a push with that header name was stored and served as a new model."""
    from flowserve.modeldir import ModelConfig, ModelDirError

    with pytest.raises(ModelDirError):
        ModelConfig.from_dict({**fuzz_server.source.config, "name": "toy2d\n"})
    weights = fuzz_server.source.weights
    config = {**fuzz_server.source.config, "sha256": {"model.safetensors": sha256(weights)}}
    stream = [
        pb.PushModelChunk(header=pb.PushModelHeader(name="fuzzed\n")),
        *file_chunks("config.json", json.dumps(config).encode(), []),
        *file_chunks("model.safetensors", weights, []),
    ]
    before = store_versions(fuzz_server.store)
    error = rpc_error(
        lambda: admin.PushModel(
            iter(stream), metadata=admin_metadata(VALID_TOKEN), timeout=CALL_TIMEOUT
        )
    )
    assert error.code() == Code.FAILED_PRECONDITION, error  # type: ignore[attr-defined]
    assert store_versions(fuzz_server.store) == before


def test_regression_overlong_names_are_not_found(
    generator: pb_grpc.GeneratorStub, admin: pb_grpc.ModelAdminStub
) -> None:
    """SetServingVersion with a 300-character name was INTERNAL (Path.is_dir() raises OSError
    beyond 255 bytes), and a NOT_FOUND quoting a 70000-character name exceeded the client's
    metadata limit, which then reported RESOURCE_EXHAUSTED instead of the server's status."""
    from server.errors import MAX_MESSAGE_CHARS

    names = ("a" * 300, "x" * 70000, "\U0001f600" * 5000)
    calls = [
        partial(generator.GetModel, pb.GetModelRequest(model=name), timeout=CALL_TIMEOUT)
        for name in names
    ] + [
        partial(
            admin.SetServingVersion,
            pb.SetServingVersionRequest(model=name),
            metadata=admin_metadata(VALID_TOKEN),
            timeout=CALL_TIMEOUT,
        )
        for name in names
    ]
    for call in calls:
        error = rpc_error(call)
        assert error.code() == Code.NOT_FOUND, error  # type: ignore[attr-defined]
        details = error.details()  # type: ignore[attr-defined]
        assert len(details) <= MAX_MESSAGE_CHARS, details


# ----------------------------------------------------------------------------------------------
# Last: memory, and the number of inputs sent.


def test_peak_rss_stays_within_the_limits(
    fuzz_server: FuzzServer, capsys: pytest.CaptureFixture[str]
) -> None:
    peak = peak_rss_bytes(fuzz_server.process.process.pid)
    growth = peak - fuzz_server.baseline_rss
    bound = rss_bound_bytes()
    total = sum(CALLS.values())
    with capsys.disabled():
        print(f"\nfuzzed inputs: {total} in all")
        for rpc, count in sorted(CALLS.items()):
            codes = sorted((n, c) for (r, c), n in ANSWERS.items() if r == rpc)
            shown = ", ".join(f"{code} {n}" for n, code in reversed(codes))
            print(f"  {rpc}: {count} ({shown})")
        print(
            f"server peak RSS: {fuzz_server.baseline_rss / MIB:.1f} MiB primed, "
            f"{peak / MIB:.1f} MiB after fuzzing (+{growth / MIB:.1f} MiB, "
            f"bound {bound / MIB:.1f} MiB)"
        )
    assert growth <= bound, f"peak RSS grew by {growth / MIB:.1f} MiB (bound {bound / MIB:.1f} MiB)"
