"""A tiny request per model through the engine before the server reports SERVING.

It runs every code path a first real request would (network, solver, guidance, likelihood
lane), so that lazy initialisation and compilation happen here rather than in a client's
latency, and a model that cannot run fails start-up instead of its first request.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from server.engine import Engine, LikelihoodJob, SampleJob
from server.store import ModelEntry

_WARMUP_TIMEOUT_SECONDS = 120.0
_WARMUP_STEPS = 2


class WarmupFailed(RuntimeError):
    """A model's warm-up request failed; the message names the model."""


def warm_up(entry: ModelEntry, engine: Engine, exact_max_dimension: int) -> None:
    """Run one small sampling job and one small likelihood job for a model.

    Raises:
        WarmupFailed: either job raised or did not finish in time.
    """
    config = entry.model.config
    conditional = config.num_classes > 0
    # Label 0 with guidance exercises the guided (conditional + unconditional) path.
    labels = torch.zeros(1, dtype=torch.int64) if conditional else None
    sample_job = SampleJob(
        model=entry.model,
        num_samples=1,
        num_steps=_WARMUP_STEPS,
        solver=config.default_solver,
        seed=0,
        class_labels=labels,
        guidance_scale=2.0 if conditional else 1.0,
    )
    dimension = math.prod(config.sample_shape)
    likelihood_job = LikelihoodJob(
        model=entry.model,
        data=torch.zeros((1, *config.sample_shape)),
        num_steps=1,
        solver="euler",
        estimator="exact" if dimension <= exact_max_dimension else "hutchinson",
        num_probes=1,
        seed=0,
        class_labels=labels,
    )
    jobs: list[SampleJob | LikelihoodJob] = [sample_job, likelihood_job]
    if entry.model.whole_loop is not None:
        # The sample job above takes the solo fast path (the whole-loop sampler); asking for a
        # trajectory, which the whole loop cannot give, sends this one through the per-step
        # network that batched requests use.
        jobs.append(dataclasses.replace(sample_job, trajectory_every=_WARMUP_STEPS))
    for job in jobs:
        try:
            engine.submit(job).future.result(timeout=_WARMUP_TIMEOUT_SECONDS)
        except Exception as error:
            raise WarmupFailed(
                f"warm-up of model {entry.name!r} version {entry.version} failed: {error!r}"
            ) from error
