"""The solo fast path through a real server and client: the shipped `moons` model (with its
`sampler.onnx`) served by the onnxruntime backend.

A small request must come back equal to `flows.solvers.sample` on the eager network within
export's sampler tolerance (1e-4 at O(1) samples: the ONNX loop accumulates one rounding
difference per step); a request too large for the fast path takes the batched per-step path,
whose ONNX network differs from eager by at most export's 1e-5 per evaluation, so the same
tolerance bounds it. Which path ran is read from the server's own metrics: only the per-step
path observes `flowserve_batch_rows`.
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from export.model_export import SAMPLER_TOLERANCE
from flows.solvers import sample
from flowserve.modeldir import load_model_dir
from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess

TIMEOUT = 30.0  # every call is bounded
SHIPPED_MOONS = Path(__file__).resolve().parents[1] / "model_store" / "moons"


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("solo-store")
    shutil.copytree(SHIPPED_MOONS, root / "store" / "moons")
    args = ["--store", str(root / "store"), "--port", "0", "--metrics-port", "0"]
    server = ServerProcess([*args, "--backend", "onnxruntime"], root / "server.log")
    server.wait_for_line("flowserve ready")
    yield server
    assert server.stop() == 0, server.log()


def _batch_calls(server: ServerProcess) -> float:
    """Per-step network calls the server has made (the count of its batch_rows histogram)."""
    with urllib.request.urlopen(server.metrics_url, timeout=TIMEOUT) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("flowserve_batch_rows_count"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("flowserve_batch_rows_count is missing from /metrics")


def _samples(response: pb.SampleResponse) -> torch.Tensor:
    values = np.frombuffer(response.samples.data, dtype="<f4")
    return torch.from_numpy(values.reshape(tuple(response.samples.shape)).copy())


@pytest.mark.parametrize(("rows", "uses_solo"), [(2, True), (64, False)])
def test_onnx_server_matches_the_reference_on_both_paths(
    onnx_server: ServerProcess, rows: int, uses_solo: bool
) -> None:
    steps = 20  # Heun: 2 x 20 x 2 = 80 evaluations fit the default 256; 64 rows do not.
    with grpc.insecure_channel(onnx_server.target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        calls_before = _batch_calls(onnx_server)
        response = stub.Sample(
            pb.SampleRequest(
                model="moons", num_samples=rows, num_steps=steps, solver=pb.HEUN, seed=5
            ),
            timeout=TIMEOUT,
        )
        calls = _batch_calls(onnx_server) - calls_before
    assert (calls == 0) == uses_solo, f"{calls} per-step calls for {rows} rows"
    x0 = torch.randn((rows, 2), generator=torch.Generator("cpu").manual_seed(5))
    model = load_model_dir(SHIPPED_MOONS / "1")
    with torch.no_grad():
        expected = sample(model.velocity_fn(), x0, steps, "heun")
    actual = _samples(response)
    tolerance = SAMPLER_TOLERANCE * max(1.0, float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= tolerance
    assert response.network_evaluations == rows * steps * 2
