"""The solo fast path: a lone small sample job as one call of its model's whole-loop sampler.

At batch 1 the engine loop's own work per step (gathering rows, padding to a bucket, scattering
the result, waking threads) costs more than the network itself, and handing the job to the loop
thread and back costs two thread wake-ups. A job that finds the engine idle, and that the
exported sampler can run (`ServedModel.whole_loop`: Euler or Heun on the uniform grid, guidance
included), therefore runs on the submitting thread as one call. The engine decides when it is
idle; this module decides whether a job qualifies and runs it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flows.solvers import TABLEAUS
from server.engine.api import SampleJob
from server.engine.records import JobRecord


def solo_cost(record: JobRecord) -> int | None:
    """Network evaluations the whole-loop sampler would spend on `record`, or None when it
    cannot run the job (no sampler, a solver it lacks, progress or a trajectory asked for).

    The sampler evaluates both guidance branches of a conditional net on every row, guided or
    not, so its cost can exceed the job's own `evaluations`.
    """
    job = record.job
    if not isinstance(job, SampleJob) or record.on_progress is not None or job.trajectory_every:
        return None
    sampler = job.model.whole_loop
    if sampler is None or job.solver not in sampler.solvers:
        return None
    branches = 2 if record.math.num_classes > 0 else 1
    return record.rows * job.num_steps * TABLEAUS[job.solver].num_stages * branches


def whole_loop_samples(record: JobRecord) -> Tensor:
    """Integrate a qualifying job (see `solo_cost`) in one whole-loop call; its samples.

    Raises:
        Exception: whatever the sampler raises.
    """
    job = record.job
    assert isinstance(job, SampleJob) and job.model.whole_loop is not None
    guidance = torch.full((record.rows,), float(job.guidance_scale), dtype=torch.float32)
    return job.model.whole_loop(
        record.x_start.cpu(), job.num_steps, job.solver, record.labels.cpu(), guidance
    )
