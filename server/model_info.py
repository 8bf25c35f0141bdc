"""`ModelInfo` messages from the store's entries."""

from __future__ import annotations

from protos.flowserve.v1 import flowserve_pb2 as pb
from server.store import ModelEntry
from server.wire_names import SOLVER_ENUMS


def model_info(entry: ModelEntry) -> pb.ModelInfo:
    """Describe a served model: what a client needs to build requests for it."""
    config = entry.model.config
    path = dict(config.path)
    path_kind = str(path.pop("kind", ""))
    parameters = {
        key: float(value)
        for key, value in path.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    return pb.ModelInfo(
        name=entry.name,
        version=entry.version,
        serving_version=entry.version,
        versions=list(entry.versions),
        sample_shape=list(config.sample_shape),
        num_classes=config.num_classes,
        parameterization=config.parameterization,
        path=path_kind,
        path_parameters=parameters,
        default_solver=SOLVER_ENUMS[config.default_solver],
        default_num_steps=config.default_num_steps,
        backend=entry.model.backend.name,
        available_backends=list(entry.available_backends),
        architecture=config.architecture.kind,
    )
