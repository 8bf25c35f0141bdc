"""Report section: sampling throughput against batch size, flowserve and its in-process peers.

One request of B samples x 100 Euler steps on the report network, for B from 1 to 4096:

- eager loop (baseline): `x = x + dt * net(x, t)` in Python under no_grad, the plainest code;
- flows.solvers.sample: the shared sampler both the trainer and the server use;
- flow_matching's ODESolver and torchdiffeq's odeint (Euler, fixed step);
- flowserve engine, in-process: a SampleJob into `server.engine.Engine` (eager backend);
- flowserve over gRPC: a `Generator.Sample` RPC to the real server in its own process, samples
  decoded on the client side.

Every variant gets the same weights and the same noise; times are the best of interleaved rounds
(A B C ... A B C ...), so load drift on a shared machine hits every variant alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from torch import Tensor

from bench.bench_sampler import eager_loop, peer_variants
from bench.common import best_of_interleaved
from bench.report_model import DIM, MODEL, noise
from flows.solvers import sample
from flowserve.modeldir import LoadedModel
from protos.flowserve.v1 import flowserve_pb2 as pb
from server.client import generator_stub
from server.engine import Engine, EngineConfig, SampleJob, ServedModel
from server.engine.backends import EagerBackend

STEPS = 100
BATCH_SIZES = (1, 16, 64, 256, 1024, 4096)
BASELINE = "eager loop"
GRPC = "flowserve gRPC"
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SamplingResult:
    """Samples per second of every variant at every batch size (same run)."""

    batch_sizes: tuple[int, ...]
    rates: dict[str, list[float]]
    max_abs_diff: dict[str, float]


Sampler = Callable[[Tensor], Tensor]


def _time_column_net(loaded: LoadedModel, rows: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The loaded net as bench.bench_sampler's loops call a net: `(x, t of shape (1,)) -> v`."""
    labels = torch.zeros(rows, dtype=torch.int64)  # ignored by the unconditional net
    return lambda x, t: loaded.net(x, t.reshape(-1).expand(rows), labels)


def _engine(engine: Engine, model: ServedModel) -> Sampler:
    def run(x0: Tensor) -> Tensor:
        job = SampleJob(model, x0.shape[0], STEPS, "euler", initial_noise=x0)
        return engine.submit(job).future.result(timeout=TIMEOUT_S).samples

    return run


def _grpc(channel: grpc.Channel) -> Sampler:
    stub = generator_stub(channel)

    def run(x0: Tensor) -> Tensor:
        request = pb.SampleRequest(
            model=MODEL,
            num_steps=STEPS,
            solver=pb.EULER,
            initial_noise=pb.Tensor(shape=list(x0.shape), data=x0.numpy().astype("<f4").tobytes()),
        )
        response = stub.Sample(request, timeout=TIMEOUT_S)
        data = np.frombuffer(response.samples.data, dtype="<f4").reshape(-1, DIM)
        return torch.from_numpy(data.copy())

    return run


def _variants(
    loaded: LoadedModel, engine: Engine, model: ServedModel, grpc_run: Sampler, x0: Tensor
) -> dict[str, Callable[[], Tensor]]:
    """Every variant, bound to this batch's noise; the in-process peers are bench_sampler's."""
    net = _time_column_net(loaded, x0.shape[0])
    velocity = loaded.velocity_fn()
    engine_run = _engine(engine, model)
    return {
        BASELINE: lambda: eager_loop(net, x0, STEPS),
        "flows.solvers.sample": lambda: sample(velocity, x0, STEPS, "euler"),
        **peer_variants(net, x0, STEPS),
        "flowserve engine (in-process)": lambda: engine_run(x0),
        GRPC: lambda: grpc_run(x0),
    }


def measure_sampling(
    loaded: LoadedModel, target: str, batch_sizes: tuple[int, ...] = BATCH_SIZES, rounds: int = 3
) -> SamplingResult:
    """Throughput of every variant at every batch size; `target` is the flowserve server."""
    backend = EagerBackend(loaded.net)
    model = ServedModel(MODEL, 1, loaded.config, backend, backend)
    engine = Engine(EngineConfig())
    engine.start()
    try:
        with grpc.insecure_channel(target) as channel:
            grpc_run = _grpc(channel)
            return _measure(
                lambda x0: _variants(loaded, engine, model, grpc_run, x0), batch_sizes, rounds
            )
    finally:
        engine.shutdown()


def _measure(
    variants_for: Callable[[Tensor], dict[str, Callable[[], Tensor]]],
    batch_sizes: tuple[int, ...],
    rounds: int,
) -> SamplingResult:
    rates: dict[str, list[float]] = {}
    diffs: dict[str, float] = {}
    for batch in batch_sizes:
        variants = variants_for(noise(batch, seed=batch))
        # Small batches finish in milliseconds: repeat them so each timing spans ~64 samples.
        repeats = max(1, 64 // batch)
        reference = variants[BASELINE]()
        for name, run in variants.items():
            diffs[name] = max(diffs.get(name, 0.0), (run() - reference).abs().max().item())
        seconds = best_of_interleaved(
            [_repeated(run, repeats) for run in variants.values()], reps=rounds, warmup=1
        )
        for name, elapsed in zip(variants, seconds, strict=True):
            rates.setdefault(name, []).append(batch * repeats / elapsed)
        print(
            f"  batch {batch:5d}: "
            + ", ".join(f"{name} {rates[name][-1]:,.0f}/s" for name in variants),
            flush=True,
        )
    return SamplingResult(batch_sizes, rates, diffs)


def _repeated(run: Callable[[], Tensor], repeats: int) -> Callable[[], None]:
    def call() -> None:
        for _ in range(repeats):
            run()

    return call
