"""Open Inference Protocol (KServe v2) messages <-> flowserve.v1 requests and results.

An OIP `ModelInferRequest` for model NAME becomes a `flowserve.v1.SampleRequest` (input `NOISE`
-> `initial_noise`, `CLASS_LABEL` -> `class_labels`, parameters -> fields), and one for
`NAME.log_prob` a `LogLikelihoodRequest` (`DATA` -> `data`), so that `server.validation` checks
both exactly as it checks flowserve.v1 requests. Inputs arrive as `raw_input_contents`
(little-endian, row-major, one entry per input) or as typed `contents`; outputs leave as
`raw_output_contents`, as Triton answers. No math here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.inference import grpc_predict_v2_pb2 as oip
from server.errors import InvalidArgument
from server.wire_names import ESTIMATOR_ENUMS, SOLVER_ENUMS

LOG_PROB_SUFFIX = ".log_prob"
NOISE, DATA, CLASS_LABEL = "NOISE", "DATA", "CLASS_LABEL"
SAMPLES, LOG_PROB = "SAMPLES", "LOG_PROB"
FP32, FP64, INT64 = "FP32", "FP64", "INT64"
# Triton's own request parameters, which clients may send on any request; they mean nothing here.
_IGNORED_PARAMETERS = frozenset({"priority", "timeout", "binary_data_output", "headers"})
SAMPLE_PARAMETERS = ("num_steps", "solver", "guidance_scale", "seed")
LOG_PROB_PARAMETERS = ("num_steps", "estimator", "num_probes", "seed")
_UINT32_MAX = 2**32 - 1
_INT64_MAX = 2**63 - 1
_DTYPES: dict[str, np.dtype] = {
    FP32: np.dtype("<f4"),
    FP64: np.dtype("<f8"),
    INT64: np.dtype("<i8"),
}


@dataclass(frozen=True)
class OipTensor:
    """One tensor of an OIP message: its name, datatype, shape and little-endian bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class ModelRef:
    """Which flowserve model and method an OIP model name means.

    Attributes:
        model: The flowserve model name (NAME).
        log_prob: True for `NAME.log_prob` (LogLikelihood), False for NAME (Sample).
        version: The flowserve version (0 = serving version).
    """

    model: str
    log_prob: bool
    version: int


def parse_model(name: str, version: str, served: frozenset[str]) -> ModelRef:
    """Resolve an OIP model name and string version.

    `NAME.log_prob` means the likelihood of NAME unless a model is really called that.

    Raises:
        InvalidArgument: the name is empty or the version is not a decimal integer in
            [1, 2**63 - 1] (flowserve.v1 versions are int64).
    """
    if not name:
        raise InvalidArgument("model_name", "is required (ServerMetadata / ModelMetadata)")
    log_prob = name.endswith(LOG_PROB_SUFFIX) and name not in served
    model = name[: -len(LOG_PROB_SUFFIX)] if log_prob else name
    if not version:
        return ModelRef(model, log_prob, 0)
    # Count digits before int(): it raises ValueError beyond 4300 of them (a fuzzed version
    # of 5000 nines was an UNKNOWN status), and no int64 has more than 19.
    digits = version.lstrip("0")
    if (
        not (version.isascii() and version.isdigit())
        or not digits
        or len(digits) > len(str(_INT64_MAX))
        or int(digits) > _INT64_MAX
    ):
        raise InvalidArgument(
            "model_version",
            f"must be empty (serving version) or a decimal version in [1, {_INT64_MAX}], "
            f"got {_shorten(version)}",
        )
    return ModelRef(model, log_prob, int(digits))


def _shorten(text: str, limit: int = 64) -> str:
    """`text` quoted for an error message, cut after `limit` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _parameter_value(parameter: oip.InferParameter) -> object:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def _int_parameter(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an int64 parameter, got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be in [{low}, {high}], got {value}")
    return value


def _float_parameter(name: str, value: object) -> float:
    # tritonclient (2.41) cannot send double parameters: accept int64 and decimal strings too.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise InvalidArgument(name, f"must be a double (or int64, or decimal string), got {value!r}")


def _choice_parameter(name: str, value: object, allowed: Mapping[str, int]) -> int:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise InvalidArgument(name, f"must be a string, one of {sorted(allowed)}, got {value!r}")
    return allowed[value.lower()]


def read_parameters(
    parameters: Mapping[str, oip.InferParameter], allowed: tuple[str, ...]
) -> dict[str, int | float]:
    """The request parameters as plain values, checked for type and range.

    Raises:
        InvalidArgument: an unknown parameter, or a value of the wrong type or range.
    """
    values: dict[str, int | float] = {}
    for name, parameter in parameters.items():
        if name in _IGNORED_PARAMETERS:
            continue
        if name not in allowed:
            raise InvalidArgument(
                f"parameters[{name!r}]", f"is not a parameter of this model; allowed: {allowed}"
            )
        value = _parameter_value(parameter)
        if name in ("num_steps", "num_probes"):
            values[name] = _int_parameter(name, value, 0, _UINT32_MAX)
        elif name == "seed":
            values[name] = _int_parameter(name, value, 0, _INT64_MAX)
        elif name == "solver":
            values[name] = _choice_parameter(name, value, SOLVER_ENUMS)
        elif name == "estimator":
            values[name] = _choice_parameter(name, value, ESTIMATOR_ENUMS)
        elif name == "guidance_scale":
            values[name] = _float_parameter(name, value)
    return values


def _typed_bytes(tensor: oip.ModelInferRequest.InferInputTensor, count: int) -> bytes:
    contents = tensor.contents
    if tensor.datatype == FP32:
        values: object = contents.fp32_contents
    elif tensor.datatype == INT64:
        values = contents.int64_contents
    else:
        values = contents.fp64_contents
    array = np.asarray(values, dtype=_DTYPES[tensor.datatype])
    if array.size != count:
        raise InvalidArgument(
            tensor.name,
            f"shape {list(tensor.shape)} needs {count} values but the {tensor.datatype} "
            f"contents hold {array.size}",
        )
    return array.tobytes()


def read_inputs(
    request: oip.ModelInferRequest, expected: Mapping[str, str], required: str
) -> dict[str, OipTensor]:
    """The request's input tensors by name, with their bytes from raw or typed contents.

    Args:
        request: The OIP request.
        expected: Allowed input names and the datatype each must have.
        required: The one input that must be present.

    Raises:
        InvalidArgument: an unknown, duplicate or missing input, a wrong datatype, a negative
            dimension, or contents that do not fill the shape.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            "raw_input_contents",
            f"holds {len(raw)} entries for {len(request.inputs)} inputs; send one per input",
        )
    tensors: dict[str, OipTensor] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in expected:
            raise InvalidArgument(
                f"inputs[{index}]", f"unknown input {tensor.name!r}; allowed: {sorted(expected)}"
            )
        if tensor.name in tensors:
            raise InvalidArgument(tensor.name, "is given twice")
        if tensor.datatype != expected[tensor.name]:
            raise InvalidArgument(
                tensor.name, f"datatype must be {expected[tensor.name]}, got {tensor.datatype!r}"
            )
        shape = tuple(int(n) for n in tensor.shape)
        if any(n < 0 for n in shape):
            raise InvalidArgument(tensor.name, f"shape must not be negative, got {list(shape)}")
        count = math.prod(shape)
        if raw:
            data = raw[index]
            needed = count * _DTYPES[tensor.datatype].itemsize
            if len(data) != needed:
                raise InvalidArgument(
                    tensor.name,
                    f"raw contents hold {len(data)} bytes but shape {list(shape)} of "
                    f"{tensor.datatype} needs {needed} (little-endian, row-major)",
                )
        else:
            data = _typed_bytes(tensor, count)
        tensors[tensor.name] = OipTensor(tensor.name, tensor.datatype, shape, data)
    if required not in tensors:
        raise InvalidArgument(required, f"input {required} is required")
    return tensors


def _labels(tensors: Mapping[str, OipTensor]) -> list[int]:
    label = tensors.get(CLASS_LABEL)
    if label is None:
        return []
    if len(label.shape) != 1:
        raise InvalidArgument(CLASS_LABEL, f"shape must be [n], got {list(label.shape)}")
    return [int(v) for v in np.frombuffer(label.data, dtype=_DTYPES[INT64])]


def _tensor(tensor: OipTensor) -> pb.Tensor:
    # FP32 little-endian row-major bytes are exactly flowserve.v1's Tensor data.
    return pb.Tensor(shape=list(tensor.shape), data=tensor.data)


def check_outputs(request: oip.ModelInferRequest, output: str) -> None:
    """Require that any requested output is the model's only output.

    Raises:
        InvalidArgument: another output name was requested.
    """
    for requested in request.outputs:
        if requested.name != output:
            raise InvalidArgument(
                "outputs", f"unknown output {requested.name!r}; this model returns {output}"
            )


def sample_request(request: oip.ModelInferRequest, ref: ModelRef) -> pb.SampleRequest:
    """The flowserve.v1 SampleRequest an OIP request for NAME stands for."""
    tensors = read_inputs(request, {NOISE: FP32, CLASS_LABEL: INT64}, NOISE)
    check_outputs(request, SAMPLES)
    params = read_parameters(request.parameters, SAMPLE_PARAMETERS)
    message = pb.SampleRequest(
        model=ref.model,
        version=ref.version,
        initial_noise=_tensor(tensors[NOISE]),
        class_labels=_labels(tensors),
        num_steps=int(params.get("num_steps", 0)),
        solver=cast(pb.Solver, params.get("solver", pb.SOLVER_UNSPECIFIED)),
        guidance_scale=params.get("guidance_scale", 0.0),
    )
    if "seed" in params:
        message.seed = int(params["seed"])
    return message


def likelihood_request(request: oip.ModelInferRequest, ref: ModelRef) -> pb.LogLikelihoodRequest:
    """The flowserve.v1 LogLikelihoodRequest an OIP request for NAME.log_prob stands for."""
    tensors = read_inputs(request, {DATA: FP32, CLASS_LABEL: INT64}, DATA)
    check_outputs(request, LOG_PROB)
    params = read_parameters(request.parameters, LOG_PROB_PARAMETERS)
    message = pb.LogLikelihoodRequest(
        model=ref.model,
        version=ref.version,
        data=_tensor(tensors[DATA]),
        class_labels=_labels(tensors),
        num_steps=int(params.get("num_steps", 0)),
        estimator=cast(pb.Estimator, params.get("estimator", pb.ESTIMATOR_UNSPECIFIED)),
        num_probes=int(params.get("num_probes", 0)),
    )
    if "seed" in params:
        message.seed = int(params["seed"])
    return message


# flowserve.v1 field names in validation messages -> the OIP names the client used.
_FIELD_NAMES = {
    "initial_noise": NOISE,
    "num_samples": NOISE,
    "data": DATA,
    "class_labels": CLASS_LABEL,
}


def rename_field(error: InvalidArgument) -> InvalidArgument:
    """The same validation error, naming the OIP input instead of the flowserve.v1 field."""
    name = _FIELD_NAMES.get(error.field)
    if name is None:
        return error
    detail = str(error)[len(error.field) + 2 :]
    return InvalidArgument(name, detail)


def output_tensor(
    name: str, datatype: str, array: np.ndarray
) -> tuple[oip.ModelInferResponse.InferOutputTensor, bytes]:
    """An output's metadata and its raw little-endian row-major bytes."""
    wire = np.ascontiguousarray(array, dtype=_DTYPES[datatype])
    metadata = oip.ModelInferResponse.InferOutputTensor(
        name=name, datatype=datatype, shape=list(wire.shape)
    )
    return metadata, wire.tobytes()
