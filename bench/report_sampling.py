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


def _eager_loop(loaded: LoadedModel) -> Sampler:
    net = loaded.net

    def run(x0: Tensor) -> Tensor:
        with torch.no_grad():
            x, dt = x0.clone(), 1.0 / STEPS
            labels = torch.zeros(x0.shape[0], dtype=torch.int64)
            for i in range(STEPS):
                x = x + dt * net(x, torch.full((x0.shape[0],), i * dt), labels)
        return x

    return run


def _flows(loaded: LoadedModel) -> Sampler:
    velocity = loaded.velocity_fn()
    return lambda x0: sample(velocity, x0, STEPS, "euler")


def _flow_matching(loaded: LoadedModel) -> Sampler:
    from flow_matching.solver import ODESolver

    velocity = loaded.velocity_fn()
    solver = ODESolver(velocity_model=lambda x, t: velocity(x, t.expand(x.shape[0])))
    grid = torch.tensor([0.0, 1.0])

    def run(x0: Tensor) -> Tensor:
        with torch.no_grad():
            out: Tensor = solver.sample(
                x_init=x0, step_size=1.0 / STEPS, method="euler", time_grid=grid
            )
        return out

    return run


def _torchdiffeq(loaded: LoadedModel) -> Sampler:
    from torchdiffeq import odeint

    velocity = loaded.velocity_fn()
    grid = torch.tensor([0.0, 1.0])

    def run(x0: Tensor) -> Tensor:
        with torch.no_grad():
            out: Tensor = odeint(
                lambda t, x: velocity(x, t.expand(x.shape[0])),
                x0,
                grid,
                method="euler",
                options={"step_size": 1.0 / STEPS},
            )
        return out[-1]

    return run


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
            variants: dict[str, Sampler] = {
                BASELINE: _eager_loop(loaded),
                "flows.solvers.sample": _flows(loaded),
                "flow_matching ODESolver": _flow_matching(loaded),
                "torchdiffeq odeint": _torchdiffeq(loaded),
                "flowserve engine (in-process)": _engine(engine, model),
                GRPC: _grpc(channel),
            }
            return _measure(variants, batch_sizes, rounds)
    finally:
        engine.shutdown()


def _measure(
    variants: dict[str, Sampler], batch_sizes: tuple[int, ...], rounds: int
) -> SamplingResult:
    rates: dict[str, list[float]] = {name: [] for name in variants}
    diffs = dict.fromkeys(variants, 0.0)
    for batch in batch_sizes:
        x0 = noise(batch, seed=batch)
        # Small batches finish in milliseconds: repeat them so each timing spans ~64 samples.
        repeats = max(1, 64 // batch)
        reference = variants[BASELINE](x0)
        for name, run in variants.items():
            diffs[name] = max(diffs[name], (run(x0) - reference).abs().max().item())
        seconds = best_of_interleaved(
            [_repeated(run, x0, repeats) for run in variants.values()], reps=rounds, warmup=1
        )
        for name, elapsed in zip(variants, seconds, strict=True):
            rates[name].append(batch * repeats / elapsed)
        print(
            f"  batch {batch:5d}: "
            + ", ".join(f"{name} {rates[name][-1]:,.0f}/s" for name in variants),
            flush=True,
        )
    return SamplingResult(batch_sizes, rates, diffs)


def _repeated(run: Sampler, x0: Tensor, repeats: int) -> Callable[[], None]:
    def call() -> None:
        for _ in range(repeats):
            run(x0)

    return call
