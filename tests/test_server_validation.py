"""Request validation and the tensor codec, without a server.

The end-to-end status codes are checked through real channels in test_grpc_service.py; these
tests pin the resolved defaults and the wire format against independent encodings.
"""

from __future__ import annotations

import math
import struct

import grpc
import numpy as np
import pytest

from flows.nets import NetSpec
from flowserve.modeldir import ModelConfig
from protos.flowserve.v1 import flowserve_pb2 as pb
from server import codec
from server.config import LimitsConfig
from server.engine import BackendFailed, EngineClosed, JobCancelled, QueueFull
from server.errors import InvalidArgument, ModelNotFound, status_for
from server.validation import validate_likelihood, validate_sample

LIMITS = LimitsConfig(max_tensor_bytes=4096, max_num_samples=256)


def _config(dim: int = 2, num_classes: int = 0) -> ModelConfig:
    return ModelConfig(
        name="m",
        architecture=NetSpec("time_mlp", {"dim": dim, "num_classes": num_classes}),
        sample_shape=(dim,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=num_classes,
        default_solver="midpoint",
        default_num_steps=12,
    )


def _tensor(array: np.ndarray) -> pb.Tensor:
    # Independent encoding: struct's explicit little-endian floats.
    flat = array.astype(np.float64).ravel().tolist()
    return pb.Tensor(shape=list(array.shape), data=struct.pack(f"<{len(flat)}f", *flat))


def test_codec_matches_struct_little_endian_float32() -> None:
    array = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    message = codec.encode_array(array)
    assert message.data == _tensor(array).data
    assert list(message.shape) == [3, 2]
    np.testing.assert_array_equal(codec.decode_array(message), array)  # exact: float32 both ways


def test_sample_defaults_resolve_from_the_model() -> None:
    spec = validate_sample(pb.SampleRequest(model="m", num_samples=5), _config(), LIMITS)
    assert (spec.num_samples, spec.num_steps, spec.solver) == (5, 12, "midpoint")
    assert spec.seed is None and spec.class_labels is None and spec.initial_noise is None
    assert spec.guidance_scale == 1.0


def test_seed_zero_is_a_seed() -> None:
    request = pb.SampleRequest(model="m", num_samples=1, seed=0)
    assert validate_sample(request, _config(), LIMITS).seed == 0


def test_labels_broadcast_and_empty_means_the_null_class() -> None:
    config = _config(num_classes=4)
    one = validate_sample(pb.SampleRequest(num_samples=3, class_labels=[2]), config, LIMITS)
    assert one.class_labels is not None and one.class_labels.tolist() == [2, 2, 2]
    none = validate_sample(pb.SampleRequest(num_samples=2), config, LIMITS)
    assert none.class_labels is not None and none.class_labels.tolist() == [4, 4]
    guided = validate_sample(
        pb.SampleRequest(num_samples=2, class_labels=[0, 3], guidance_scale=2.5), config, LIMITS
    )
    assert guided.guidance_scale == 2.5


def test_initial_noise_sets_the_sample_count() -> None:
    noise = np.arange(8, dtype=np.float32).reshape(4, 2)
    spec = validate_sample(pb.SampleRequest(initial_noise=_tensor(noise)), _config(), LIMITS)
    assert spec.num_samples == 4
    assert spec.initial_noise is not None
    np.testing.assert_array_equal(spec.initial_noise, noise)  # exact: lossless decode


@pytest.mark.parametrize(
    ("request_fields", "field", "allowed"),
    [
        ({"num_samples": 0}, "num_samples", "[1, 256]"),
        ({"num_samples": 257}, "num_samples", "[1, 256]"),
        ({"num_samples": 1, "num_steps": 1001}, "num_steps", "[1, 1000]"),
        ({"num_samples": 1, "solver": 17}, "solver", "EULER, MIDPOINT, HEUN, RK4, EULER_MARUYAMA"),
        ({"num_samples": 1, "class_labels": [0]}, "class_labels", "unconditional"),
        ({"num_samples": 1, "guidance_scale": 3.0}, "guidance_scale", "leave guidance_scale 0"),
        ({"num_samples": 1, "guidance_scale": math.nan}, "guidance_scale", "finite"),
        ({"num_samples": 2, "trajectory_every": 13}, "trajectory_every", "[0, num_steps=12]"),
        ({"num_samples": 200, "trajectory_every": 1}, "trajectory_every", "trajectory_every >= "),
    ],
)
def test_bad_sample_fields(request_fields: dict[str, object], field: str, allowed: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        validate_sample(pb.SampleRequest(model="m", **request_fields), _config(), LIMITS)
    assert error.value.field == field
    assert allowed in str(error.value)


@pytest.mark.parametrize(
    ("noise", "num_samples", "allowed"),
    [
        (pb.Tensor(shape=[2, 3], data=bytes(24)), 0, "shape must be (n, 2)"),
        (pb.Tensor(shape=[2], data=bytes(8)), 0, "shape must be (n, 2)"),
        (pb.Tensor(shape=[0, 2], data=b""), 0, "first dimension must be in [1, 256]"),
        (
            pb.Tensor(shape=[2, 2], data=bytes(12)),
            0,
            "data holds 12 bytes but shape [2, 2] needs 16",
        ),
        (pb.Tensor(shape=[3, 2], data=bytes(24)), 2, "must be 0 or equal initial_noise"),
        (_tensor(np.array([[0.0, 1.0], [np.nan, 0.0]])), 0, "NaN or Inf (first in row 1)"),
        (_tensor(np.array([[np.inf, 1.0]])), 0, "NaN or Inf (first in row 0)"),
    ],
)
def test_bad_initial_noise(noise: pb.Tensor, num_samples: int, allowed: str) -> None:
    request = pb.SampleRequest(initial_noise=noise, num_samples=num_samples)
    with pytest.raises(InvalidArgument) as error:
        validate_sample(request, _config(), LIMITS)
    assert allowed in str(error.value)


def test_tensor_size_limit_is_checked_before_the_bytes() -> None:
    # 2 * 600 * 4 = 4800 bytes > 4096, and the data is not even sent: refused on the shape.
    config = _config(dim=600)
    noise = pb.Tensor(shape=[2, 600], data=b"")
    with pytest.raises(InvalidArgument, match="tensors are limited to 4096 bytes"):
        validate_sample(pb.SampleRequest(initial_noise=noise), config, LIMITS)
    with pytest.raises(InvalidArgument, match="at most 1 per request"):
        validate_sample(pb.SampleRequest(num_samples=2), config, LIMITS)


def test_labels_count_and_range_on_a_conditional_model() -> None:
    config = _config(num_classes=3)
    with pytest.raises(InvalidArgument, match="must hold 0, 1 or 4 labels"):
        validate_sample(pb.SampleRequest(num_samples=4, class_labels=[0, 1]), config, LIMITS)
    with pytest.raises(InvalidArgument, match=r"must be in \[0, 2\].*got 5"):
        validate_sample(pb.SampleRequest(num_samples=1, class_labels=[5]), config, LIMITS)
    with pytest.raises(InvalidArgument, match="guidance needs class_labels"):
        validate_sample(pb.SampleRequest(num_samples=1, guidance_scale=2.0), config, LIMITS)
    with pytest.raises(InvalidArgument, match=r"guidance_scale: must be in \(0, 100.0\]"):
        validate_sample(
            pb.SampleRequest(num_samples=1, class_labels=[0], guidance_scale=-1.0), config, LIMITS
        )


def test_likelihood_defaults_follow_the_dimension() -> None:
    small = np.zeros((2, 64), dtype=np.float32)
    spec = validate_likelihood(
        pb.LogLikelihoodRequest(data=_tensor(small)), _config(dim=64), LimitsConfig()
    )
    assert (spec.solver, spec.estimator, spec.num_steps) == ("rk4", "exact", 12)
    large = np.zeros((2, 65), dtype=np.float32)
    spec = validate_likelihood(
        pb.LogLikelihoodRequest(data=_tensor(large)), _config(dim=65), LimitsConfig()
    )
    assert (spec.estimator, spec.num_probes) == ("hutchinson", 8)


@pytest.mark.parametrize(
    ("request_fields", "field", "allowed"),
    [
        ({}, "data", "is required"),
        ({"data": pb.Tensor(shape=[1, 2], data=bytes(8)), "solver": pb.EULER_MARUYAMA}, "solver",
         "ODE solver: one of EULER, MIDPOINT, HEUN, RK4"),
        ({"data": pb.Tensor(shape=[1, 2], data=bytes(8)), "estimator": 9}, "estimator",
         "EXACT or HUTCHINSON"),
        ({"data": pb.Tensor(shape=[1, 2], data=bytes(8)), "num_probes": 4}, "num_probes",
         "estimator HUTCHINSON"),
        ({"data": pb.Tensor(shape=[1, 2], data=bytes(8)), "estimator": pb.HUTCHINSON,
          "num_probes": 65}, "num_probes", "[1, 64]"),
    ],
)  # fmt: skip
def test_bad_likelihood_fields(request_fields: dict[str, object], field: str, allowed: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        validate_likelihood(pb.LogLikelihoodRequest(**request_fields), _config(), LIMITS)
    assert error.value.field == field
    assert allowed in str(error.value)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("num_steps", "too many"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("no such model"), grpc.StatusCode.NOT_FOUND),
        (QueueFull(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineClosed(), grpc.StatusCode.UNAVAILABLE),
        (JobCancelled(), grpc.StatusCode.CANCELLED),
        (BackendFailed("cuda oom"), grpc.StatusCode.INTERNAL),
        (KeyError("secret internals"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(error: Exception, code: grpc.StatusCode) -> None:
    status = status_for(error, "req-1")
    assert status.code == code
    if code == grpc.StatusCode.INTERNAL:
        # Internals stay in the log: the client gets the request id, not the exception.
        assert "secret" not in status.message and "cuda" not in status.message
        assert "req-1" in status.message
