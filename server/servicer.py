"""`flowserve.v1.Generator`: decode, validate, submit, encode. No math, no batching."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from server.config import LimitsConfig
from server.engine import Engine, JobHandle, Progress
from server.metrics import ServerMetrics
from server.model_info import model_info
from server.rpc import Admission, RpcScope, cancel_with_rpc, deadline_of, run_job, wait_for
from server.store import ModelEntry, ServedModels
from server.translate import (
    likelihood_job,
    likelihood_response,
    progress_events,
    sample_job,
    sample_response,
)
from server.validation import (
    check_model_name,
    check_version,
    validate_likelihood,
    validate_sample,
)

# How often a streaming RPC checks that its client is still there while nothing happens.
_STREAM_POLL_SECONDS = 0.1


class GeneratorServicer(pb_grpc.GeneratorServicer):
    """`flowserve.v1.Generator`: sampling, likelihoods and model metadata."""

    def __init__(
        self,
        store: ServedModels,
        engine: Engine,
        limits: LimitsConfig,
        metrics: ServerMetrics,
        admission: Admission,
    ) -> None:
        self._store = store
        self._engine = engine
        self._limits = limits
        self._metrics = metrics
        self._admission = admission

    def _model(self, scope: RpcScope, name: str, version: int) -> ModelEntry:
        entry = self._store.get(check_model_name(name), check_version(version))
        scope.model_label = entry.name
        return entry

    def Sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> pb.SampleResponse:
        """Draw samples and answer once they are done."""
        scope = RpcScope("Sample", context, self._metrics)
        try:
            self._admission.check()
            entry = self._model(scope, request.model, request.version)
            spec = validate_sample(request, entry.model.config, self._limits)
            deadline = deadline_of(context)
            result = run_job(self._engine, sample_job(entry, spec, deadline), context, deadline)
            response = sample_response(result, with_trajectory=True)
        except Exception as error:
            scope.fail(error)
        scope.record(grpc.StatusCode.OK)
        return response

    def SampleStream(
        self, request: pb.SampleRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SampleEvent]:
        """Draw samples, streaming progress and snapshots, then the response."""
        scope = RpcScope("SampleStream", context, self._metrics)
        try:
            try:
                self._admission.check()
                entry = self._model(scope, request.model, request.version)
                spec = validate_sample(request, entry.model.config, self._limits)
                deadline = deadline_of(context)
                reports: queue.SimpleQueue[Progress] = queue.SimpleQueue()
                handle = self._engine.submit(
                    sample_job(entry, spec, deadline), on_progress=reports.put
                )
                cancel_with_rpc(context, handle)
                yield from self._stream_progress(context, handle, reports)
                result = wait_for(handle, deadline)
                yield from progress_events(_drain(reports))
                yield pb.SampleEvent(response=sample_response(result, with_trajectory=False))
            except Exception as error:
                scope.fail(error)
            scope.record(grpc.StatusCode.OK)
        finally:
            # The client went away mid-stream (the generator was closed).
            scope.record(grpc.StatusCode.CANCELLED)

    @staticmethod
    def _stream_progress(
        context: grpc.ServicerContext, handle: JobHandle, reports: queue.SimpleQueue[Progress]
    ) -> Iterator[pb.SampleEvent]:
        while not handle.future.done() and context.is_active():
            try:
                first = reports.get(timeout=_STREAM_POLL_SECONDS)
            except queue.Empty:
                continue
            yield from progress_events([first, *_drain(reports)])

    def LogLikelihood(
        self, request: pb.LogLikelihoodRequest, context: grpc.ServicerContext
    ) -> pb.LogLikelihoodResponse:
        """Log-density of each data point under the model's flow."""
        scope = RpcScope("LogLikelihood", context, self._metrics)
        try:
            self._admission.check()
            entry = self._model(scope, request.model, request.version)
            spec = validate_likelihood(request, entry.model.config, self._limits)
            deadline = deadline_of(context)
            job = likelihood_job(entry, spec, deadline)
            response = likelihood_response(run_job(self._engine, job, context, deadline))
        except Exception as error:
            scope.fail(error)
        scope.record(grpc.StatusCode.OK)
        return response

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        """Every served model."""
        scope = RpcScope("ListModels", context, self._metrics)
        scope.model_label = ""
        try:
            response = pb.ListModelsResponse(
                models=[model_info(entry) for entry in self._store.entries()]
            )
        except Exception as error:
            scope.fail(error)
        scope.record(grpc.StatusCode.OK)
        return response

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        """One served model."""
        scope = RpcScope("GetModel", context, self._metrics)
        try:
            info = model_info(self._model(scope, request.model, request.version))
        except Exception as error:
            scope.fail(error)
        scope.record(grpc.StatusCode.OK)
        return info


def _drain(reports: queue.SimpleQueue[Progress]) -> list[Progress]:
    """Everything queued right now, without waiting."""
    items = []
    while True:
        try:
            items.append(reports.get_nowait())
        except queue.Empty:
            return items
