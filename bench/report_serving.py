"""Report section: serving many small requests, flowserve against Triton, and single-request
latency against Triton and TorchServe.

Load: closed-loop clients (`bench.loadgen`), each sending one single-sample request at a time,
100 Euler steps, on the report network. The same client code, protocol and bytes drive
flowserve's OIP endpoint and Triton (OIP ModelInfer); flowserve.v1 Sample is measured too.
Variants, each server alone on the machine while it is measured:

- flowserve, step-level batching (the default: rows join and leave the running batch at every
  solver step), over flowserve.v1 Sample and over OIP ModelInfer; over OIP again with the
  onnxruntime backend, whose lone requests take the solo fast path (the exported whole loop);
- flowserve, request-level batching (`[engine] policy = "request"`: whole requests are batched
  and answered when the batch is done, as a dynamic batcher in front of a sampling loop does);
- Triton 2.51 (PyTriton 0.7.0, Python backend) with its dynamic batcher (max batch 256, 2 ms
  queue delay), running the same sampler on the same weights.

Latency: one 1-sample, 50-step Euler request at a time on an idle server: flowserve, Triton,
and TorchServe serving the exported `.mar`; and the floor under flowserve's figure: the
whole-loop sampler called in-process, and an empty gRPC round trip (OIP ServerLive).
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.loadgen import (
    Call,
    LoadResult,
    MakeCall,
    flowserve_sample,
    oip_infer,
    run_closed_loop,
)
from bench.report_model import DIM, MODEL, noise
from bench.server_process import FlowserveProcess
from protos.inference import grpc_predict_v2_pb2 as oip_pb
from protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from server.engine import load_whole_loop_sampler

STEPS = 100
LATENCY_STEPS = 50
LATENCY_REQUESTS = 100
SOLVER = "euler"
CONCURRENCY = (1, 16, 64, 256)
RUN_TIMEOUT_S = 300.0
# Each blocked RPC holds a gRPC worker thread: 256 clients need at least 256 of them.
GRPC_WORKERS = 512

FLOWSERVE_V1 = "flowserve v1 Sample, step-level batching"
FLOWSERVE_OIP = "flowserve OIP, step-level batching"
FLOWSERVE_ONNX = "flowserve OIP, step-level batching, onnxruntime + solo fast path"
FLOWSERVE_REQUEST = "flowserve OIP, request-level batching"
TRITON = "Triton 2.51 dynamic batcher (OIP)"


@dataclass(frozen=True)
class CpuPerRequest:
    """CPU seconds per request at the highest concurrency: the load generator's and the server's
    (its whole process tree: Triton's frontend, Python stub and backend included)."""

    client: float
    server: float


@dataclass(frozen=True)
class ConcurrencyResult:
    """Every variant's closed-loop runs, one per concurrency level (same order)."""

    concurrency: tuple[int, ...]
    runs: dict[str, list[LoadResult]]
    cpu: dict[str, CpuPerRequest]

    def throughput(self, variant: str, concurrency: int) -> float:
        """Samples per second of `variant` at `concurrency` clients."""
        return self.runs[variant][self.concurrency.index(concurrency)].throughput


def _params(steps: int) -> dict[str, int | str]:
    return {"num_steps": steps, "solver": SOLVER}


def flowserve_config(policy: str) -> dict[str, Any]:
    """Server configuration of the benchmark: enough workers for every client, no metrics port.

    Request-level batching gets the same 2 ms batching delay as Triton's dynamic batcher
    (`max_queue_delay_microseconds=2000`); step-level batching needs none (late arrivals join
    the running rows at the next step).
    """
    engine: dict[str, Any] = {"policy": policy}
    if policy == "request":
        engine["fill_wait_seconds"] = 0.002
    return {"metrics": {"enabled": False}, "grpc": {"max_workers": GRPC_WORKERS}, "engine": engine}


def torchserve_latency(peer: Any, requests: int, steps: int) -> LoadResult:
    """`requests` sequential 1-sample requests to a TorchServePeer (REST, kept-alive)."""
    for seed in range(8):  # warm-up
        peer.predict(None, steps, SOLVER, seed)
    latencies = []
    started = time.perf_counter()
    for seed in range(requests):
        begin = time.perf_counter()
        peer.predict(None, steps, SOLVER, seed)
        latencies.append(time.perf_counter() - begin)
    return LoadResult(time.perf_counter() - started, tuple(latencies), {}, requests, 1)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and every live descendant (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        total += stats.get(current, (0, 0.0))[1]
        frontier += [child for child, (parent, _) in stats.items() if parent == current]
    return total


def _client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sweep(
    target: str, make_call: MakeCall, levels: tuple[int, ...], name: str, server_pid: int
) -> tuple[list[LoadResult], CpuPerRequest]:
    """Closed-loop runs at every concurrency level: max(64, 2 x clients) requests each.

    Returns the runs and the CPU per request of the last (highest) level.
    """
    run_closed_loop(target, make_call, 8, 32, RUN_TIMEOUT_S, warmup=4)  # first-call set-up
    results = []
    cpu = CpuPerRequest(math.nan, math.nan)
    for clients in levels:
        client_before, server_before = _client_cpu_seconds(), tree_cpu_seconds(server_pid)
        result = run_closed_loop(target, make_call, clients, max(64, 2 * clients), RUN_TIMEOUT_S)
        cpu = CpuPerRequest(
            (_client_cpu_seconds() - client_before) / result.requested,
            (tree_cpu_seconds(server_pid) - server_before) / result.requested,
        )
        print(f"  {name}: {result.summary()}", flush=True)
        if result.failed or result.not_sent:
            raise RuntimeError(f"{name} at {clients} clients: {result.summary()}")
        results.append(result)
    return results, cpu


@contextmanager
def _flowserve(store: Path, policy: str, backend: str = "eager") -> Iterator[FlowserveProcess]:
    with FlowserveProcess(store, flowserve_config(policy), backend=backend) as server:
        yield server


def measure_concurrency(
    store: Path, triton: Callable[[int], Any] | None, levels: tuple[int, ...] = CONCURRENCY
) -> ConcurrencyResult:
    """Closed-loop throughput and latency of every variant at every concurrency level.

    Args:
        store: Store holding the report network as `MODEL` version 1.
        triton: `steps -> context manager` yielding an object with `.target` (the Triton peer),
            or None to leave Triton out.
        levels: Client counts to measure.
    """
    oip = oip_infer(MODEL, (DIM,), _params(STEPS))
    runs: dict[str, list[LoadResult]] = {}
    cpu: dict[str, CpuPerRequest] = {}
    v1 = flowserve_sample(MODEL, SOLVER, STEPS)
    with _flowserve(store, "step") as server:
        runs[FLOWSERVE_V1], cpu[FLOWSERVE_V1] = sweep(server.target, v1, levels, "v1", server.pid)
        runs[FLOWSERVE_OIP], cpu[FLOWSERVE_OIP] = sweep(
            server.target, oip, levels, "oip", server.pid
        )
    with _flowserve(store, "step", "onnxruntime") as server:
        runs[FLOWSERVE_ONNX], cpu[FLOWSERVE_ONNX] = sweep(
            server.target, oip, levels, "oip onnxruntime", server.pid
        )
    with _flowserve(store, "request") as server:
        runs[FLOWSERVE_REQUEST], cpu[FLOWSERVE_REQUEST] = sweep(
            server.target, oip, levels, "request-level", server.pid
        )
    if triton is not None:
        with triton(STEPS) as peer:
            runs[TRITON], cpu[TRITON] = sweep(peer.target, oip, levels, "triton", peer.pid)
    return ConcurrencyResult(levels, runs, cpu)


def measure_latency(
    store: Path,
    triton: Callable[[int], Any] | None,
    torchserve: Callable[[], Any] | None,
    backends: tuple[str, ...] = ("eager",),
) -> dict[str, LoadResult]:
    """1-sample, 50-step requests one at a time: flowserve (per backend), Triton, TorchServe."""
    oip = oip_infer(MODEL, (DIM,), _params(LATENCY_STEPS))
    results: dict[str, LoadResult] = {}

    def one_at_a_time(name: str, target: str, make_call: MakeCall) -> None:
        run_closed_loop(target, make_call, 1, 16, RUN_TIMEOUT_S)  # warm-up
        results[name] = run_closed_loop(target, make_call, 1, LATENCY_REQUESTS, RUN_TIMEOUT_S)
        print(f"  {name}: {results[name].summary()}", flush=True)

    for backend in backends:
        with _flowserve(store, "step", backend) as server:
            one_at_a_time(
                f"flowserve v1 Sample ({backend})",
                server.target,
                flowserve_sample(MODEL, SOLVER, LATENCY_STEPS),
            )
            one_at_a_time(f"flowserve OIP ({backend})", server.target, oip)
    if triton is not None:
        with triton(LATENCY_STEPS) as peer:
            one_at_a_time(TRITON, peer.target, oip)
    if torchserve is not None:
        with torchserve() as peer:
            name = "TorchServe 0.12 (.mar, REST)"
            results[name] = torchserve_latency(peer, LATENCY_REQUESTS, LATENCY_STEPS)
            print(f"  {name}: {results[name].summary()}", flush=True)
    return results


@dataclass(frozen=True)
class LatencyFloor:
    """What flowserve's best single-request latency is made of, in seconds (p50).

    Attributes:
        sampler: The whole-loop sampler (`sampler.onnx`) called in-process, 1 sample.
        empty_rpc: An empty gRPC round trip (OIP ServerLive) to the same server, same client.
    """

    sampler: float
    empty_rpc: float


def _server_live(channel: Any) -> Call:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)

    async def call(index: int, timeout_s: float) -> object:
        return await stub.ServerLive(oip_pb.ServerLiveRequest(), timeout=timeout_s)

    return call


def measure_latency_floor(store: Path, model_dir: Path) -> LatencyFloor:
    """The two parts of a solo request no server code of flowserve's can remove."""
    sampler = load_whole_loop_sampler(model_dir)
    x0, labels, guidance = noise(1), torch.zeros(1, dtype=torch.int64), torch.ones(1)
    for _ in range(16):  # warm-up
        sampler(x0, LATENCY_STEPS, SOLVER, labels, guidance)
    seconds = []
    for _ in range(LATENCY_REQUESTS):
        started = time.perf_counter()
        sampler(x0, LATENCY_STEPS, SOLVER, labels, guidance)
        seconds.append(time.perf_counter() - started)
    with _flowserve(store, "step", "onnxruntime") as server:
        run_closed_loop(server.target, _server_live, 1, 16, RUN_TIMEOUT_S)  # warm-up
        empty = run_closed_loop(server.target, _server_live, 1, LATENCY_REQUESTS, RUN_TIMEOUT_S)
    print(f"  empty gRPC round trip: {empty.summary()}", flush=True)
    return LatencyFloor(statistics.median(seconds), empty.p50)


def best_flowserve(latencies: Mapping[str, LoadResult]) -> tuple[str, LoadResult]:
    """The flowserve variant with the lowest median latency."""
    name = min((n for n in latencies if n.startswith("flowserve")), key=lambda n: latencies[n].p50)
    return name, latencies[name]
