"""The Open Inference Protocol (KServe v2) on flowserve's port, through Triton's real client.

tritonclient.grpc runs in a subprocess (tests/oip_tritonclient.py): its generated `inference.*`
protos clash with ours in one process. Its results are compared with flowserve.v1's Sample and
LogLikelihood answers for the same noise and data, over a separate channel in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT, ServerProcess

TIMEOUT = 30.0
OIP_SERVICE = "inference.GRPCInferenceService"
CLIENT_SCRIPT = REPO_ROOT / "tests" / "oip_tritonclient.py"


@pytest.fixture(scope="module")
def channel(shared_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shared_server.target) as open_channel:
        grpc.channel_ready_future(open_channel).result(timeout=TIMEOUT)
        yield open_channel


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "noise": rng.standard_normal((5, 2)).astype(np.float32),
        "data": rng.standard_normal((4, 2)).astype(np.float32),
        "labels": np.array([0, 1, 2, 1, 0], dtype=np.int64),
    }


@pytest.fixture(scope="module")
def triton_run(
    shared_server: ServerProcess,
    inputs: dict[str, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, object]:
    """The scenario of tests/oip_tritonclient.py, with the metrics before and after it."""
    path = tmp_path_factory.mktemp("oip") / "inputs.npz"
    np.savez(path, **inputs)
    codes = ("OK", "INVALID_ARGUMENT")
    before = {
        code: shared_server.metric(
            "flowserve_requests_total", method="ModelInfer", model="toy2d", code=code
        )
        for code in codes
    }
    done = subprocess.run(
        [sys.executable, str(CLIENT_SCRIPT), shared_server.target, str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    result["metric_delta"] = {
        code: shared_server.metric(
            "flowserve_requests_total", method="ModelInfer", model="toy2d", code=code
        )
        - before[code]
        for code in codes
    }
    return result


def _tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=list(array.shape), data=array.astype("<f4").tobytes())


def _samples(response: pb.SampleResponse) -> np.ndarray:
    return np.frombuffer(response.samples.data, dtype="<f4").reshape(tuple(response.samples.shape))


def test_metadata_describes_inputs_and_outputs(triton_run: dict) -> None:
    meta = triton_run["metadata"]
    assert meta["toy2d"]["inputs"] == [["NOISE", "FP32", [-1, 2]]]
    assert meta["toy2d"]["outputs"] == [["SAMPLES", "FP32", [-1, 2]]]
    # Version 3 of toy2d is corrupt in the tiny store; 1 and 2 are listed as decimal strings.
    assert meta["toy2d"]["versions"] == ["1", "2"]
    assert meta["toy2d.log_prob"]["inputs"] == [["DATA", "FP32", [-1, 2]]]
    assert meta["toy2d.log_prob"]["outputs"] == [["LOG_PROB", "FP64", [-1]]]
    assert meta["toycond"]["inputs"] == [["NOISE", "FP32", [-1, 2]], ["CLASS_LABEL", "INT64", [-1]]]
    assert triton_run["server_metadata"]["name"] == "flowserve"
    assert triton_run["live"] and triton_run["ready"]
    assert triton_run["model_ready"] and triton_run["model_ready_log_prob"]
    assert not triton_run["model_ready_unknown"]


def test_samples_equal_flowserve_v1(
    triton_run: dict, channel: grpc.Channel, inputs: dict[str, np.ndarray]
) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    expected = stub.Sample(
        pb.SampleRequest(
            model="toy2d",
            initial_noise=_tensor(inputs["noise"]),
            num_steps=5,
            solver=pb.MIDPOINT,
            seed=7,
        ),
        timeout=TIMEOUT,
    )
    assert triton_run["samples_dtype"] == "float32"
    assert triton_run["samples_raw"] == 1  # answered with raw_output_contents, as Triton does
    assert triton_run["samples_version"] == str(expected.version) == "2"
    np.testing.assert_allclose(triton_run["samples"], _samples(expected), rtol=1e-6, atol=1e-6)
    guided = stub.Sample(
        pb.SampleRequest(
            model="toycond",
            version=1,
            initial_noise=_tensor(inputs["noise"]),
            class_labels=inputs["labels"].tolist(),
            num_steps=4,
            solver=pb.EULER,
            guidance_scale=2.5,
        ),
        timeout=TIMEOUT,
    )
    np.testing.assert_allclose(triton_run["guided"], _samples(guided), rtol=1e-6, atol=1e-6)
    assert not np.allclose(triton_run["guided"], triton_run["samples"])


def test_log_prob_equals_flowserve_v1(
    triton_run: dict, channel: grpc.Channel, inputs: dict[str, np.ndarray]
) -> None:
    expected = pb_grpc.GeneratorStub(channel).LogLikelihood(
        pb.LogLikelihoodRequest(
            model="toy2d", data=_tensor(inputs["data"]), num_steps=6, estimator=pb.EXACT
        ),
        timeout=TIMEOUT,
    )
    assert triton_run["log_prob_dtype"] == "float64"
    np.testing.assert_allclose(triton_run["log_prob"], expected.log_prob, rtol=1e-6, atol=1e-6)
    # The same request with typed contents instead of raw bytes.
    np.testing.assert_allclose(triton_run["typed_log_prob"], expected.log_prob, rtol=1e-6)


def test_errors_are_grpc_statuses_naming_the_problem(triton_run: dict) -> None:
    errors = triton_run["errors"]
    assert errors["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert errors["unknown_version"]["status"] == "StatusCode.NOT_FOUND"
    assert errors["bad_datatype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "NOISE" in errors["bad_datatype"]["message"]
    assert "FP32" in errors["bad_datatype"]["message"]
    assert errors["bad_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "NOISE" in errors["bad_shape"]["message"]
    assert errors["bad_solver"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "euler_maruyama" in errors["bad_solver"]["message"]
    assert errors["unknown_parameter"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "temperature" in errors["unknown_parameter"]["message"]
    assert errors["missing_input"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "DATA" in errors["missing_input"]["message"]


def test_requests_count_in_the_same_metrics(triton_run: dict) -> None:
    # The scenario's ModelInfer calls on toy2d: a sample and two log_prob (raw and typed
    # contents) succeed; five bad requests (datatype, shape, solver, parameter, input) fail.
    assert triton_run["metric_delta"] == {"OK": 3, "INVALID_ARGUMENT": 5}


def test_health_and_reflection_know_the_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", OIP_SERVICE, "flowserve.v1.Generator", "liveness"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert OIP_SERVICE in services
