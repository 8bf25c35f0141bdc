"""Translation between validated requests, engine jobs and results, and response messages."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from protos.flowserve.v1 import flowserve_pb2 as pb
from server import codec
from server.engine import (
    LikelihoodJob,
    LikelihoodResult,
    Progress,
    SampleJob,
    SampleResult,
)
from server.store import ModelEntry
from server.validation import LikelihoodSpec, SampleSpec


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 CPU tensor sharing a validated (writable, native-order) array's memory."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _encode(tensor: torch.Tensor) -> pb.Tensor:
    """A Tensor message of a result tensor (any device or float dtype) as float32."""
    return codec.encode_array(tensor.detach().to(device="cpu", dtype=torch.float32).numpy())


def sample_job(entry: ModelEntry, spec: SampleSpec, deadline: float | None) -> SampleJob:
    return SampleJob(
        model=entry.model,
        num_samples=spec.num_samples,
        num_steps=spec.num_steps,
        solver=spec.solver,
        seed=spec.seed,
        class_labels=None if spec.class_labels is None else torch.from_numpy(spec.class_labels),
        guidance_scale=spec.guidance_scale,
        initial_noise=None if spec.initial_noise is None else _to_tensor(spec.initial_noise),
        trajectory_every=spec.trajectory_every,
        deadline=deadline,
    )


def likelihood_job(
    entry: ModelEntry, spec: LikelihoodSpec, deadline: float | None
) -> LikelihoodJob:
    return LikelihoodJob(
        model=entry.model,
        data=_to_tensor(spec.data),
        num_steps=spec.num_steps,
        solver=spec.solver,
        estimator=spec.estimator,
        num_probes=spec.num_probes,
        seed=spec.seed,
        class_labels=None if spec.class_labels is None else torch.from_numpy(spec.class_labels),
        deadline=deadline,
    )


def sample_response(result: SampleResult, with_trajectory: bool) -> pb.SampleResponse:
    return pb.SampleResponse(
        samples=_encode(result.samples),
        model=result.model,
        version=result.version,
        num_steps=result.num_steps,
        network_evaluations=result.network_evaluations,
        seed=result.seed,
        queue_seconds=result.queue_seconds,
        compute_seconds=result.compute_seconds,
        trajectory=[_encode(x) for x in result.trajectory] if with_trajectory else [],
    )


def likelihood_response(result: LikelihoodResult) -> pb.LogLikelihoodResponse:
    return pb.LogLikelihoodResponse(
        log_prob=result.log_prob.double().tolist(),
        std_error=result.std_error.double().tolist(),
        bits_per_dim=result.bits_per_dim.double().tolist(),
        model=result.model,
        version=result.version,
        network_evaluations=result.network_evaluations,
        seed=result.seed,
        queue_seconds=result.queue_seconds,
        compute_seconds=result.compute_seconds,
    )


def progress_events(progress: list[Progress]) -> Iterator[pb.SampleEvent]:
    """Events for a batch of progress reports: every snapshot, and the latest progress."""
    for report in progress:
        if report.snapshot is not None:
            yield pb.SampleEvent(
                snapshot=pb.TrajectorySnapshot(
                    steps_done=report.steps_done,
                    t=report.t,
                    x=_encode(report.snapshot),
                )
            )
    if progress:
        last = progress[-1]
        # Only the newest progress is worth sending; older ones are coalesced away.
        yield pb.SampleEvent(
            progress=pb.SampleProgress(
                steps_done=last.steps_done, num_steps=last.num_steps, t=last.t
            )
        )
