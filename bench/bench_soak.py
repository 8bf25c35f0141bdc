"""Soak: the real server under minutes of mixed load; memory, descriptors and threads level off.

Set-up: `python -m server serve` in a process of its own (one torch thread, gRPC and metrics
ports picked by the OS) on a temporary store of three small random-weight models:
`soak-mlp` (2-D TimeMLP velocity model, linear path), `soak-cond` (the same with 3 classes:
labels and classifier-free guidance) and `soak-vp` (16-D noise-prediction model on the VP
path). CLIENT_THREADS client threads, each with a connection of its own, then send a weighted
random mix for `--seconds` (default 180):

- Sample: 1 to 256 samples, every solver, 0 (the model's default) to 40 steps, with and
  without seeds and trajectories, labels and guidance on `soak-cond`; some are cancelled;
- SampleStream, read to the end, or cancelled after 0 to 3 events;
- LogLikelihood, EXACT (2-D and 16-D) and HUTCHINSON (16-D, 1 to 8 probes);
- Open Inference Protocol ModelInfer: sampling (NAME) and scoring (NAME.log_prob), raw and
  typed contents;
- ListModels and GetModel;
- invalid requests (each must answer INVALID_ARGUMENT) and unknown models (NOT_FOUND);
- heavy requests with 5-50 ms deadlines, which must expire (DEADLINE_EXCEEDED) or succeed.

One more client thread opens a fresh connection every CHURN_EVERY requests, so connections
come and go as they do behind a load balancer.

Measured about 60 times a run (0.5 to 5 s apart): the server process's resident memory
(VmRSS), open file descriptors (/proc/PID/fd) and threads (/proc/PID/status), and
`flowserve_queue_rows` from /metrics. Once the load stops and the server has been idle for
QUIET_SECONDS, one more sample is taken "at rest". Every outcome is counted by RPC and status
code.

Bounds. The start of the run is warm-up: WARMUP_FRACTION of it, and at least MIN_WARMUP_SECONDS
(at most half the run). There the allocator's pools, torch's lazily built kernels, gRPC's worker
threads (its executor never shrinks) and glibc's per-thread malloc arenas grow to their working
size, which is not a leak: on 2 cores RSS climbs by about 20 MB over the first 30-40 s of load,
then wanders up and down within about 10 MB (seen over 7 minutes). The baseline is the median
over the second half of the warm-up (a median, so that one sample taken mid-batch does not set
it).

- RSS growth < RSS_GROWTH_BOUND_MB from the baseline to the median of the last 10% of the run:
  samples differ by up to about 5 MB with the batches in flight (the largest requests hold a
  few MB of states), so growth beyond 25 MB is memory kept across requests.
- RSS slope < RSS_SLOPE_BOUND_MB_PER_MIN, a least-squares fit of RSS against time after the
  warm-up, judged when that window is at least SLOPE_WINDOW_SECONDS long (the default run's
  is 144 s); over a shorter one the end of the warm-up and single steps dominate the fit, so it
  is printed, not judged. At the ~60 requests/s this mix reaches on 2 busy cores, 5 MB/min is
  about 1.4 KB kept per request (one response's worth), while the noise of the samples moves a
  two-minute fit by well under 1 MB/min.
- File descriptors at rest <= baseline + FD_GROWTH_BOUND: the baseline counts the connections
  of the load; a descriptor leaked per request or per connection grows by hundreds, while a
  churned connection in flight or a scrape in progress is one or two.
- Threads at rest <= baseline + THREAD_GROWTH_BOUND: gRPC's pool grows to the peak number of
  overlapping handlers (the client threads, plus handlers of cancelled calls that have not yet
  noticed) and keeps its workers, so it may still add one or two when a rare overlap sets a new
  peak; a thread leaked per request or stream grows by thousands.
- `flowserve_queue_rows` == 0 at rest: no job is stuck in the engine after its RPC ended.
- No INTERNAL or UNKNOWN status, no status other than the one each request expects, every
  answer to a valid request well-formed (shapes, sizes, finite values, echoed fields), no
  ERROR line or traceback in the server's log, and exit status 0 after SIGTERM.

Run with `python -m bench soak` (180 s) or `python -m bench.bench_soak --seconds 60
--plot soak.png`; `run_soak()` returns the figures for a report.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import torch
from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families

from bench.server_process import FlowserveProcess
from flows.nets import NetSpec, build_net
from flowserve.modeldir import ModelConfig, write_model_dir
from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2 as oip
from protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from server.client import MAX_MESSAGE_BYTES, generator_stub

DEFAULT_SECONDS = 180.0
MIN_SECONDS = 10.0
CLIENT_THREADS = 6
CHURN_EVERY = 25
WARMUP_FRACTION = 0.2
MIN_WARMUP_SECONDS = 30.0
SLOPE_WINDOW_SECONDS = 120.0
QUIET_SECONDS = 3.0
HIDDEN, DEPTH = 32, 2
SEED = 20240

RSS_GROWTH_BOUND_MB = 25.0
RSS_SLOPE_BOUND_MB_PER_MIN = 5.0
FD_GROWTH_BOUND = 4
THREAD_GROWTH_BOUND = 4

# Every wait is bounded: the server's start (models load and warm up first), its drain, each
# call, each scrape, and the client threads (no call outlives VALID_TIMEOUT).
VALID_TIMEOUT = 60.0
SCRAPE_TIMEOUT = 5.0
JOIN_SLACK = VALID_TIMEOUT + 30.0
MAX_REQUESTS_PER_THREAD = 1_000_000
GRACE_SECONDS = 5.0
MAX_PROBLEMS_KEPT = 20

OK = frozenset({"OK"})
INVALID = frozenset({"INVALID_ARGUMENT"})
NOT_FOUND = frozenset({"NOT_FOUND"})
EXPIRES = frozenset({"DEADLINE_EXCEEDED", "OK"})
CANCELS = frozenset({"CANCELLED", "OK"})
FORBIDDEN_STATUSES = frozenset({"INTERNAL", "UNKNOWN"})

R = TypeVar("R")


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class SoakModel:
    """One model of the soak store.

    Attributes:
        name: Model name.
        dim: Dimensions of one sample (shape `(dim,)`).
        num_classes: Real classes (0: unconditional).
        parameterization: What the network predicts.
        path: Probability path kind.
        default_solver: Solver of requests that name none.
        default_steps: Steps of requests that ask for 0.
    """

    name: str
    dim: int
    num_classes: int
    parameterization: str
    path: str
    default_solver: str
    default_steps: int


MLP = SoakModel("soak-mlp", 2, 0, "velocity", "linear", "heun", 8)
COND = SoakModel("soak-cond", 2, 3, "velocity", "linear", "euler", 6)
VP = SoakModel("soak-vp", 16, 0, "noise", "vp", "heun", 6)
MODELS = (MLP, COND, VP)


def write_store(root: Path) -> Path:
    """A store holding the three soak models, each as version 1, with random weights."""
    for index, model in enumerate(MODELS):
        torch.manual_seed(index)
        kwargs = {"dim": model.dim, "hidden": HIDDEN, "depth": DEPTH}
        if model.num_classes:
            kwargs["num_classes"] = model.num_classes
        config = ModelConfig(
            name=model.name,
            architecture=NetSpec("time_mlp", kwargs),
            sample_shape=(model.dim,),
            parameterization=model.parameterization,
            path={"kind": model.path},
            num_classes=model.num_classes,
            default_solver=model.default_solver,
            default_num_steps=model.default_steps,
        )
        write_model_dir(
            root / model.name / "1", config, build_net(config.architecture).state_dict()
        )
    return root


# ----------------------------------------------------------------------------- the server


# ----------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class ProcessSample:
    """One look at the server process.

    Attributes:
        seconds: Since the load started.
        rss_mb: Resident memory (VmRSS), MiB (printed as MB).
        fds: Open file descriptors.
        threads: Threads of the process.
        queue_rows: `flowserve_queue_rows`, NaN when the scrape failed.
    """

    seconds: float
    rss_mb: float
    fds: int
    threads: int
    queue_rows: float


def parse_proc_status(text: str) -> tuple[float, int]:
    """VmRSS in MiB and the thread count from the text of /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    rss_kib = int(fields["VmRSS"].split()[0])  # "123456 kB"
    return rss_kib / 1024.0, int(fields["Threads"])


def metric_values(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called `name` in a /metrics page, with its labels."""
    return [
        (dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def look_at(server: FlowserveProcess, since: float) -> ProcessSample:
    """RSS, descriptors and threads from /proc, then the queue gauge from /metrics.

    /proc is read before the scrape so that the scrape's own socket and thread are not counted.
    """
    seconds = time.monotonic() - since
    with open(f"/proc/{server.pid}/status") as status:
        rss_mb, threads = parse_proc_status(status.read())
    fds = len(os.listdir(f"/proc/{server.pid}/fd"))
    try:
        rows = metric_values(server.scrape(SCRAPE_TIMEOUT), "flowserve_queue_rows")
        queue_rows = rows[0][1] if rows else math.nan
    except OSError:
        queue_rows = math.nan
    return ProcessSample(seconds, rss_mb, fds, threads, queue_rows)


def median_between(
    samples: Sequence[ProcessSample],
    start: float,
    end: float,
    key: Callable[[ProcessSample], float],
) -> float:
    """Median of `key` over the samples taken in [start, end]; the nearest one if none was."""
    values = [key(s) for s in samples if start <= s.seconds <= end]
    if not values:
        middle = (start + end) / 2
        values = [key(min(samples, key=lambda s: abs(s.seconds - middle)))]
    return float(statistics.median(values))


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value units per minute (0 if < 2)."""
    if len(points) < 2:
        return 0.0
    times = np.array([p[0] for p in points])
    values = np.array([p[1] for p in points])
    spread = float(((times - times.mean()) ** 2).sum())
    if spread == 0.0:
        return 0.0
    return float(((times - times.mean()) * (values - values.mean())).sum() / spread) * 60.0


# ----------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """One request's result.

    Attributes:
        rpc: The method called ("Sample", "ModelInfer", ...).
        status: Name of the gRPC status code the client saw.
        problem: What was wrong (an unexpected status, a malformed answer), or None.
    """

    rpc: str
    status: str
    problem: str | None = None


@dataclass
class Tally:
    """Outcomes of one client thread (owned by that thread until it is joined)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    def add(self, outcome: Outcome) -> None:
        """Count an outcome; keep the first few problems' descriptions."""
        self.counts[(outcome.rpc, outcome.status)] += 1
        if outcome.problem is not None:
            self.problem_count += 1
            if len(self.problems) < MAX_PROBLEMS_KEPT:
                self.problems.append(outcome.problem)


def status_name(error: grpc.RpcError) -> tuple[str, str]:
    """The status code name and details of a failed call."""
    if isinstance(error, grpc.Call):
        return error.code().name, str(error.details())
    return "UNKNOWN", str(error)


def attempt(
    rpc: str,
    call: Callable[[], R],
    check: Callable[[R], str | None],
    expected: frozenset[str] = OK,
) -> Outcome:
    """Make one call; its outcome, with a problem if the status or the answer is wrong."""
    try:
        response = call()
    except grpc.RpcError as error:
        status, details = status_name(error)
        if status in expected:
            return Outcome(rpc, status)
        return Outcome(rpc, status, f"{rpc}: {status} ({details}); expected {sorted(expected)}")
    if "OK" not in expected:
        return Outcome(rpc, "OK", f"{rpc}: OK where {sorted(expected)} was expected")
    problem = check(response)
    return Outcome(rpc, "OK", None if problem is None else f"{rpc}: {problem}")


def accept(response: object) -> str | None:
    """The check of calls whose answer does not matter (only their status does)."""
    return None


# ----------------------------------------------------------------------------- response checks


def array_problem(data: bytes, dtype: str, shape: Sequence[int], what: str) -> str | None:
    """Whether little-endian `data` fills `shape` of `dtype` with finite values."""
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        return f"{what}: {len(data)} bytes for shape {list(shape)}, expected {expected}"
    if not np.isfinite(np.frombuffer(data, dtype=dtype)).all():
        return f"{what}: holds NaN or Inf"
    return None


def tensor_problem(tensor: pb.Tensor, shape: tuple[int, ...], what: str) -> str | None:
    """Whether a Tensor message has `shape` and finite float32 values."""
    if tuple(tensor.shape) != shape:
        return f"{what}: shape {list(tensor.shape)}, expected {list(shape)}"
    return array_problem(tensor.data, "<f4", shape, what)


def sample_problem(
    response: pb.SampleResponse,
    model: SoakModel,
    rows: int,
    steps: int,
    seed: int | None,
    snapshots: int,
) -> str | None:
    """What is wrong with a SampleResponse for this request, or None."""
    shape = (rows, model.dim)
    if response.model != model.name or response.version != 1:
        return f"answered by {response.model} v{response.version}, asked {model.name} v1"
    if response.num_steps != steps:
        return f"num_steps {response.num_steps}, expected {steps}"
    if seed is not None and response.seed != seed:
        return f"seed {response.seed}, sent {seed}"
    if response.network_evaluations <= 0:
        return f"network_evaluations {response.network_evaluations}"
    if response.queue_seconds < 0 or response.compute_seconds < 0:
        return f"negative times {response.queue_seconds}, {response.compute_seconds}"
    if len(response.trajectory) != snapshots:
        return f"{len(response.trajectory)} trajectory snapshots, expected {snapshots}"
    for index, snapshot in enumerate(response.trajectory):
        problem = tensor_problem(snapshot, shape, f"trajectory[{index}]")
        if problem is not None:
            return problem
    return tensor_problem(response.samples, shape, "samples")


def stream_problem(
    events: Sequence[pb.SampleEvent],
    model: SoakModel,
    rows: int,
    steps: int,
    seed: int | None,
    every: int,
) -> str | None:
    """What is wrong with a whole SampleStream, or None.

    Progress must be monotonic and end at `steps`, the snapshots must be the ones asked for,
    and the last event (only it) must be the response, without a trajectory.
    """
    kinds = [event.WhichOneof("event") for event in events]
    if not kinds or kinds[-1] != "response" or kinds.count("response") != 1:
        return f"events {kinds[-5:]}: the stream must end with its one response"
    done, snapshots = 0, 0
    for event in events[:-1]:
        if event.HasField("progress"):
            progress = event.progress
            if progress.num_steps != steps or not done <= progress.steps_done <= steps:
                return f"progress {progress.steps_done}/{progress.num_steps} after {done}"
            done = progress.steps_done
        else:
            snapshots += 1
            snapshot = event.snapshot
            if not every or snapshot.steps_done % every:
                return f"snapshot at step {snapshot.steps_done} with trajectory_every {every}"
            problem = tensor_problem(snapshot.x, (rows, model.dim), "snapshot")
            if problem is not None:
                return problem
    expected = steps // every if every else 0
    if snapshots != expected or done != steps:
        return f"{snapshots} snapshots (expected {expected}), progress ended at {done}/{steps}"
    return sample_problem(events[-1].response, model, rows, steps, seed, snapshots=0)


def likelihood_problem(
    response: pb.LogLikelihoodResponse,
    model: SoakModel,
    rows: int,
    seed: int | None,
    probes: int,
) -> str | None:
    """What is wrong with a LogLikelihoodResponse, or None (`probes` 0: EXACT)."""
    columns = (response.log_prob, response.std_error, response.bits_per_dim)
    if any(len(column) != rows for column in columns):
        return f"{[len(c) for c in columns]} values for {rows} points"
    if response.model != model.name or response.version != 1:
        return f"answered by {response.model} v{response.version}, asked {model.name} v1"
    if seed is not None and response.seed != seed:
        return f"seed {response.seed}, sent {seed}"
    log_prob = np.array(response.log_prob)
    if not np.isfinite(log_prob).all():
        return "log_prob holds NaN or Inf"
    bits = -log_prob / (model.dim * math.log(2.0))
    if not np.allclose(response.bits_per_dim, bits, rtol=1e-5, atol=1e-6):
        return "bits_per_dim is not -log_prob / (D ln 2)"
    std_error = np.array(response.std_error)
    if probes == 0 and (std_error != 0).any():
        return "EXACT std_error is not 0"
    if probes > 1 and not (np.isfinite(std_error) & (std_error >= 0)).all():
        return f"std_error {std_error[:4]} with {probes} probes"
    return None


def infer_problem(
    response: oip.ModelInferResponse, output: str, datatype: str, shape: list[int]
) -> str | None:
    """What is wrong with a ModelInferResponse, or None."""
    if len(response.outputs) != 1 or len(response.raw_output_contents) != 1:
        return f"{len(response.outputs)} outputs, {len(response.raw_output_contents)} raw"
    meta = response.outputs[0]
    if (meta.name, meta.datatype, list(meta.shape)) != (output, datatype, shape):
        return f"output {meta.name} {meta.datatype} {list(meta.shape)}"
    if response.model_version != "1":
        return f"model_version {response.model_version!r}"
    dtype = "<f4" if datatype == "FP32" else "<f8"
    return array_problem(response.raw_output_contents[0], dtype, shape, output)


def models_problem(response: pb.ListModelsResponse) -> str | None:
    """Whether ListModels lists exactly the soak models, sorted, at version 1."""
    listed = [(m.name, m.serving_version, tuple(m.sample_shape)) for m in response.models]
    expected = sorted((m.name, 1, (m.dim,)) for m in MODELS)
    return None if listed == expected else f"listed {listed}"


def model_problem(info: pb.ModelInfo, model: SoakModel) -> str | None:
    """Whether GetModel describes the model."""
    got = (info.name, info.version, tuple(info.sample_shape), info.num_classes, info.path)
    expected = (model.name, 1, (model.dim,), model.num_classes, model.path)
    return None if got == expected else f"GetModel {got}, expected {expected}"


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Clients:
    """One connection and the stubs on it."""

    channel: grpc.Channel
    generator: pb_grpc.GeneratorStub
    oip: oip_grpc.GRPCInferenceServiceStub

    def close(self) -> None:
        """Close the connection."""
        self.channel.close()


def connect(target: str) -> Clients:
    """A channel with a connection of its own.

    gRPC shares one connection among the channels of a process that have the same target and
    options; a local subchannel pool gives each client thread its own, as separate clients have.
    """
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )
    grpc.channel_ready_future(channel).result(timeout=VALID_TIMEOUT)
    stub = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    return Clients(channel, generator_stub(channel), stub)


def noise(rng: random.Random, rows: int, dim: int) -> np.ndarray:
    """Standard normal float32 points."""
    return np.random.default_rng(rng.randrange(2**32)).standard_normal((rows, dim), "float32")


def tensor(array: np.ndarray) -> pb.Tensor:
    """A flowserve.v1 Tensor of a float32 array."""
    return pb.Tensor(shape=list(array.shape), data=array.astype("<f4").tobytes())


def maybe_seed(rng: random.Random) -> int | None:
    """A seed half the time (the server picks one otherwise)."""
    return rng.randrange(2**31) if rng.random() < 0.5 else None


def labels_for(rng: random.Random, model: SoakModel, rows: int) -> list[int]:
    """No labels (the null class), one for every row, or one per row; none if unconditional."""
    if not model.num_classes:
        return []
    choice = rng.randrange(3)
    if choice == 0:
        return []
    if choice == 1:
        return [rng.randrange(model.num_classes)]
    return [rng.randrange(model.num_classes) for _ in range(rows)]


SOLVERS = (pb.SOLVER_UNSPECIFIED, pb.EULER, pb.MIDPOINT, pb.HEUN, pb.RK4, pb.EULER_MARUYAMA)
ODE_SOLVERS = (pb.SOLVER_UNSPECIFIED, pb.EULER, pb.MIDPOINT, pb.HEUN, pb.RK4)


def sample(clients: Clients, rng: random.Random) -> Outcome:
    """A valid Sample on any model, with every option drawn at random."""
    model = rng.choice(MODELS)
    rows = rng.choice((1, 3, 16, 64, 256))
    steps = rng.choice((0, 1, 5, 12, 40))
    resolved = steps or model.default_steps
    every = rng.choice((0, 0, 1, 4)) if resolved >= 4 else 0
    labels = labels_for(rng, model, rows)
    request = pb.SampleRequest(
        model=model.name,
        num_steps=steps,
        solver=rng.choice(SOLVERS),
        class_labels=labels,
        guidance_scale=rng.choice((0.0, 1.0, 2.5)) if labels else 0.0,
        trajectory_every=every,
    )
    if rng.random() < 0.2:
        request.initial_noise.CopyFrom(tensor(noise(rng, rows, model.dim)))
    else:
        request.num_samples = rows
    seed = maybe_seed(rng)
    if seed is not None:
        request.seed = seed
    snapshots = resolved // every if every else 0
    return attempt(
        "Sample",
        lambda: clients.generator.Sample(request, timeout=VALID_TIMEOUT),
        lambda r: sample_problem(r, model, rows, resolved, seed, snapshots),
    )


def sample_cancelled(clients: Clients, rng: random.Random) -> Outcome:
    """A long Sample cancelled by the client after a few milliseconds."""
    request = pb.SampleRequest(model=MLP.name, num_samples=1024, num_steps=400, solver=pb.RK4)
    future = clients.generator.Sample.future(request, timeout=VALID_TIMEOUT)
    time.sleep(rng.uniform(0.0, 0.02))
    if future.cancel():
        return Outcome("Sample", "CANCELLED")
    return attempt("Sample", lambda: future.result(timeout=VALID_TIMEOUT), accept, CANCELS)


def stream(clients: Clients, rng: random.Random) -> Outcome:
    """A SampleStream read to its end."""
    model = rng.choice((MLP, COND))
    rows, steps = rng.choice((1, 8, 64)), rng.choice((4, 10, 30))
    every = rng.choice((0, 1, steps))
    labels = labels_for(rng, model, rows)
    request = pb.SampleRequest(
        model=model.name,
        num_samples=rows,
        num_steps=steps,
        solver=rng.choice(SOLVERS[1:]),
        class_labels=labels,
        guidance_scale=2.0 if labels else 0.0,
        trajectory_every=every,
    )
    seed = maybe_seed(rng)
    if seed is not None:
        request.seed = seed
    return attempt(
        "SampleStream",
        lambda: list(clients.generator.SampleStream(request, timeout=VALID_TIMEOUT)),
        lambda events: stream_problem(events, model, rows, steps, seed, every),
    )


def stream_cancelled(clients: Clients, rng: random.Random) -> Outcome:
    """A long SampleStream cancelled by the client after 0 to 3 events."""
    request = pb.SampleRequest(
        model=MLP.name, num_samples=512, num_steps=1000, solver=pb.HEUN, trajectory_every=100
    )
    call = clients.generator.SampleStream(request, timeout=VALID_TIMEOUT)
    wanted = rng.randrange(4)
    if wanted == 0:
        call.cancel()
    try:
        # Bounded: the stream has at most 1000 progress events and 10 snapshots.
        for seen, _ in enumerate(call, start=1):
            if seen >= wanted:
                call.cancel()
    except grpc.RpcError as error:
        status, details = status_name(error)
        problem = None if status in CANCELS else f"SampleStream cancelled: {status} ({details})"
        return Outcome("SampleStream", status, problem)
    return Outcome("SampleStream", "OK")  # it finished before the cancel arrived


def likelihood(clients: Clients, rng: random.Random) -> Outcome:
    """A valid LogLikelihood: EXACT on any model, HUTCHINSON on the 16-D one."""
    model = rng.choice(MODELS)
    rows = rng.choice((1, 5, 32))
    hutchinson = model is VP and rng.random() < 0.7
    probes = rng.choice((1, 4, 8)) if hutchinson else 0
    request = pb.LogLikelihoodRequest(
        model=model.name,
        data=tensor(noise(rng, rows, model.dim)),
        num_steps=rng.choice((0, 2, 6)),
        solver=rng.choice(ODE_SOLVERS),
        estimator=pb.HUTCHINSON if hutchinson else pb.EXACT,
        num_probes=probes,
        class_labels=labels_for(rng, model, rows),
    )
    seed = maybe_seed(rng)
    if seed is not None:
        request.seed = seed
    return attempt(
        "LogLikelihood",
        lambda: clients.generator.LogLikelihood(request, timeout=VALID_TIMEOUT),
        lambda r: likelihood_problem(r, model, rows, seed, probes),
    )


def infer_request(
    name: str, inputs: Sequence[tuple[str, str, np.ndarray]], raw: bool
) -> oip.ModelInferRequest:
    """An OIP request with the inputs (name, datatype, array) as raw or typed contents."""
    request = oip.ModelInferRequest(model_name=name, id="soak")
    for input_name, datatype, array in inputs:
        message = request.inputs.add(name=input_name, datatype=datatype, shape=list(array.shape))
        if raw:
            request.raw_input_contents.append(array.tobytes())
        elif datatype == "FP32":
            message.contents.fp32_contents.extend(array.ravel().tolist())
        else:
            message.contents.int64_contents.extend(array.ravel().tolist())
    return request


def infer(clients: Clients, rng: random.Random) -> Outcome:
    """An OIP ModelInfer: sampling (NAME) or scoring (NAME.log_prob)."""
    model = rng.choice(MODELS)
    rows = rng.choice((1, 4, 32))
    points = noise(rng, rows, model.dim).astype("<f4")
    log_prob = rng.random() < 0.5
    inputs = [("DATA" if log_prob else "NOISE", "FP32", points)]
    if model.num_classes and rng.random() < 0.7:
        labels = [rng.randrange(model.num_classes) for _ in range(rows)]
        inputs.append(("CLASS_LABEL", "INT64", np.array(labels, dtype="<i8")))
    name = f"{model.name}.log_prob" if log_prob else model.name
    request = infer_request(name, inputs, raw=rng.random() < 0.7)
    request.parameters["num_steps"].int64_param = rng.choice((2, 6, 10))
    request.parameters["seed"].int64_param = rng.randrange(2**31)
    if log_prob and model is VP:
        request.parameters["estimator"].string_param = "hutchinson"
        request.parameters["num_probes"].int64_param = 4
    elif not log_prob:
        request.parameters["solver"].string_param = rng.choice(("euler", "heun", "rk4"))
    if log_prob:
        output, datatype, shape = "LOG_PROB", "FP64", [rows]
    else:
        output, datatype, shape = "SAMPLES", "FP32", [rows, model.dim]
    return attempt(
        "ModelInfer",
        lambda: clients.oip.ModelInfer(request, timeout=VALID_TIMEOUT),
        lambda r: infer_problem(r, output, datatype, shape),
    )


def metadata(clients: Clients, rng: random.Random) -> Outcome:
    """ListModels or GetModel."""
    if rng.random() < 0.5:
        return attempt(
            "ListModels",
            lambda: clients.generator.ListModels(pb.ListModelsRequest(), timeout=VALID_TIMEOUT),
            models_problem,
        )
    model = rng.choice(MODELS)
    request = pb.GetModelRequest(model=model.name, version=rng.choice((0, 1)))
    return attempt(
        "GetModel",
        lambda: clients.generator.GetModel(request, timeout=VALID_TIMEOUT),
        lambda info: model_problem(info, model),
    )


def invoke(clients: Clients, rpc: str, request: Message, timeout: float) -> object:
    """Call `rpc` with `request`; a stream is read to its end (it is short or it fails)."""
    if rpc == "ModelInfer":
        return clients.oip.ModelInfer(request, timeout=timeout)
    if rpc == "SampleStream":
        return list(clients.generator.SampleStream(request, timeout=timeout))
    return getattr(clients.generator, rpc)(request, timeout=timeout)


def _invalid_requests() -> tuple[tuple[str, frozenset[str], Message], ...]:
    """Requests the server must refuse: (rpc, the status expected, the request)."""
    zeros = tensor(np.zeros((2, 2), "<f4"))
    fp64 = infer_request(MLP.name, [("NOISE", "FP64", np.zeros((2, 2), "<f8"))], raw=True)
    unknown_parameter = infer_request(MLP.name, [("NOISE", "FP32", np.zeros((2, 2), "<f4"))], True)
    unknown_parameter.parameters["temperature"].int64_param = 3
    bad_solver = pb.SampleRequest(model=MLP.name, num_samples=2)
    bad_solver.MergeFromString(b"\x28\x63")  # field 5 (solver) = 99: no such enum value
    sample, likelihood = pb.SampleRequest, pb.LogLikelihoodRequest
    return (
        ("Sample", INVALID, sample(model=MLP.name, num_samples=2, num_steps=5000)),
        ("Sample", INVALID, sample(model=MLP.name)),
        ("Sample", INVALID, sample(model=MLP.name, num_samples=2, class_labels=[1])),
        ("Sample", INVALID, sample(model=COND.name, num_samples=2, guidance_scale=3.0)),
        ("Sample", INVALID, sample(model=COND.name, num_samples=2, class_labels=[7])),
        ("Sample", INVALID, sample(model=MLP.name, initial_noise=tensor(np.full((2, 2), np.nan)))),
        ("Sample", INVALID, sample(model=MLP.name, initial_noise=tensor(np.zeros((3, 5))))),
        ("Sample", INVALID, bad_solver),
        ("Sample", INVALID, sample(model=MLP.name, num_samples=2, num_steps=3, trajectory_every=4)),
        ("SampleStream", INVALID, sample(model=MLP.name, num_samples=10**6)),
        (
            "LogLikelihood",
            INVALID,
            likelihood(model=MLP.name, data=zeros, solver=pb.EULER_MARUYAMA),
        ),
        ("LogLikelihood", INVALID, likelihood(model=MLP.name)),
        (
            "LogLikelihood",
            INVALID,
            likelihood(model=MLP.name, data=zeros, estimator=pb.EXACT, num_probes=4),
        ),
        ("GetModel", INVALID, pb.GetModelRequest(model="")),
        ("ModelInfer", INVALID, fp64),
        ("ModelInfer", INVALID, unknown_parameter),
        ("Sample", NOT_FOUND, sample(model="no-such-model", num_samples=2)),
        ("GetModel", NOT_FOUND, pb.GetModelRequest(model=MLP.name, version=99)),
    )


INVALID_REQUESTS = _invalid_requests()


def invalid(clients: Clients, rng: random.Random) -> Outcome:
    """One request the server must refuse with the expected status."""
    rpc, expected, request = rng.choice(INVALID_REQUESTS)
    return attempt(rpc, lambda: invoke(clients, rpc, request, VALID_TIMEOUT), accept, expected)


def expiring(clients: Clients, rng: random.Random) -> Outcome:
    """Seconds of work under a 5-50 ms deadline: it must expire (or, rarely, finish in time)."""
    rpc = rng.choice(("Sample", "SampleStream", "LogLikelihood", "ModelInfer"))
    request: Message
    if rpc == "Sample":
        request = pb.SampleRequest(model=MLP.name, num_samples=4096, num_steps=1000, solver=pb.RK4)
    elif rpc == "SampleStream":
        request = pb.SampleRequest(model=COND.name, num_samples=2048, num_steps=1000)
    elif rpc == "LogLikelihood":
        data = tensor(noise(rng, 256, VP.dim))
        request = pb.LogLikelihoodRequest(
            model=VP.name, data=data, num_steps=200, estimator=pb.EXACT
        )
    else:
        inputs = [("NOISE", "FP32", noise(rng, 4096, MLP.dim))]
        request = infer_request(MLP.name, inputs, raw=True)
        request.parameters["num_steps"].int64_param = 1000
    timeout = rng.uniform(0.005, 0.05)
    return attempt(rpc, lambda: invoke(clients, rpc, request, timeout), accept, EXPIRES)


Scenario = Callable[[Clients, random.Random], Outcome]
# Weights: mostly valid work, as production traffic is, with every abnormal path exercised
# several times a second.
SCENARIOS: tuple[tuple[Scenario, int], ...] = (
    (sample, 30),
    (sample_cancelled, 3),
    (stream, 8),
    (stream_cancelled, 4),
    (likelihood, 12),
    (infer, 12),
    (metadata, 10),
    (invalid, 12),
    (expiring, 5),
)


def client_loop(clients: Clients | None, target: str, index: int, end: float, tally: Tally) -> None:
    """Send random requests until `end` (or MAX_REQUESTS_PER_THREAD).

    With `clients` None the thread churns: it connects anew every CHURN_EVERY requests and
    closes its connection when done. Otherwise the caller owns (and closes) the connection.
    """
    rng = random.Random(SEED + index)
    scenarios = [scenario for scenario, _ in SCENARIOS]
    weights = [weight for _, weight in SCENARIOS]
    own = clients is None
    current = connect(target) if clients is None else clients
    try:
        for count in range(MAX_REQUESTS_PER_THREAD):
            if time.monotonic() >= end:
                break
            if own and count and count % CHURN_EVERY == 0:
                current.close()
                current = connect(target)
            scenario = rng.choices(scenarios, weights)[0]
            try:
                outcome = scenario(current, rng)
            except Exception as error:  # a client-side bug must show, not end the thread
                outcome = Outcome("client", "ERROR", f"{scenario.__name__} raised {error!r}")
            tally.add(outcome)
    finally:
        if own:
            current.close()


# ----------------------------------------------------------------------------- the soak


@dataclass(frozen=True)
class SoakResult:
    """The figures of one soak run.

    Attributes:
        seconds: Duration of the load.
        warmup_seconds: Its warm-up part (excluded from the bounds).
        client_threads: Client threads with a steady connection (one more churns).
        samples: The process samples taken during the load, oldest first.
        rest: The sample taken after the load, once the server was idle.
        rss_baseline_mb: Median RSS over the second half of the warm-up.
        rss_end_mb: Median RSS over the last 10% of the load.
        rss_slope_mb_per_min: Least-squares slope of RSS after the warm-up.
        fd_baseline: Median descriptor count over the second half of the warm-up.
        thread_baseline: Median thread count over the same samples.
        counts: (rpc, status, count) for every outcome seen by the clients, sorted.
        server_counts: (method, code, count) from `flowserve_requests_total` at rest, sorted.
        problems: The first problems found (unexpected statuses, malformed answers).
        problem_count: How many requests had a problem.
        log_errors: ERROR lines and tracebacks in the server's log (the first few).
        log_error_count: How many there were.
        exit_code: The server's exit status after SIGTERM.
        wall_seconds: The whole run, start and stop of the server included.
    """

    seconds: float
    warmup_seconds: float
    client_threads: int
    samples: tuple[ProcessSample, ...]
    rest: ProcessSample
    rss_baseline_mb: float
    rss_end_mb: float
    rss_slope_mb_per_min: float
    fd_baseline: float
    thread_baseline: float
    counts: tuple[tuple[str, str, int], ...]
    server_counts: tuple[tuple[str, str, int], ...]
    problems: tuple[str, ...]
    problem_count: int
    log_errors: tuple[str, ...]
    log_error_count: int
    exit_code: int
    wall_seconds: float

    @property
    def rss_growth_mb(self) -> float:
        """RSS at the end minus the baseline."""
        return self.rss_end_mb - self.rss_baseline_mb

    @property
    def fd_growth(self) -> float:
        """Descriptors at rest minus the baseline."""
        return self.rest.fds - self.fd_baseline

    @property
    def thread_growth(self) -> float:
        """Threads at rest minus the baseline."""
        return self.rest.threads - self.thread_baseline

    @property
    def slope_judged(self) -> bool:
        """Whether the window after the warm-up is long enough to judge the RSS slope."""
        return self.seconds - self.warmup_seconds >= SLOPE_WINDOW_SECONDS

    @property
    def requests(self) -> int:
        """Requests made by the clients."""
        return sum(count for _, _, count in self.counts)

    @property
    def violations(self) -> tuple[str, ...]:
        """Every bound the run broke (empty: it passed)."""
        return violations(self)

    @property
    def passed(self) -> bool:
        """Whether every bound held."""
        return not self.violations


def violations(result: SoakResult) -> tuple[str, ...]:
    """The bounds of the module docstring that `result` breaks, in words."""
    found = []
    if result.rss_growth_mb >= RSS_GROWTH_BOUND_MB:
        found.append(f"RSS grew {result.rss_growth_mb:.1f} MB (bound < {RSS_GROWTH_BOUND_MB})")
    if result.slope_judged and result.rss_slope_mb_per_min >= RSS_SLOPE_BOUND_MB_PER_MIN:
        found.append(
            f"RSS slope {result.rss_slope_mb_per_min:.2f} MB/min "
            f"(bound < {RSS_SLOPE_BOUND_MB_PER_MIN})"
        )
    if result.fd_growth > FD_GROWTH_BOUND:
        found.append(f"descriptors grew by {result.fd_growth:g} (bound <= {FD_GROWTH_BOUND})")
    if result.thread_growth > THREAD_GROWTH_BOUND:
        found.append(f"threads grew by {result.thread_growth:g} (bound <= {THREAD_GROWTH_BOUND})")
    if result.rest.queue_rows != 0:  # NaN (a failed scrape) fails too
        found.append(f"queue_rows at rest is {result.rest.queue_rows:g}, not 0")
    forbidden = [
        f"{rpc} {status} x{n}" for rpc, status, n in result.counts if status in FORBIDDEN_STATUSES
    ]
    forbidden += [
        f"server counted {method} {code} x{n:g}"
        for method, code, n in result.server_counts
        if code in FORBIDDEN_STATUSES
    ]
    if forbidden:
        found.append(f"forbidden statuses: {', '.join(forbidden)}")
    if result.problem_count:
        found.append(
            f"{result.problem_count} request(s) with a problem, first: {result.problems[0]}"
        )
    if result.log_error_count:
        first = result.log_errors[0]
        found.append(f"{result.log_error_count} error(s) in the server log, first: {first}")
    if result.exit_code != 0:
        found.append(f"server exit status {result.exit_code} after SIGTERM")
    if result.requests == 0:
        found.append("no request was made")
    return tuple(found)


def log_errors(log: str) -> list[str]:
    """Lines of the server log that report an error or start a traceback."""
    return [
        line
        for line in log.splitlines()
        if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
    ]


def server_counts(page: str) -> tuple[tuple[str, str, int], ...]:
    """(method, code, count) from `flowserve_requests_total`, summed over models."""
    totals: Counter[tuple[str, str]] = Counter()
    for labels, value in metric_values(page, "flowserve_requests_total"):
        totals[(labels["method"], labels["code"])] += int(value)
    return tuple(sorted((method, code, n) for (method, code), n in totals.items()))


def warmup_seconds(seconds: float) -> float:
    """The warm-up part of a run of `seconds` (see the module docstring)."""
    return max(WARMUP_FRACTION * seconds, min(MIN_WARMUP_SECONDS, seconds / 2))


def sample_period(seconds: float) -> float:
    """Seconds between process samples: about 60 samples a run, 0.5 to 5 s apart."""
    return max(0.5, min(5.0, seconds / 60.0))


@contextmanager
def sampling(
    server: FlowserveProcess, since: float, period: float
) -> Iterator[list[ProcessSample]]:
    """Sample the server every `period` seconds in a thread while the block runs."""
    samples: list[ProcessSample] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set() and server.process.poll() is None:
            try:
                samples.append(look_at(server, since))
            except OSError:  # the process is gone: the clients will report it
                return
            stop.wait(period)

    thread = threading.Thread(target=loop, name="soak-sampler", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(timeout=SCRAPE_TIMEOUT + period + 5.0)


@dataclass(frozen=True)
class Load:
    """What the load phase saw.

    Attributes:
        start: Its start on the `time.monotonic()` clock.
        seconds: Its duration.
        samples: The process samples, oldest first.
        tallies: The outcomes of each client thread.
    """

    start: float
    seconds: float
    samples: tuple[ProcessSample, ...]
    tallies: tuple[Tally, ...]


def run_load(server: FlowserveProcess, connections: Sequence[Clients], seconds: float) -> Load:
    """One client thread per connection, plus one that reconnects, for `seconds`, sampled."""
    tallies = tuple(Tally() for _ in range(len(connections) + 1))
    start = time.monotonic()
    end = start + seconds
    with sampling(server, start, sample_period(seconds)) as samples:
        threads = [
            threading.Thread(
                target=client_loop,
                args=(connection, server.target, index, end, tallies[index]),
                name=f"soak-client-{index}",
                daemon=True,
            )
            for index, connection in enumerate([*connections, None])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, end - time.monotonic()) + JOIN_SLACK)
        duration = time.monotonic() - start
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("a client thread did not finish in time")
    return Load(start, duration, tuple(samples), tallies)


def run_soak(seconds: float, plot: Path | None, client_threads: int = CLIENT_THREADS) -> SoakResult:
    """Start a server, load it for `seconds`, stop it; the figures (and a plot if asked)."""
    if seconds < MIN_SECONDS:
        raise ValueError(f"seconds must be >= {MIN_SECONDS}, got {seconds}")
    if client_threads < 1:
        raise ValueError(f"client_threads must be >= 1, got {client_threads}")
    wall_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flowserve-soak-") as tmp:
        store = write_store(Path(tmp) / "store")
        # One torch thread: the machine is shared with the client threads.
        server = FlowserveProcess(
            store, {"grpc": {"grace_seconds": GRACE_SECONDS}}, torch_threads=1
        )
        try:
            with ExitStack() as connections:
                # The steady connections stay open until the sample at rest has counted them.
                steady = [connect(server.target) for _ in range(client_threads)]
                for clients in steady:
                    connections.callback(clients.close)
                load = run_load(server, steady, seconds)
                time.sleep(QUIET_SECONDS)  # cancelled and expired handlers finish; sockets close
                rest = look_at(server, load.start)
                page = server.scrape()
        finally:
            exit_code = server.stop()
        if exit_code is None:  # stop() waits for the exit, so this means a bug
            raise RuntimeError("the server did not report an exit status")
        errors = log_errors(server.log())
    if not load.samples:
        raise RuntimeError("no sample of the server process was taken")
    result = summarize(
        load,
        rest,
        client_threads,
        server_counts(page),
        errors,
        exit_code,
        wall_seconds=time.monotonic() - wall_start,
    )
    if plot is not None:
        write_plot(result, plot)
    return result


def summarize(
    load: Load,
    rest: ProcessSample,
    client_threads: int,
    counted_by_server: tuple[tuple[str, str, int], ...],
    errors: Sequence[str],
    exit_code: int,
    wall_seconds: float,
) -> SoakResult:
    """The figures of a run from its raw observations (pure)."""
    samples, seconds = load.samples, load.seconds
    warmup = warmup_seconds(seconds)
    counts: Counter[tuple[str, str]] = Counter()
    problems: list[str] = []
    for tally in load.tallies:
        counts.update(tally.counts)
        problems.extend(tally.problems)
    after = [(s.seconds, s.rss_mb) for s in samples if s.seconds >= warmup]
    return SoakResult(
        seconds=seconds,
        warmup_seconds=warmup,
        client_threads=client_threads,
        samples=samples,
        rest=rest,
        rss_baseline_mb=median_between(samples, warmup / 2, warmup, lambda s: s.rss_mb),
        rss_end_mb=median_between(samples, 0.9 * seconds, seconds, lambda s: s.rss_mb),
        rss_slope_mb_per_min=slope_per_minute(after),
        fd_baseline=median_between(samples, warmup / 2, warmup, lambda s: s.fds),
        thread_baseline=median_between(samples, warmup / 2, warmup, lambda s: s.threads),
        counts=tuple(sorted((rpc, status, n) for (rpc, status), n in counts.items())),
        server_counts=counted_by_server,
        problems=tuple(problems[:MAX_PROBLEMS_KEPT]),
        problem_count=sum(tally.problem_count for tally in load.tallies),
        log_errors=tuple(errors[:MAX_PROBLEMS_KEPT]),
        log_error_count=len(errors),
        exit_code=exit_code,
        wall_seconds=wall_seconds,
    )


# ----------------------------------------------------------------------------- report


def evenly_spaced(items: Sequence[R], count: int) -> list[R]:
    """At most `count` items, spread evenly, the first and last included."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def figure_line(name: str, base: float, end: float, change: float, bound: str) -> str:
    """One row of the figures table; NaN prints as "-"."""
    cells = " ".join("        -" if math.isnan(v) else f"{v:9.2f}" for v in (base, end, change))
    return f"  {name:<24} {cells}   {bound}"


def figure_lines(result: SoakResult) -> list[str]:
    """The figures against their bounds, one line each."""
    nan = math.nan
    slope_bound = f"< {RSS_SLOPE_BOUND_MB_PER_MIN:g}"
    if not result.slope_judged:
        window = result.seconds - result.warmup_seconds
        slope_bound += f" (not judged: {window:.0f} s window < {SLOPE_WINDOW_SECONDS:g} s)"
    r = result
    return [
        f"  {'':<24} {'baseline':>9} {'end':>9} {'change':>9}   bound",
        figure_line("RSS MB", r.rss_baseline_mb, r.rss_end_mb, r.rss_growth_mb,
                    f"growth < {RSS_GROWTH_BOUND_MB:g}"),
        figure_line("RSS slope MB/min", nan, nan, r.rss_slope_mb_per_min, slope_bound),
        figure_line("fds (end: at rest)", r.fd_baseline, r.rest.fds, r.fd_growth,
                    f"growth <= {FD_GROWTH_BOUND}"),
        figure_line("threads (end: at rest)", r.thread_baseline, r.rest.threads,
                    r.thread_growth, f"growth <= {THREAD_GROWTH_BOUND}"),
        figure_line("queue_rows at rest", nan, r.rest.queue_rows, nan, "== 0"),
    ]  # fmt: skip


def count_lines(result: SoakResult) -> list[str]:
    """Requests by RPC (rows) and status (columns), with each RPC's rate."""
    statuses = sorted({status for _, status, _ in result.counts})
    table = {(rpc, status): n for rpc, status, n in result.counts}
    lines = [f"  {'rpc':<14}" + "".join(f" {s[:17]:>17}" for s in statuses) + f" {'per s':>8}"]
    for rpc in sorted({rpc for rpc, _, _ in result.counts}):
        total = sum(table.get((rpc, s), 0) for s in statuses)
        cells = "".join(f" {table.get((rpc, s), 0):>17,}" for s in statuses)
        lines.append(f"  {rpc:<14}{cells} {total / result.seconds:8.1f}")
    return lines


def print_report(result: SoakResult) -> None:
    """The time series, the figures against their bounds, the request counts and the verdict."""
    warmup = result.warmup_seconds
    print(
        f"\n[process] every {sample_period(result.seconds):.1f} s; warm-up: first {warmup:.0f} s;"
        f" baseline: median of {warmup / 2:.0f}-{warmup:.0f} s"
    )
    print(f"  {'time s':>7} {'RSS MB':>8} {'fds':>5} {'threads':>8} {'queue_rows':>11}")
    for s in [*evenly_spaced(result.samples, 16), result.rest]:
        label = "rest" if s is result.rest else f"{s.seconds:.0f}"
        print(f"  {label:>7} {s.rss_mb:8.1f} {s.fds:5d} {s.threads:8d} {s.queue_rows:11g}")

    print("\n[figures]")
    print("\n".join(figure_lines(result)))
    peak = max(result.samples, key=lambda s: s.rss_mb)
    print(
        f"  peak RSS {peak.rss_mb:.1f} MB at {peak.seconds:.0f} s; peak fds "
        f"{max(s.fds for s in result.samples)}, threads {max(s.threads for s in result.samples)}"
    )

    print(
        f"\n[requests] {result.requests:,} in {result.seconds:.0f} s from "
        f"{result.client_threads} + 1 (reconnecting) client threads: "
        f"{result.requests / result.seconds:,.1f} requests/s"
    )
    print("\n".join(count_lines(result)))
    served = sum(n for _, _, n in result.server_counts)
    print(f"  the server counted {served:,} RPCs (not those that ended before reaching it)")
    for problem in result.problems[:5]:
        print(f"  problem: {problem}")
    for line in result.log_errors[:5]:
        print(f"  server log: {line}")
    print(
        f"  run: {result.wall_seconds:.0f} s in all (server start and stop included), "
        f"server exit status {result.exit_code}"
    )
    found = result.violations
    if found:
        print(f"\nFAIL: {'; '.join(found)}")
    else:
        print("\nPASS: memory, descriptors and threads level off; every answer as expected")


def write_plot(result: SoakResult, path: Path) -> None:
    """RSS, descriptors and threads against time, with the warm-up shaded, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    times = [s.seconds for s in result.samples]
    figure, (memory, counts) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    memory.plot(times, [s.rss_mb for s in result.samples], marker=".", label="RSS")
    memory.axhline(result.rss_baseline_mb, color="gray", linestyle="--", label="baseline")
    memory.axhline(
        result.rss_baseline_mb + RSS_GROWTH_BOUND_MB, color="red", linestyle=":", label="bound"
    )
    memory.set_ylabel("RSS (MB)")
    counts.plot(times, [s.fds for s in result.samples], marker=".", label="file descriptors")
    counts.plot(times, [s.threads for s in result.samples], marker=".", label="threads")
    counts.set_ylabel("count")
    counts.set_xlabel("seconds since the load started")
    for axes in (memory, counts):
        axes.axvspan(0, result.warmup_seconds, color="0.9", label="warm-up")
        axes.legend(loc="best", fontsize="small")
    verdict = "PASS" if result.passed else "FAIL"
    memory.set_title(
        f"flowserve soak, {result.seconds:.0f} s: {verdict}, "
        f"RSS slope {result.rss_slope_mb_per_min:.2f} MB/min"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


class SoakFailed(AssertionError):
    """A soak bound was broken."""


def main(argv: Sequence[str] = ()) -> None:
    """Run the soak and print the report.

    Raises:
        SoakFailed: a bound was broken (`python -m bench` reports it as a failed benchmark).
    """
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"duration of the load (default {DEFAULT_SECONDS:g})",
    )
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument(
        "--threads",
        type=int,
        default=CLIENT_THREADS,
        help=f"client threads with a steady connection (default {CLIENT_THREADS})",
    )
    args = parser.parse_args(list(argv))
    print(
        f"soak: {args.seconds:g} s of mixed load from {args.threads} + 1 client threads on "
        f"models {', '.join(m.name for m in MODELS)} (TimeMLP {DEPTH}x{HIDDEN})",
        flush=True,
    )
    result = run_soak(args.seconds, args.plot, args.threads)
    print_report(result)
    if args.plot is not None:
        print(f"plot: {args.plot}")
    if not result.passed:
        raise SoakFailed("; ".join(result.violations))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SoakFailed:
        sys.exit(1)
