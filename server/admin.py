"""`flowserve.v1.ModelAdmin`: push model versions and pin the serving one.

The bearer token is checked first (`server.auth`); the work is `server.lifecycle`'s. Every
push is counted in `flowserve_model_push_total{result}` with result `accepted`, `rejected`
(a failed check or a malformed stream), `denied` (token) or `error` (anything else).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from server.auth import check_admin_token
from server.config import AdminConfig
from server.errors import (
    InvalidArgument,
    PermissionDenied,
    PushRejected,
    Unauthenticated,
    VersionUnavailable,
)
from server.lifecycle import ModelLifecycle
from server.metrics import ServerMetrics
from server.model_info import model_info
from server.rpc import RpcScope
from server.validation import check_store_name

_REJECTED = (InvalidArgument, PushRejected, VersionUnavailable)
_DENIED = (Unauthenticated, PermissionDenied)


def _push_result(error: Exception) -> str:
    if isinstance(error, _DENIED):
        return "denied"
    if isinstance(error, _REJECTED):
        return "rejected"
    return "error"


class ModelAdminServicer(pb_grpc.ModelAdminServicer):
    """`flowserve.v1.ModelAdmin`: token check, then the model lifecycle."""

    def __init__(
        self, metrics: ServerMetrics, admin: AdminConfig, lifecycle: ModelLifecycle
    ) -> None:
        self._metrics = metrics
        self._admin = admin
        self._lifecycle = lifecycle

    def PushModel(
        self, request_iterator: Iterator[pb.PushModelChunk], context: grpc.ServicerContext
    ) -> pb.PushModelResponse:
        """Receive a model version, check it, store it as the next version and serve it."""
        scope = RpcScope("PushModel", context, self._metrics)
        scope.model_label = ""
        try:
            check_admin_token(context.invocation_metadata(), self._admin.token)
            outcome = self._lifecycle.push(request_iterator)
            info = model_info(outcome.entry)
            info.serving_version = outcome.serving_version
        except Exception as error:
            self._metrics.model_push_total.labels(result=_push_result(error)).inc()
            scope.fail(error)
        self._metrics.model_push_total.labels(result="accepted").inc()
        scope.log.info(
            "pushed %s version %d (serving %d)",
            outcome.entry.name,
            outcome.entry.version,
            outcome.serving_version,
        )
        scope.record(grpc.StatusCode.OK)
        return pb.PushModelResponse(model=info)

    def SetServingVersion(
        self, request: pb.SetServingVersionRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        """Pin a version (rollback or roll forward), or unpin with version 0."""
        scope = RpcScope("SetServingVersion", context, self._metrics)
        scope.model_label = ""
        try:
            check_admin_token(context.invocation_metadata(), self._admin.token)
            name = check_store_name(request.model)
            entry = self._lifecycle.set_serving(name, request.version)
            scope.model_label = entry.name
            info = model_info(entry)
        except Exception as error:
            scope.fail(error)
        scope.record(grpc.StatusCode.OK)
        return info
