"""Report section: likelihood throughput, exact divergence against Hutchinson's estimator.

For the shipped `moons` (2-D MLP) and `digits` (64-D U-Net) models, the engine computes
log p_1(x) for held-out points with the exact divergence (a full Jacobian trace per step: cost
grows with the dimension D) and with Hutchinson's estimator (k vector-Jacobian products per step,
independent of D). Reported: points per second of each, their ratio, and what the speed costs:
the mean |Hutchinson - exact| next to the estimator's own mean standard error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import best_of_interleaved
from flowserve.modeldir import LoadedModel, load_model_dir
from server.engine import Engine, EngineConfig, LikelihoodJob, ServedModel
from server.engine.backends import EagerBackend
from training.datasets import make_labeled_dataset

SOLVER = "euler"
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LikelihoodCase:
    """One model's workload: how many points and steps, and how many probes for Hutchinson."""

    model: str
    dataset: str
    points: int
    steps: int
    probes: int


CASES = (
    LikelihoodCase("moons", "moons", points=256, steps=50, probes=8),
    LikelihoodCase("digits", "digits", points=16, steps=20, probes=8),
)


@dataclass(frozen=True)
class LikelihoodRow:
    """Measured throughput and accuracy for one case."""

    case: LikelihoodCase
    dimension: int
    exact_rate: float
    hutchinson_rate: float
    mean_abs_gap: float
    mean_std_error: float

    @property
    def speedup(self) -> float:
        """Hutchinson points/s over exact points/s."""
        return self.hutchinson_rate / self.exact_rate


def _served(loaded: LoadedModel) -> ServedModel:
    backend = EagerBackend(loaded.net)
    return ServedModel(loaded.config.name, 1, loaded.config, backend, backend)


def measure_likelihood(store: Path, rounds: int = 2) -> list[LikelihoodRow]:
    """Exact and Hutchinson throughput for every case, on the engine the server runs."""
    engine = Engine(EngineConfig())
    engine.start()
    try:
        return [_measure_case(engine, store, case, rounds) for case in CASES]
    finally:
        engine.shutdown()


def _measure_case(engine: Engine, store: Path, case: LikelihoodCase, rounds: int) -> LikelihoodRow:
    loaded = load_model_dir(store / case.model / "1")
    model = _served(loaded)
    drawn = make_labeled_dataset(case.dataset, case.points, torch.Generator().manual_seed(12345))
    data = drawn.x.reshape(case.points, *loaded.config.sample_shape)
    # A conditional model scores each point under its own class.
    labels = drawn.labels if loaded.config.num_classes else None

    def job(estimator: str) -> LikelihoodJob:
        return LikelihoodJob(
            model, data, case.steps, SOLVER, estimator, case.probes, seed=0, class_labels=labels
        )

    def run(estimator: str) -> object:
        return engine.submit(job(estimator)).future.result(timeout=TIMEOUT_S)

    exact, hutch = run("exact"), run("hutchinson")
    exact_s, hutch_s = best_of_interleaved(
        [lambda: run("exact"), lambda: run("hutchinson")], reps=rounds, warmup=0
    )
    row = LikelihoodRow(
        case=case,
        dimension=int(torch.tensor(loaded.config.sample_shape).prod()),
        exact_rate=case.points / exact_s,
        hutchinson_rate=case.points / hutch_s,
        mean_abs_gap=(hutch.log_prob - exact.log_prob).abs().mean().item(),  # type: ignore[attr-defined]
        mean_std_error=hutch.std_error.mean().item(),  # type: ignore[attr-defined]
    )
    print(
        f"  {case.model}: exact {row.exact_rate:,.1f} points/s, Hutchinson({case.probes}) "
        f"{row.hutchinson_rate:,.1f} points/s (x{row.speedup:.1f}), mean gap "
        f"{row.mean_abs_gap:.3f} nats vs mean std error {row.mean_std_error:.3f}",
        flush=True,
    )
    return row
