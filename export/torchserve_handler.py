"""TorchServe handler: one model directory served through `export.sampling_service`.

TorchServe imports this file from the model archive (`flowserve export DIR --format mar`) and
calls `initialize(context)` once, then `handle(data, context)` per batch of requests. Its own
loader (`BaseHandler.initialize`) would `torch.load` a pickle; this handler never calls it: the
model is rebuilt from `config.json` and safetensors weights. The class subclasses TorchServe's
`BaseHandler` when `ts` is importable and plain `object` otherwise, so the logic can be driven
in-process without TorchServe.
"""

from __future__ import annotations

from typing import Any

from export.sampling_service import SamplingService

try:
    from ts.torch_handler.base_handler import BaseHandler as _HandlerBase
except ImportError:  # TorchServe absent: the handler still works when driven directly
    _HandlerBase = object


class FlowServeHandler(_HandlerBase):  # type: ignore[misc]
    """TorchServe entry point; requests are JSON objects (see `export.sampling_service`).

    TorchServe instantiates the only class defined in the handler file, so this module must
    define no other class.
    """

    def __init__(self) -> None:
        super().__init__()
        self.service: SamplingService | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Load the model from `context.system_properties["model_dir"]`."""
        self.service = SamplingService(context.system_properties["model_dir"])
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        """Answer a batch of requests, one response per request.

        A bad request gets status 400 and `{"error": message}`; the others in the batch are
        still answered.
        """
        if self.service is None:
            raise RuntimeError("handler used before initialize()")
        responses: list[dict[str, Any]] = []
        for index, row in enumerate(data):
            body = row.get("body", row.get("data")) if isinstance(row, dict) else row
            try:
                responses.append(self.service.handle(body))
            except ValueError as error:
                if hasattr(context, "set_response_status"):
                    context.set_response_status(400, str(error), index)
                responses.append({"error": str(error)})
        return responses
