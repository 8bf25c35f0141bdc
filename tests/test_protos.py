"""The committed generated modules are fresh, importable as `protos.*`, and match DESIGN.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from protos import build
from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc
from protos.inference import grpc_predict_v2_pb2 as oip
from protos.inference import grpc_predict_v2_pb2_grpc

T = FieldDescriptor  # field type constants


def test_committed_modules_match_a_fresh_protoc_run(tmp_path: Path) -> None:
    written = build.generate(tmp_path)
    expected = {rel for proto in build.PROTO_FILES for rel in build.generated_files(proto)}
    assert {str(path) for path in written} == expected
    stale = [
        str(rel)
        for rel in written
        if (build.PROTO_ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, f"stale generated modules {stale}: run `python -m protos.build`"


def test_generated_imports_resolve_through_the_protos_package() -> None:
    # A bare `from flowserve.v1 import ...` would pick up the top-level flowserve package.
    for module in (flowserve_pb2_grpc, grpc_predict_v2_pb2_grpc):
        source = Path(module.__file__ or "").read_text()
        assert "\nfrom protos." in source
        assert "\nfrom flowserve" not in source and "\nfrom inference" not in source
    assert pb.SampleRequest.__module__ == "protos.flowserve.v1.flowserve_pb2"


def _fields(message: type) -> dict[str, tuple[int, str | None]]:
    descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
    return {
        f.name: (f.type, f.message_type.full_name if f.message_type else None)
        for f in descriptor.fields
    }


def test_services_and_methods_are_the_designed_ones() -> None:
    services = pb.DESCRIPTOR.services_by_name
    assert set(services) == {"Generator", "ModelAdmin"}
    assert pb.DESCRIPTOR.package == "flowserve.v1"
    generator = {m.name: m for m in services["Generator"].methods}
    assert set(generator) == {"Sample", "SampleStream", "LogLikelihood", "ListModels", "GetModel"}
    assert generator["SampleStream"].server_streaming
    assert not generator["Sample"].server_streaming
    assert generator["GetModel"].output_type.name == "ModelInfo"
    admin = {m.name: m for m in services["ModelAdmin"].methods}
    assert set(admin) == {"PushModel", "SetServingVersion"}
    assert admin["PushModel"].client_streaming
    assert admin["SetServingVersion"].output_type.name == "ModelInfo"


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (pb.Tensor, {"shape": T.TYPE_INT64, "data": T.TYPE_BYTES}),
        (
            pb.SampleRequest,
            {
                "model": T.TYPE_STRING,
                "version": T.TYPE_INT64,
                "num_samples": T.TYPE_UINT32,
                "num_steps": T.TYPE_UINT32,
                "solver": T.TYPE_ENUM,
                "seed": T.TYPE_UINT64,
                "class_labels": T.TYPE_INT64,
                "guidance_scale": T.TYPE_FLOAT,
                "initial_noise": T.TYPE_MESSAGE,
                "trajectory_every": T.TYPE_UINT32,
            },
        ),
        (
            pb.SampleResponse,
            {
                "samples": T.TYPE_MESSAGE,
                "model": T.TYPE_STRING,
                "version": T.TYPE_INT64,
                "num_steps": T.TYPE_UINT32,
                "network_evaluations": T.TYPE_UINT64,
                "seed": T.TYPE_UINT64,
                "queue_seconds": T.TYPE_DOUBLE,
                "compute_seconds": T.TYPE_DOUBLE,
                "trajectory": T.TYPE_MESSAGE,
            },
        ),
        (
            pb.LogLikelihoodRequest,
            {
                "model": T.TYPE_STRING,
                "version": T.TYPE_INT64,
                "data": T.TYPE_MESSAGE,
                "num_steps": T.TYPE_UINT32,
                "solver": T.TYPE_ENUM,
                "estimator": T.TYPE_ENUM,
                "num_probes": T.TYPE_UINT32,
                "seed": T.TYPE_UINT64,
                "class_labels": T.TYPE_INT64,
            },
        ),
        (
            pb.LogLikelihoodResponse,
            {
                "log_prob": T.TYPE_DOUBLE,
                "std_error": T.TYPE_DOUBLE,
                "bits_per_dim": T.TYPE_DOUBLE,
                "model": T.TYPE_STRING,
                "version": T.TYPE_INT64,
                "network_evaluations": T.TYPE_UINT64,
            },
        ),
    ],
)
def test_designed_fields_have_designed_types(message: type, fields: dict[str, int]) -> None:
    actual = _fields(message)
    for name, field_type in fields.items():
        assert name in actual, f"{message.__name__} lacks {name}"
        assert actual[name][0] == field_type, f"{message.__name__}.{name}"
    # `optional` seeds: presence is tracked, so "no seed" differs from seed 0.
    if "seed" in fields and message in (pb.SampleRequest, pb.LogLikelihoodRequest):
        assert message.DESCRIPTOR.fields_by_name["seed"].has_presence  # type: ignore[attr-defined]


def test_enums_are_the_designed_ones() -> None:
    assert [v.name for v in pb.Solver.DESCRIPTOR.values] == [
        "SOLVER_UNSPECIFIED",
        "EULER",
        "MIDPOINT",
        "HEUN",
        "RK4",
        "EULER_MARUYAMA",
    ]
    assert [v.name for v in pb.Estimator.DESCRIPTOR.values] == [
        "ESTIMATOR_UNSPECIFIED",
        "EXACT",
        "HUTCHINSON",
    ]


def test_sample_event_is_a_oneof_of_progress_snapshot_and_response() -> None:
    oneof = pb.SampleEvent.DESCRIPTOR.oneofs_by_name["event"]
    assert {f.name: f.message_type.name for f in oneof.fields} == {
        "progress": "SampleProgress",
        "snapshot": "TrajectorySnapshot",
        "response": "SampleResponse",
    }


def test_model_info_carries_what_get_model_must_answer() -> None:
    fields = set(_fields(pb.ModelInfo))
    assert {
        "sample_shape",
        "num_classes",
        "parameterization",
        "path",
        "versions",
        "serving_version",
        "default_solver",
        "default_num_steps",
        "backend",
        "available_backends",
    } <= fields


def test_open_inference_protocol_is_kserve_v2() -> None:
    assert oip.DESCRIPTOR.package == "inference"
    service = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert [m.name for m in service.methods] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    ]
    # Field numbers are the wire contract with KServe and Triton clients.
    numbers = {f.name: f.number for f in oip.ModelInferRequest.DESCRIPTOR.fields}
    assert numbers == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    tensor = {f.name: f.number for f in oip.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields}
    assert tensor == {"name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5}
    parameter = {f.name: f.number for f in oip.InferParameter.DESCRIPTOR.fields}
    assert parameter == {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    }
    contents = [f.name for f in oip.InferTensorContents.DESCRIPTOR.fields]
    assert contents == [
        "bool_contents",
        "int_contents",
        "int64_contents",
        "uint_contents",
        "uint64_contents",
        "fp32_contents",
        "fp64_contents",
        "bytes_contents",
    ]


def test_a_request_survives_the_wire() -> None:
    request = pb.SampleRequest(model="m", num_samples=3, solver=pb.HEUN, class_labels=[1, 2])
    request.seed = 0
    decoded = pb.SampleRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.HasField("seed") and decoded.seed == 0
