"""Validate a submitted job and turn it into the engine's record of it.

`prepare_record` runs on the submitting thread, so the per-job work that does not need the device
(checks, choosing a seed, drawing the initial noise and the Hutchinson probes) stays off the loop.

Randomness contract (clients rely on it to reproduce results):

- Without a seed the engine picks one from `secrets` (never torch's global generator) and
  reports it in the result.
- Each job owns one `torch.Generator("cpu")` seeded with its seed. A SampleJob without
  `initial_noise` first draws `x_0 = torch.randn((num_samples, *sample_shape), generator=g)`;
  an Euler-Maruyama job then draws one `torch.randn((num_samples, *sample_shape), generator=g)`
  per step, which is what `flows.solvers.sample_gaussian_sde(..., generator=g)` draws. A
  Hutchinson LikelihoodJob draws its probes once with
  `flows.likelihood.make_probes((n, *sample_shape), num_probes, g, "rademacher")`, as
  `flows.likelihood.log_likelihood(..., generator=g)` does. Nothing depends on which other
  jobs share a batch, or on how the job's rows are split across network calls.
"""

from __future__ import annotations

import concurrent.futures
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flows.paths import GaussianPath
from flows.solvers import ODE_SOLVERS, SOLVERS, TABLEAUS
from server.engine.api import LikelihoodJob, Progress, SampleJob, ServedModel

ESTIMATORS: tuple[str, ...] = ("exact", "hutchinson")
SDE_SOLVER = "euler_maruyama"
# Seeds fit in int64 and uint64 alike, so every client and proto field can carry them.
_SEED_BITS = 63
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class ModelMath:
    """What the loop needs from a model's config, parsed once per job.

    Attributes:
        path: The Gaussian path the network was trained on.
        parameterization: What the network predicts ("velocity", "score", "noise").
        num_classes: Real classes; label `num_classes` is the null class (0: unconditional).
        sample_shape: Shape of one sample.
    """

    path: GaussianPath
    parameterization: str
    num_classes: int
    sample_shape: tuple[int, ...]

    @property
    def null_label(self) -> int:
        """Label of the unconditional evaluation (0 for unconditional nets, which ignore it)."""
        return self.num_classes


def model_math(model: ServedModel) -> ModelMath:
    """Read the sampling-relevant fields of a served model's config."""
    config = model.config
    return ModelMath(
        path=config.gaussian_path,
        parameterization=config.parameterization,
        num_classes=int(config.num_classes),
        sample_shape=tuple(int(n) for n in config.sample_shape),
    )


@dataclass(eq=False)
class JobRecord:
    """The engine's mutable record of one job; owned by the loop thread once submitted.

    Attributes:
        job_id: Engine-unique id.
        job: The submitted job.
        kind: "sample" or "likelihood".
        math: The model's path, parameterization and classes.
        future: Resolves to the result or an EngineError.
        on_progress: Callback after each completed step (sample jobs only), or None.
        seed: The seed used.
        rows: Rows of the job (samples or data points).
        width: Network rows per job row per evaluation (2 for a guided row, else 1).
        num_steps: Solver steps.
        evaluations: Network evaluations the job costs, counted per network row.
        x_start: `(rows, *sample_shape)` start state: x_0 for sampling, x_1 for likelihood.
        labels: `(rows,)` int64 labels given to the network (null class when none were given).
        generator: The job's random stream (SDE noise), or None when it needs none.
        probes: `(num_probes, rows, *sample_shape)` Hutchinson probes, or None.
        submitted: `time.monotonic()` at submit.
        admitted: `time.monotonic()` at admission (0 while queued).
        trajectory: Snapshots collected so far.
        start: First row of the job in its row group (set by the group).
        stop: One past its last row in its row group.
        group: The row group holding the job's rows while running.
        joined_at: The group's step count when the job's rows joined it (0 for its founders).
        state: "new", "queued", "running", "held" (finished, answer not yet released) or
            "done"; only the loop thread moves it past "queued".
    """

    job_id: int
    job: SampleJob | LikelihoodJob
    kind: str
    math: ModelMath
    future: concurrent.futures.Future[Any]
    on_progress: Callable[[Progress], None] | None
    seed: int
    rows: int
    width: int
    num_steps: int
    evaluations: int
    x_start: Tensor
    labels: Tensor
    generator: torch.Generator | None
    probes: Tensor | None
    submitted: float
    admitted: float = 0.0
    trajectory: list[Tensor] = field(default_factory=list)
    start: int = 0
    stop: int = 0
    group: object | None = None
    joined_at: int = 0
    state: str = "new"

    @property
    def deadline(self) -> float | None:
        """`time.monotonic()` deadline of the job, or None."""
        return self.job.deadline

    @property
    def model(self) -> ServedModel:
        """The model the job runs on."""
        return self.job.model


def evaluations_per_row(solver: str, num_steps: int) -> int:
    """Network evaluations one row of one width needs (stages per step times steps)."""
    per_step = 1 if solver == SDE_SOLVER else TABLEAUS[solver].num_stages
    return per_step * num_steps


def choose_seed(seed: int | None) -> int:
    """The job's seed: the given one (checked) or a fresh one from `secrets`."""
    if seed is None:
        return secrets.randbits(_SEED_BITS)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**64 - 1] or None, got {seed!r}")
    return seed


def _generator(seed: int) -> torch.Generator:
    # manual_seed takes up to 64 bits; the CPU generator makes the stream device-independent.
    return torch.Generator("cpu").manual_seed(seed)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_labels(labels: Tensor | None, rows: int, math_: ModelMath) -> Tensor:
    if labels is None:
        # No labels: the null class (unconditional sampling); unconditional nets ignore it.
        return torch.full((rows,), math_.null_label, dtype=torch.int64)
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        raise ValueError("class_labels must be an int64 tensor of shape (rows,) or None")
    if labels.shape[0] != rows:
        raise ValueError(f"class_labels must have {rows} entries, got {labels.shape[0]}")
    if math_.num_classes == 0:
        raise ValueError("class_labels must be None for an unconditional model")
    if bool((labels < 0).any()) or bool((labels > math_.num_classes).any()):
        raise ValueError(
            f"class_labels must lie in [0, {math_.num_classes}] ({math_.num_classes} = null)"
        )
    return labels.detach().to("cpu").clone()


def _check_states(name: str, value: object, rows: int | None, math_: ModelMath) -> Tensor:
    if not isinstance(value, Tensor) or value.dtype != torch.float32:
        raise ValueError(f"{name} must be a float32 tensor of shape (n, *{math_.sample_shape})")
    if tuple(value.shape[1:]) != math_.sample_shape or value.dim() < 2 or value.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape (n >= 1, *{math_.sample_shape}), got {tuple(value.shape)}"
        )
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (num_samples), got {value.shape[0]}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must contain only finite values")
    return value.detach().to("cpu").clone()


def _check_deadline(deadline: object) -> None:
    if deadline is not None and (
        isinstance(deadline, bool) or not isinstance(deadline, int | float) or math.isnan(deadline)
    ):
        raise ValueError(f"deadline must be a time.monotonic() float or None, got {deadline!r}")


def prepare_record(
    job_id: int,
    job: SampleJob | LikelihoodJob,
    on_progress: Callable[[Progress], None] | None,
) -> JobRecord:
    """Check a job's internal invariants and build its record (on the caller's thread).

    Args:
        job_id: Engine-unique id.
        job: The job.
        on_progress: Progress callback or None.

    Returns:
        The record, with its seed chosen and its initial noise or probes drawn.

    Raises:
        ValueError: The job is impossible (wrong shapes, unknown solver, labels out of range).
    """
    if isinstance(job, SampleJob):
        return _prepare_sample(job_id, job, on_progress)
    if isinstance(job, LikelihoodJob):
        return _prepare_likelihood(job_id, job, on_progress)
    raise ValueError(f"job must be a SampleJob or a LikelihoodJob, got {type(job).__name__}")


def _prepare_sample(
    job_id: int, job: SampleJob, on_progress: Callable[[Progress], None] | None
) -> JobRecord:
    math_ = model_math(job.model)
    rows = _check_int("num_samples", job.num_samples, 1)
    num_steps = _check_int("num_steps", job.num_steps, 1)
    if job.solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {job.solver!r}")
    _check_int("trajectory_every", job.trajectory_every, 0)
    _check_deadline(job.deadline)
    scale = job.guidance_scale
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite float, got {scale!r}")
    guided = float(scale) != 1.0
    if guided and math_.num_classes == 0:
        raise ValueError("guidance_scale must be 1.0 for an unconditional model")
    labels = _check_labels(job.class_labels, rows, math_)
    seed = choose_seed(job.seed)
    generator = _generator(seed)
    if job.initial_noise is None:
        x_0 = torch.randn((rows, *math_.sample_shape), generator=generator)
    else:
        x_0 = _check_states("initial_noise", job.initial_noise, rows, math_)
    width = 2 if guided else 1
    return JobRecord(
        job_id=job_id,
        job=job,
        kind="sample",
        math=math_,
        future=concurrent.futures.Future(),
        on_progress=on_progress,
        seed=seed,
        rows=rows,
        width=width,
        num_steps=num_steps,
        evaluations=rows * width * evaluations_per_row(job.solver, num_steps),
        x_start=x_0,
        labels=labels,
        generator=generator if job.solver == SDE_SOLVER else None,
        probes=None,
        submitted=time.monotonic(),
    )


def _prepare_likelihood(
    job_id: int, job: LikelihoodJob, on_progress: Callable[[Progress], None] | None
) -> JobRecord:
    from flows.likelihood import make_probes

    math_ = model_math(job.model)
    x_1 = _check_states("data", job.data, None, math_)
    rows = x_1.shape[0]
    num_steps = _check_int("num_steps", job.num_steps, 1)
    if job.solver not in ODE_SOLVERS:
        raise ValueError(f"solver must be one of {ODE_SOLVERS} for likelihoods, got {job.solver!r}")
    if job.estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {job.estimator!r}")
    num_probes = _check_int("num_probes", job.num_probes, 1)
    _check_deadline(job.deadline)
    labels = _check_labels(job.class_labels, rows, math_)
    seed = choose_seed(job.seed)
    probes = None
    if job.estimator == "hutchinson":
        probes = make_probes(
            (rows, *math_.sample_shape), num_probes, _generator(seed), "rademacher"
        )
    return JobRecord(
        job_id=job_id,
        job=job,
        kind="likelihood",
        math=math_,
        future=concurrent.futures.Future(),
        on_progress=on_progress,
        seed=seed,
        rows=rows,
        width=1,
        num_steps=num_steps,
        evaluations=rows * evaluations_per_row(job.solver, num_steps),
        x_start=x_1,
        labels=labels,
        generator=None,
        probes=probes,
        submitted=time.monotonic(),
    )
