"""gRPC overhead: `Generator.Sample` through a real channel against the in-process engine call.

Network: flows.nets.TimeMLP(dim=2, hidden=256, depth=4), random weights (speed does not depend
on them), written to a temporary model store and served by `server.app.create_server` on
127.0.0.1 (port 0), eager backend on the CPU. Both variants use the server's own engine, so
the only difference is the gRPC path: encode, transport, decode, validate, encode the result.

1. Throughput: one request of 10,000 samples x 100 Heun steps. Target: gRPC / in-process
   samples per second >= 0.9.
2. Latency: 1-sample, 50-step Heun requests one after another on an idle server; p50 and p99
   through gRPC and in-process, and their ratio.

Every figure is a ratio against a baseline measured in the same run. Run with
`python -m bench grpc` (or `python -m bench.bench_grpc`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import torch

from bench.common import Measurement, best_of_interleaved, print_table
from bench.report_model import DEPTH, HIDDEN, MODEL, write_bench_store
from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from server.app import FlowServer, create_server
from server.client import generator_stub
from server.config import load_config
from server.engine import SampleJob, ServedModel

BIG_SAMPLES, BIG_STEPS = 10_000, 100
SMALL_STEPS, LATENCY_REQUESTS = 50, 200
SOLVER = "heun"
TIMEOUT = 600.0


def start_server(store: Path) -> FlowServer:
    """The real server on a free loopback port, warmed up, without the metrics endpoint."""
    config = load_config(
        None,
        {
            "grpc": {"host": "127.0.0.1", "port": 0},
            "metrics": {"enabled": False},
            "store": {"path": str(store)},
        },
    )
    server, _ = create_server(config)
    server.start()
    server.ready()
    return server


def in_process(model: ServedModel, server: FlowServer, num_samples: int, steps: int) -> None:
    """One job straight into the server's engine."""
    job = SampleJob(model=model, num_samples=num_samples, num_steps=steps, solver=SOLVER, seed=1)
    server.engine.submit(job).future.result(timeout=TIMEOUT)


def through_grpc(stub: pb_grpc.GeneratorStub, num_samples: int, steps: int) -> None:
    """The same job as a Sample RPC, samples decoded on the client side."""
    request = pb.SampleRequest(
        model=MODEL, num_samples=num_samples, num_steps=steps, solver=pb.HEUN, seed=1
    )
    response = stub.Sample(request, timeout=TIMEOUT)
    torch.frombuffer(bytearray(response.samples.data), dtype=torch.float32)


def latencies(call: Callable[[], None], count: int) -> list[float]:
    """Wall time of `count` calls made one after another."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main() -> None:
    """Run both scenarios and print the ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_store(Path(tmp))
        server = start_server(Path(tmp))
        model = server.store.get(MODEL).model
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = generator_stub(channel)
                run_scenarios(server, model, stub)
        finally:
            server.drain_and_stop(5.0)


def run_scenarios(server: FlowServer, model: ServedModel, stub: pb_grpc.GeneratorStub) -> None:
    """Throughput of one big request, then idle-server latency of small ones."""
    print(
        f"gRPC benchmark: TimeMLP {DEPTH}x{HIDDEN}, {SOLVER}, torch threads "
        f"{torch.get_num_threads()}, engine policy {server.config.engine.policy}"
    )
    # First calls pay for allocator growth and channel set-up; keep them out of the figures.
    in_process(model, server, 1024, 4)
    through_grpc(stub, 1024, 4)

    engine_seconds, grpc_seconds = best_of_interleaved(
        [
            lambda: in_process(model, server, BIG_SAMPLES, BIG_STEPS),
            lambda: through_grpc(stub, BIG_SAMPLES, BIG_STEPS),
        ],
        reps=2,
        warmup=0,
    )
    print_table(
        f"[throughput] one request of {BIG_SAMPLES:,} samples x {BIG_STEPS} steps",
        [
            Measurement("in-process engine", engine_seconds, BIG_SAMPLES),
            Measurement("gRPC Sample", grpc_seconds, BIG_SAMPLES),
        ],
        baseline="in-process engine",
    )
    print(f"  gRPC / in-process: {engine_seconds / grpc_seconds:.3f}   (target >= 0.9)")

    engine_times = latencies(lambda: in_process(model, server, 1, SMALL_STEPS), LATENCY_REQUESTS)
    grpc_times = latencies(lambda: through_grpc(stub, 1, SMALL_STEPS), LATENCY_REQUESTS)
    print(f"\n[latency] {LATENCY_REQUESTS} requests of 1 sample x {SMALL_STEPS} steps, idle server")
    for name, times in (("in-process engine", engine_times), ("gRPC Sample", grpc_times)):
        p50, p99 = percentile(times, 50) * 1e3, percentile(times, 99) * 1e3
        mean = statistics.mean(times) * 1e3
        print(f"  {name:<18} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms   mean {mean:8.2f} ms")
    print(
        f"  gRPC / in-process: p50 x{percentile(grpc_times, 50) / percentile(engine_times, 50):.2f}"
        f", p99 x{percentile(grpc_times, 99) / percentile(engine_times, 99):.2f}"
    )


if __name__ == "__main__":
    main()
