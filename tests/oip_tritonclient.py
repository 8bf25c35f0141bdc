"""Triton's own client (tritonclient.grpc) against a flowserve server: one scenario, as JSON.

Run in a subprocess by tests/test_oip.py: tritonclient's generated `inference.*` protos clash
with ours (protos.inference) in one process. Usage:
`python tests/oip_tritonclient.py TARGET INPUTS.npz` prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

TIMEOUT = 30.0


def _metadata(client: triton.InferenceServerClient, name: str) -> dict[str, Any]:
    meta = client.get_model_metadata(name, as_json=True, client_timeout=TIMEOUT)
    return {
        "name": meta["name"],
        "versions": meta.get("versions", []),
        "platform": meta.get("platform", ""),
        "inputs": [
            (t["name"], t["datatype"], [int(n) for n in t["shape"]]) for t in meta["inputs"]
        ],
        "outputs": [
            (t["name"], t["datatype"], [int(n) for n in t["shape"]]) for t in meta["outputs"]
        ],
    }


def _input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _error(call: Any) -> dict[str, str]:
    try:
        call()
    except InferenceServerException as error:
        return {"status": str(error.status()), "message": str(error.message())}
    return {"status": "OK", "message": ""}


def main(target: str, inputs_path: str) -> dict[str, Any]:
    inputs = np.load(inputs_path)
    noise, data, labels = inputs["noise"], inputs["data"], inputs["labels"]
    client = triton.InferenceServerClient(target)
    out: dict[str, Any] = {
        "live": client.is_server_live(client_timeout=TIMEOUT),
        "ready": client.is_server_ready(client_timeout=TIMEOUT),
        "model_ready": client.is_model_ready("toy2d", client_timeout=TIMEOUT),
        "model_ready_log_prob": client.is_model_ready("toy2d.log_prob", client_timeout=TIMEOUT),
        "model_ready_unknown": client.is_model_ready("nope", client_timeout=TIMEOUT),
        "server_metadata": client.get_server_metadata(as_json=True, client_timeout=TIMEOUT),
        "metadata": {
            name: _metadata(client, name) for name in ("toy2d", "toy2d.log_prob", "toycond")
        },
    }
    params = {"num_steps": 5, "solver": "midpoint", "seed": 7}
    result = client.infer(
        "toy2d",
        [_input("NOISE", noise, "FP32")],
        outputs=[triton.InferRequestedOutput("SAMPLES")],
        parameters=params,
        client_timeout=TIMEOUT,
    )
    response = result.get_response()
    out["samples"] = result.as_numpy("SAMPLES").tolist()
    out["samples_dtype"] = str(result.as_numpy("SAMPLES").dtype)
    out["samples_version"] = response.model_version
    out["samples_raw"] = len(response.raw_output_contents)
    guided = client.infer(
        "toycond",
        [_input("NOISE", noise, "FP32"), _input("CLASS_LABEL", labels, "INT64")],
        parameters={"num_steps": 4, "solver": "euler", "guidance_scale": "2.5"},
        model_version="1",
        client_timeout=TIMEOUT,
    )
    out["guided"] = guided.as_numpy("SAMPLES").tolist()
    log_prob = client.infer(
        "toy2d.log_prob",
        [_input("DATA", data, "FP32")],
        parameters={"num_steps": 6, "estimator": "exact"},
        client_timeout=TIMEOUT,
    )
    out["log_prob"] = log_prob.as_numpy("LOG_PROB").tolist()
    out["log_prob_dtype"] = str(log_prob.as_numpy("LOG_PROB").dtype)
    # Typed contents instead of raw bytes, through tritonclient's own generated stub.
    channel = client._channel  # the client's channel to the same server
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    typed = service_pb2.ModelInferRequest(model_name="toy2d.log_prob")
    typed.parameters["num_steps"].int64_param = 6
    typed.parameters["estimator"].string_param = "exact"
    tensor = typed.inputs.add(name="DATA", datatype="FP32", shape=list(data.shape))
    tensor.contents.fp32_contents.extend(data.reshape(-1).tolist())
    typed_response = stub.ModelInfer(typed, timeout=TIMEOUT)
    out["typed_log_prob"] = np.frombuffer(
        typed_response.raw_output_contents[0], dtype="<f8"
    ).tolist()
    bad_dtype = triton.InferInput("NOISE", list(noise.shape), "FP64")
    bad_dtype.set_data_from_numpy(noise.astype(np.float64))
    out["errors"] = {
        "unknown_model": _error(
            lambda: client.infer("nope", [_input("NOISE", noise, "FP32")], client_timeout=TIMEOUT)
        ),
        "unknown_version": _error(
            lambda: client.get_model_metadata("toy2d", "9", client_timeout=TIMEOUT)
        ),
        "bad_datatype": _error(lambda: client.infer("toy2d", [bad_dtype], client_timeout=TIMEOUT)),
        "bad_shape": _error(
            lambda: client.infer(
                "toy2d", [_input("NOISE", noise[:, :1].copy(), "FP32")], client_timeout=TIMEOUT
            )
        ),
        "bad_solver": _error(
            lambda: client.infer(
                "toy2d",
                [_input("NOISE", noise, "FP32")],
                parameters={"solver": "leapfrog"},
                client_timeout=TIMEOUT,
            )
        ),
        "unknown_parameter": _error(
            lambda: client.infer(
                "toy2d",
                [_input("NOISE", noise, "FP32")],
                parameters={"temperature": 1},
                client_timeout=TIMEOUT,
            )
        ),
        "missing_input": _error(
            lambda: client.infer(
                "toy2d.log_prob", [_input("NOISE", noise, "FP32")], client_timeout=TIMEOUT
            )
        ),
    }
    client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
