"""`inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2, Triton's gRPC API).

A thin adapter beside `flowserve.v1.Generator` on the same port: each model NAME is an OIP
model that samples (input NOISE, output SAMPLES) and `NAME.log_prob` one that scores data
(input DATA, output LOG_PROB). Requests are translated by `server.oip_codec` into flowserve.v1
requests, checked by `server.validation`, and submitted to the same engine; errors are gRPC
statuses from `server.errors.status_for`; every call is counted in the same metrics.
"""

from __future__ import annotations

import threading
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import grpc

from protos.inference import grpc_predict_v2_pb2 as oip
from protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from server.config import LimitsConfig
from server.engine import Engine, LikelihoodJob, SampleJob
from server.errors import InvalidArgument, ModelNotFound
from server.metrics import ServerMetrics
from server.oip_codec import (
    CLASS_LABEL,
    DATA,
    FP32,
    FP64,
    INT64,
    LOG_PROB,
    NOISE,
    SAMPLES,
    ModelRef,
    likelihood_request,
    output_tensor,
    parse_model,
    rename_field,
    sample_request,
)
from server.rpc import Admission, RpcScope, deadline_of, run_job
from server.store import ModelEntry, ServedModels
from server.translate import likelihood_job, sample_job
from server.validation import validate_likelihood, validate_sample

SERVER_NAME = "flowserve"
PLATFORM = "flowserve"


def _server_version() -> str:
    try:
        return package_version("flowserve")
    except PackageNotFoundError:
        return "0"


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over the model store and the engine.

    `serving` is set while the server reports SERVING (warmed up, not draining); ServerReady and
    ModelReady answer from it.
    """

    def __init__(
        self,
        store: ServedModels,
        engine: Engine,
        limits: LimitsConfig,
        metrics: ServerMetrics,
        admission: Admission,
        serving: threading.Event,
    ) -> None:
        self._store = store
        self._engine = engine
        self._limits = limits
        self._metrics = metrics
        self._admission = admission
        self._serving = serving
        self._version = _server_version()

    def _ready(self) -> bool:
        return self._serving.is_set()

    def _resolve(self, scope: RpcScope, name: str, version: str) -> tuple[ModelRef, ModelEntry]:
        ref = parse_model(name, version, frozenset(self._store.names()))
        entry = self._store.get(ref.model, ref.version)
        scope.model_label = entry.name
        return ref, entry

    def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.ServicerContext
    ) -> oip.ServerLiveResponse:
        """Live while the process answers RPCs (also while draining)."""
        return oip.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.ServicerContext
    ) -> oip.ServerReadyResponse:
        """Ready once every model is warmed up, until draining starts."""
        return oip.ServerReadyResponse(ready=self._ready())

    def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.ServicerContext
    ) -> oip.ModelReadyResponse:
        """Ready when the server is and the model (at that version) is served."""
        try:
            ref = parse_model(request.name, request.version, frozenset(self._store.names()))
            self._store.get(ref.model, ref.version)
        except (ModelNotFound, InvalidArgument):
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=self._ready())

    def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ServerMetadataResponse:
        """The server's name and version."""
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=[])

    def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ModelMetadataResponse:
        """Inputs and outputs of NAME (sampling) or NAME.log_prob (likelihood)."""
        scope = RpcScope("ModelMetadata", context, self._metrics)
        try:
            ref, entry = self._resolve(scope, request.name, request.version)
            response = _metadata(request.name, ref, entry)
        except Exception as error:
            scope.fail(error)
        scope.record(grpc.StatusCode.OK)
        return response

    def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.ServicerContext
    ) -> oip.ModelInferResponse:
        """Sample (NAME) or score (NAME.log_prob) through the engine."""
        scope = RpcScope("ModelInfer", context, self._metrics)
        try:
            self._admission.check()
            ref, entry = self._resolve(scope, request.model_name, request.model_version)
            config = entry.model.config
            deadline = deadline_of(context)
            job: SampleJob | LikelihoodJob
            try:
                if ref.log_prob:
                    spec = validate_likelihood(
                        likelihood_request(request, ref), config, self._limits
                    )
                    job = likelihood_job(entry, spec, deadline)
                else:
                    sample_spec = validate_sample(
                        sample_request(request, ref), config, self._limits
                    )
                    job = sample_job(entry, sample_spec, deadline)
            except InvalidArgument as error:
                raise rename_field(error) from None
            result = run_job(self._engine, job, context, deadline)
            if ref.log_prob:
                metadata, raw = output_tensor(LOG_PROB, FP64, result.log_prob.double().numpy())
            else:
                metadata, raw = output_tensor(SAMPLES, FP32, result.samples.float().numpy())
            response = oip.ModelInferResponse(
                model_name=request.model_name,
                model_version=str(result.version),
                id=request.id,
                outputs=[metadata],
                raw_output_contents=[raw],
            )
            response.parameters["seed"].uint64_param = result.seed
            response.parameters["network_evaluations"].uint64_param = result.network_evaluations
        except Exception as error:
            scope.fail(error)
        scope.record(grpc.StatusCode.OK)
        return response


def _tensor_metadata(
    name: str, datatype: str, shape: list[int]
) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


def _metadata(name: str, ref: ModelRef, entry: ModelEntry) -> oip.ModelMetadataResponse:
    config = entry.model.config
    rows = [-1, *config.sample_shape]
    labels = [_tensor_metadata(CLASS_LABEL, INT64, [-1])] if config.num_classes else []
    if ref.log_prob:
        inputs = [_tensor_metadata(DATA, FP32, rows), *labels]
        outputs = [_tensor_metadata(LOG_PROB, FP64, [-1])]
    else:
        inputs = [_tensor_metadata(NOISE, FP32, rows), *labels]
        outputs = [_tensor_metadata(SAMPLES, FP32, rows)]
    return oip.ModelMetadataResponse(
        name=name,
        versions=[str(v) for v in entry.versions],
        platform=PLATFORM,
        inputs=inputs,
        outputs=outputs,
    )
