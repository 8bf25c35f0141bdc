"""Engine benchmark: step-level continuous batching against serving requests one at a time and
against request-level batching, on a moons-sized network.

Network: flows.nets.TimeMLP(dim=2, hidden=256, depth=4), randomly initialised (speed does not
depend on the weights), velocity parameterisation on the linear path, eager backend on the CPU.

1. Throughput: 256 concurrent single-sample Heun requests of 100 steps through the engine,
   against the same requests served one at a time (flows.solvers.sample per request, no engine
   overhead at all). Target: ratio >= 15.
2. Mixed step counts: a burst of 64 requests (10, 25, 50, 100, 200 steps in turn) under
   step-level batching and under request-level batching (policy="request": whole requests
   batched, answered when the batch is done, like Triton's dynamic batcher in front of a model
   that runs the whole sampling loop). Targets: mean latency of the 10-step requests >= 3x lower
   under step-level batching, throughput within 10%.

Every figure is a ratio against a baseline measured in the same run, best of `--repeats`
interleaved runs. Run with `python -m bench.bench_engine [--threads N]` (or `python -m bench`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flows.nets import NetSpec, TimeMLP
from flows.solvers import sample
from flowserve.modeldir import LoadedModel, ModelConfig
from server.engine import Engine, EngineConfig, SampleJob, SampleResult, ServedModel
from server.engine.backends import EagerBackend

HIDDEN, DEPTH, DIM = 256, 4, 2
NUM_REQUESTS, NUM_STEPS, SOLVER = 256, 100, "heun"
# Serving one at a time has a constant rate; 64 requests measure it as well as 256 would.
BASELINE_REQUESTS = 64
MIXED_REQUESTS = 64
MIXED_STEPS = (10, 25, 50, 100, 200)


class CallCounter:
    """EngineObserver that counts network calls and their rows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.rows = 0
        self.padded_rows = 0

    def on_network_call(self, model: str, rows: int, padded_rows: int, seconds: float) -> None:
        """Count one call."""
        with self._lock:
            self.calls += 1
            self.rows += rows
            self.padded_rows += padded_rows

    def on_job_done(self, model: str, kind: str, samples: int, network_evaluations: int) -> None:
        """Jobs are counted by the benchmark itself."""

    @property
    def mean_rows(self) -> float:
        """Mean real rows per network call."""
        return self.rows / max(self.calls, 1)


@dataclass(frozen=True)
class MixedRun:
    """Outcome of the mixed-step-count scenario under one policy."""

    short_latency: float
    throughput: float
    mean_rows: float


def build_model() -> tuple[ServedModel, LoadedModel]:
    """The moons-sized MLP as a served model and as a plain loaded model."""
    torch.manual_seed(0)
    spec = NetSpec("time_mlp", {"dim": DIM, "hidden": HIDDEN, "depth": DEPTH})
    net = TimeMLP(DIM, HIDDEN, DEPTH).eval().requires_grad_(False)
    config = ModelConfig(
        name="bench-mlp",
        architecture=spec,
        sample_shape=(DIM,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=0,
        default_solver=SOLVER,
        default_num_steps=NUM_STEPS,
    )
    backend = EagerBackend(net)
    return ServedModel("bench-mlp", 1, config, backend, backend), LoadedModel(config, net)


def one_at_a_time(loaded: LoadedModel, count: int) -> float:
    """Samples per second when every request is solved alone (batch 1)."""
    velocity_fn = loaded.velocity_fn()
    started = time.perf_counter()
    for seed in range(count):
        x_0 = torch.randn((1, DIM), generator=torch.Generator().manual_seed(seed))
        sample(velocity_fn, x_0, NUM_STEPS, SOLVER)
    return count / (time.perf_counter() - started)


def concurrent(model: ServedModel, count: int) -> tuple[float, float]:
    """Samples per second and mean rows per call for `count` concurrent requests."""
    counter = CallCounter()
    engine = Engine(EngineConfig(), observer=counter)
    engine.start()
    try:
        started = time.perf_counter()
        handles = [
            engine.submit(SampleJob(model, 1, NUM_STEPS, SOLVER, seed=seed))
            for seed in range(count)
        ]
        for handle in handles:
            handle.future.result(timeout=600)
        elapsed = time.perf_counter() - started
    finally:
        engine.shutdown()
    return count / elapsed, counter.mean_rows


def _stamp(done: dict[int, float], i: int) -> Callable[[object], None]:
    """A future callback recording when request `i` was answered."""

    def callback(_future: object) -> None:
        done[i] = time.perf_counter()

    return callback


def mixed(model: ServedModel, policy: str) -> MixedRun:
    """64 requests with mixed step counts queued together (a burst), served under `policy`.

    The burst is queued before the loop starts, so both policies see the same queue and make
    the same first admission; only the batching rule differs.
    """
    counter = CallCounter()
    engine = Engine(EngineConfig(policy=policy), observer=counter)
    done: dict[int, float] = {}
    steps = [MIXED_STEPS[i % len(MIXED_STEPS)] for i in range(MIXED_REQUESTS)]
    try:
        handles = []
        for i, num_steps in enumerate(steps):
            handle = engine.submit(SampleJob(model, 1, num_steps, SOLVER, seed=i))
            handle.future.add_done_callback(_stamp(done, i))
            handles.append(handle)
        started = time.perf_counter()
        engine.start()
        results: list[SampleResult] = [h.future.result(timeout=600) for h in handles]
        elapsed = max(done.values()) - started
    finally:
        engine.shutdown()
    assert len(results) == MIXED_REQUESTS
    short = [done[i] - started for i, n in enumerate(steps) if n == MIXED_STEPS[0]]
    return MixedRun(statistics.mean(short), MIXED_REQUESTS / elapsed, counter.mean_rows)


def main(argv: list[str] | None = None) -> None:
    """Run both scenarios and print the ratios.

    Args:
        argv: Command-line arguments (`--threads N`, `--repeats N`); None reads sys.argv.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, OpenMP workers "
        "that lose their core stall every call and distort both sides of the ratio)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="best of N for every figure")
    # `python -m bench` calls main() with no arguments: run with the defaults.
    args = parser.parse_args([] if argv is None else argv)
    if args.threads < 1 or args.repeats < 1:
        raise ValueError("--threads and --repeats must be >= 1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _run(args.repeats)
    finally:
        # `python -m bench` runs other benchmarks in this process after this one.
        torch.set_num_threads(previous_threads)


def _run(repeats: int) -> None:
    model, loaded = build_model()
    print(
        f"engine benchmark: TimeMLP {DEPTH}x{HIDDEN}, {SOLVER}, torch threads "
        f"{torch.get_num_threads()}, best of {repeats}"
    )
    # Warm up: the first call at each batch size pays tens of ms of kernel set-up (oneDNN
    # primitives), which belongs to start-up, not to either side of a ratio.
    one_at_a_time(loaded, 4)
    concurrent(model, NUM_REQUESTS)
    mixed(model, "step")

    # Repeats are interleaved so that a burst of load elsewhere hits both sides alike.
    baselines, engines = [], []
    for _ in range(repeats):
        baselines.append(one_at_a_time(loaded, BASELINE_REQUESTS))
        engines.append(concurrent(model, NUM_REQUESTS))
    baseline = max(baselines)
    batched, rows_per_call = max(engines)
    print(f"[throughput] {NUM_REQUESTS} concurrent single-sample requests, {NUM_STEPS} steps")
    print(f"  one at a time:      {baseline:9.1f} samples/s  ({BASELINE_REQUESTS} requests)")
    print(f"  engine (step):      {batched:9.1f} samples/s, {rows_per_call:.1f} rows/call")
    print(f"  ratio:              {batched / baseline:9.2f}x   (target >= 15x)")

    steps, requests = [], []
    for _ in range(repeats):
        steps.append(mixed(model, "step"))
        requests.append(mixed(model, "request"))
    step = min(steps, key=lambda r: r.short_latency)
    request = min(requests, key=lambda r: r.short_latency)
    step_throughput = max(r.throughput for r in steps)
    request_throughput = max(r.throughput for r in requests)
    print(f"[mixed steps] burst of {MIXED_REQUESTS} requests, steps {MIXED_STEPS} in turn")
    print(
        f"  step-level:    10-step mean latency {step.short_latency * 1e3:8.1f} ms, "
        f"{step_throughput:7.1f} req/s, {step.mean_rows:.1f} rows/call"
    )
    print(
        f"  request-level: 10-step mean latency {request.short_latency * 1e3:8.1f} ms, "
        f"{request_throughput:7.1f} req/s, {request.mean_rows:.1f} rows/call"
    )
    print(
        f"  latency ratio (request/step): {request.short_latency / step.short_latency:6.2f}x"
        "   (target >= 3x)"
    )
    print(
        f"  throughput ratio (step/request): {step_throughput / request_throughput:6.3f}"
        "   (target within 0.9 .. 1.1)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
