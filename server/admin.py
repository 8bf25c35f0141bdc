"""`flowserve.v1.ModelAdmin`: the bearer token is checked first; model upload and version
control are not provided by this server yet (UNIMPLEMENTED)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NoReturn

import grpc

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from server.auth import check_admin_token
from server.config import AdminConfig
from server.errors import Unimplemented
from server.metrics import ServerMetrics
from server.rpc import RpcScope


class ModelAdminServicer(pb_grpc.ModelAdminServicer):
    """`flowserve.v1.ModelAdmin`: checks the admin token; the methods themselves are not
    provided by this server yet (UNIMPLEMENTED)."""

    def __init__(self, metrics: ServerMetrics, admin: AdminConfig) -> None:
        self._metrics = metrics
        self._admin = admin

    def _refuse(self, method: str, context: grpc.ServicerContext) -> NoReturn:
        scope = RpcScope(method, context, self._metrics)
        scope.model_label = ""
        try:
            check_admin_token(context.invocation_metadata(), self._admin.token)
            raise Unimplemented(f"ModelAdmin.{method} is not available on this server yet")
        except Exception as error:
            scope.fail(error)

    def PushModel(
        self, request_iterator: Iterator[pb.PushModelChunk], context: grpc.ServicerContext
    ) -> pb.PushModelResponse:
        """Upload a model version (not available yet)."""
        self._refuse("PushModel", context)

    def SetServingVersion(
        self, request: pb.SetServingVersionRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        """Pin or unpin the serving version (not available yet)."""
        self._refuse("SetServingVersion", context)
