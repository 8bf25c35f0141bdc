"""Request validation: every field is checked here, before anything becomes a tensor.

Each `validate_*` function takes a request message, the model it names and the configured
limits, and returns a frozen spec with defaults resolved and labels broadcast, or raises
`InvalidArgument` naming the field and what is allowed. Tensors arrive as numpy arrays that
have passed shape, size and finiteness checks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flowserve.modeldir import ModelConfig
from protos.flowserve.v1 import flowserve_pb2 as pb
from server import codec
from server.config import LimitsConfig
from server.errors import InvalidArgument, ModelNotFound
from server.wire_names import (
    ESTIMATOR_NAMES,
    ODE_SOLVER_ENUMS,
    SOLVER_NAMES,
    solver_enum_name,
)


@dataclass(frozen=True)
class SampleSpec:
    """A checked SampleRequest with every default resolved.

    Attributes:
        num_samples: Rows to draw.
        num_steps: Solver steps.
        solver: Solver name from flows.solvers.SOLVERS.
        seed: The client's seed, or None for the engine to choose.
        class_labels: `(num_samples,)` int64 labels, or None for an unconditional model.
        guidance_scale: Classifier-free guidance weight (1.0 = plain conditional).
        initial_noise: `(num_samples, *sample_shape)` float32, or None.
        trajectory_every: Keep x every k steps (0 = none).
    """

    num_samples: int
    num_steps: int
    solver: str
    seed: int | None
    class_labels: np.ndarray | None
    guidance_scale: float
    initial_noise: np.ndarray | None
    trajectory_every: int


@dataclass(frozen=True)
class LikelihoodSpec:
    """A checked LogLikelihoodRequest with every default resolved.

    Attributes:
        data: `(n, *sample_shape)` float32 points.
        num_steps: Solver steps.
        solver: ODE solver name.
        estimator: "exact" or "hutchinson".
        num_probes: Hutchinson probes (1 for exact).
        seed: The client's seed, or None.
        class_labels: `(n,)` int64 labels, or None.
    """

    data: np.ndarray
    num_steps: int
    solver: str
    estimator: str
    num_probes: int
    seed: int | None
    class_labels: np.ndarray | None


def check_model_name(name: str) -> str:
    """Require a model name; an unknown one is the store's NOT_FOUND, not ours."""
    if not name:
        raise InvalidArgument("model", "is required (ListModels names the served models)")
    return name


# The names a stored model can have (flowserve.modeldir's rule for model names).
_STORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_store_name(name: str) -> str:
    """Require a name that a model in the store can have, before it reaches the filesystem.

    A fuzzed SetServingVersion for a 300-character name was INTERNAL: `Path.is_dir()` raises
    OSError (ENAMETOOLONG) beyond the OS's 255-byte file name limit.

    Raises:
        ModelNotFound: no model in the store can have this name.
    """
    if not _STORE_NAME.fullmatch(name):
        raise ModelNotFound(
            f"model {name!r} is not in the store (model names match {_STORE_NAME.pattern})"
        )
    return name


def check_version(version: int) -> int:
    """Require version >= 0 (0 = the serving version)."""
    if version < 0:
        raise InvalidArgument("version", f"must be >= 0 (0 = serving version), got {version}")
    return version


def _dimension(config: ModelConfig) -> int:
    return math.prod(config.sample_shape)


def _check_num_steps(num_steps: int, config: ModelConfig, limits: LimitsConfig) -> int:
    if num_steps == 0:
        return config.default_num_steps
    if num_steps > limits.max_num_steps:
        raise InvalidArgument(
            "num_steps",
            f"must be in [1, {limits.max_num_steps}] (0 = model default "
            f"{config.default_num_steps}), got {num_steps}",
        )
    return num_steps


def _check_output_size(field: str, rows: int, config: ModelConfig, limits: LimitsConfig) -> None:
    row_bytes = codec.num_bytes(config.sample_shape)
    if rows * row_bytes > limits.max_tensor_bytes:
        most = limits.max_tensor_bytes // row_bytes
        raise InvalidArgument(
            field,
            f"{rows} samples of shape {list(config.sample_shape)} exceed the "
            f"{limits.max_tensor_bytes}-byte tensor limit; at most {most} per request",
        )


def check_tensor(
    field: str, message: pb.Tensor, config: ModelConfig, limits: LimitsConfig
) -> np.ndarray:
    """Check a `(n, *sample_shape)` tensor field and decode it.

    Order: rank and sample shape, row count, size limit, byte length, then the values.

    Returns:
        A float32 array of the message's shape with only finite values.
    """
    shape = tuple(int(n) for n in message.shape)
    sample_shape = tuple(config.sample_shape)
    expected = f"(n, {', '.join(str(n) for n in sample_shape)})"
    if len(shape) != 1 + len(sample_shape) or shape[1:] != sample_shape:
        raise InvalidArgument(
            field,
            f"shape must be {expected} for model {config.name!r}, got {list(shape)}",
        )
    if not 1 <= shape[0] <= limits.max_num_samples:
        raise InvalidArgument(
            field, f"first dimension must be in [1, {limits.max_num_samples}], got {shape[0]}"
        )
    expected_bytes = codec.num_bytes(shape)
    if expected_bytes > limits.max_tensor_bytes:
        raise InvalidArgument(
            field,
            f"shape {list(shape)} is {expected_bytes} bytes; tensors are limited to "
            f"{limits.max_tensor_bytes} bytes",
        )
    if len(message.data) != expected_bytes:
        raise InvalidArgument(
            field,
            f"data holds {len(message.data)} bytes but shape {list(shape)} needs "
            f"{expected_bytes} (4-byte little-endian float32, row-major)",
        )
    array = codec.decode_array(message)
    finite = np.isfinite(array.reshape(shape[0], -1)).all(axis=1)
    if not finite.all():
        first = int(np.argmin(finite))
        raise InvalidArgument(field, f"contains NaN or Inf (first in row {first})")
    return array


def check_class_labels(
    labels: Sequence[int], rows: int, config: ModelConfig, rows_field: str
) -> np.ndarray | None:
    """Broadcast and range-check class labels.

    Returns:
        `(rows,)` int64 labels, the null class `num_classes` for an empty list on a
        class-conditional model, or None for an unconditional model.
    """
    num_classes = config.num_classes
    if num_classes == 0:
        if labels:
            raise InvalidArgument(
                "class_labels",
                f"model {config.name!r} is unconditional; send no class_labels",
            )
        return None
    if len(labels) not in (0, 1, rows):
        raise InvalidArgument(
            "class_labels",
            f"must hold 0, 1 or {rows} labels (one per {rows_field} row), got {len(labels)}",
        )
    values = np.asarray(list(labels), dtype=np.int64)
    out_of_range = (values < 0) | (values > num_classes)
    if out_of_range.any():
        bad = int(values[np.argmax(out_of_range)])
        raise InvalidArgument(
            "class_labels",
            f"must be in [0, {num_classes - 1}] (or {num_classes}, the null class, for an "
            f"unconditional row), got {bad}",
        )
    if len(values) == 0:
        return np.full(rows, num_classes, dtype=np.int64)
    return np.broadcast_to(values, (rows,)).copy()


def _check_guidance(
    scale: float, has_labels: bool, config: ModelConfig, limits: LimitsConfig
) -> float:
    if not math.isfinite(scale):
        raise InvalidArgument("guidance_scale", f"must be finite, got {scale}")
    if scale == 0.0 or scale == 1.0:
        return 1.0  # 0 is the unset value: plain conditional sampling
    if config.num_classes == 0:
        raise InvalidArgument(
            "guidance_scale",
            f"model {config.name!r} is unconditional: leave guidance_scale 0 (or 1)",
        )
    if not has_labels:
        raise InvalidArgument(
            "guidance_scale", "guidance needs class_labels: send the class(es) to guide towards"
        )
    if not 0.0 < scale <= limits.max_guidance_scale:
        raise InvalidArgument(
            "guidance_scale",
            f"must be in (0, {limits.max_guidance_scale}] (0 means 1), got {scale}",
        )
    return float(scale)


def _check_solver(value: pb.Solver, default: str) -> str:
    if value == pb.SOLVER_UNSPECIFIED:
        return default
    if value not in SOLVER_NAMES:
        allowed = ", ".join(solver_enum_name(v) for v in SOLVER_NAMES)
        raise InvalidArgument("solver", f"must be one of {allowed}, got enum value {value}")
    return SOLVER_NAMES[value]


def validate_sample(
    request: pb.SampleRequest, config: ModelConfig, limits: LimitsConfig
) -> SampleSpec:
    """Check a SampleRequest against its model and the limits.

    Raises:
        InvalidArgument: naming the first bad field and its allowed range.
    """
    initial_noise = None
    if request.HasField("initial_noise"):
        initial_noise = check_tensor("initial_noise", request.initial_noise, config, limits)
        rows = initial_noise.shape[0]
        if request.num_samples not in (0, rows):
            raise InvalidArgument(
                "num_samples",
                f"must be 0 or equal initial_noise's first dimension {rows}, "
                f"got {request.num_samples}",
            )
        num_samples = rows
    else:
        num_samples = request.num_samples
        if not 1 <= num_samples <= limits.max_num_samples:
            raise InvalidArgument(
                "num_samples",
                f"must be in [1, {limits.max_num_samples}], got {num_samples}",
            )
    _check_output_size("num_samples", num_samples, config, limits)
    num_steps = _check_num_steps(request.num_steps, config, limits)
    solver = _check_solver(request.solver, config.default_solver)
    class_labels = check_class_labels(request.class_labels, num_samples, config, "sample")
    guidance_scale = _check_guidance(
        request.guidance_scale, len(request.class_labels) > 0, config, limits
    )
    trajectory_every = request.trajectory_every
    if trajectory_every > num_steps:
        raise InvalidArgument(
            "trajectory_every",
            f"must be in [0, num_steps={num_steps}] (0 = no trajectory), got {trajectory_every}",
        )
    if trajectory_every:
        snapshots = num_steps // trajectory_every
        snapshot_bytes = num_samples * codec.num_bytes(config.sample_shape)
        if snapshots * snapshot_bytes > limits.max_tensor_bytes:
            fewest = math.ceil(num_steps * snapshot_bytes / limits.max_tensor_bytes)
            raise InvalidArgument(
                "trajectory_every",
                f"{snapshots} snapshots of {snapshot_bytes} bytes exceed the "
                f"{limits.max_tensor_bytes}-byte limit; use trajectory_every >= {fewest}",
            )
    return SampleSpec(
        num_samples=num_samples,
        num_steps=num_steps,
        solver=solver,
        seed=request.seed if request.HasField("seed") else None,
        class_labels=class_labels,
        guidance_scale=guidance_scale,
        initial_noise=initial_noise,
        trajectory_every=trajectory_every,
    )


def validate_likelihood(
    request: pb.LogLikelihoodRequest, config: ModelConfig, limits: LimitsConfig
) -> LikelihoodSpec:
    """Check a LogLikelihoodRequest against its model and the limits.

    Defaults: the configured ODE solver (rk4), the model's step count, EXACT up to
    `limits.exact_max_dimension` dimensions and HUTCHINSON with `default_num_probes` above.

    Raises:
        InvalidArgument: naming the first bad field and its allowed range.
    """
    if not request.HasField("data"):
        raise InvalidArgument(
            "data", f"is required: the points to score, shape (n, {_shape_text(config)})"
        )
    data = check_tensor("data", request.data, config, limits)
    num_steps = _check_num_steps(request.num_steps, config, limits)
    if request.solver == pb.SOLVER_UNSPECIFIED:
        solver = limits.default_likelihood_solver
    elif request.solver in ODE_SOLVER_ENUMS:
        solver = SOLVER_NAMES[request.solver]
    else:
        allowed = ", ".join(solver_enum_name(v) for v in ODE_SOLVER_ENUMS)
        raise InvalidArgument(
            "solver", f"LogLikelihood needs an ODE solver: one of {allowed}, got {request.solver}"
        )
    dimension = _dimension(config)
    if request.estimator == pb.ESTIMATOR_UNSPECIFIED:
        estimator = "exact" if dimension <= limits.exact_max_dimension else "hutchinson"
    elif request.estimator in ESTIMATOR_NAMES:
        estimator = ESTIMATOR_NAMES[request.estimator]
    else:
        raise InvalidArgument(
            "estimator", f"must be EXACT or HUTCHINSON, got enum value {request.estimator}"
        )
    if estimator == "exact":
        if request.num_probes:
            raise InvalidArgument(
                "num_probes",
                f"only HUTCHINSON uses probes and the estimator is EXACT (the default up to "
                f"{limits.exact_max_dimension} dimensions); leave num_probes 0 or set "
                f"estimator HUTCHINSON",
            )
        num_probes = 1
    else:
        num_probes = request.num_probes or limits.default_num_probes
        if num_probes > limits.max_num_probes:
            raise InvalidArgument(
                "num_probes",
                f"must be in [1, {limits.max_num_probes}] (0 = {limits.default_num_probes}), "
                f"got {num_probes}",
            )
    class_labels = check_class_labels(request.class_labels, data.shape[0], config, "data")
    return LikelihoodSpec(
        data=data,
        num_steps=num_steps,
        solver=solver,
        estimator=estimator,
        num_probes=num_probes,
        seed=request.seed if request.HasField("seed") else None,
        class_labels=class_labels,
    )


def _shape_text(config: ModelConfig) -> str:
    return ", ".join(str(n) for n in config.sample_shape)
