"""Real TorchServe on loopback serving the archive `flowserve export --format mar` builds.

TorchServe (Java frontend + Python worker) starts in its own session with a temporary model
store, free loopback ports and its pid file and sockets in the test's temporary directory; every
wait is bounded and the whole process group is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from export.mar import archiver_path
from export.model_export import export_model_dir
from flows.nets import NetSpec
from flows.solvers import sample
from flowserve.modeldir import ModelConfig, build_net, load_model_dir, write_model_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs java on PATH"),
    pytest.mark.skipif(
        not Path(sys.executable).with_name("torchserve").is_file(),
        reason="torchserve is not installed in this environment",
    ),
    pytest.mark.skipif(archiver_path() is None, reason="torch-model-archiver is not installed"),
]

START_TIMEOUT_SECONDS = 180.0
CONFIG = ModelConfig(
    name="toy2d",
    architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2}),
    sample_shape=(2,),
    parameterization="velocity",
    path={"kind": "linear"},
    num_classes=0,
    default_solver="heun",
    default_num_steps=4,
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("torchserve")
    torch.manual_seed(0)
    model_dir = root / "toy2d" / "1"
    write_model_dir(model_dir, CONFIG, build_net(CONFIG).state_dict())
    export_model_dir(model_dir, ["mar"])
    store, scratch = root / "store", root / "tmp"
    store.mkdir()
    scratch.mkdir()
    shutil.copyfile(model_dir / "model.mar", store / "toy2d.mar")
    inference, management, metrics, grpc_inference, grpc_management = _free_ports(5)
    properties = root / "config.properties"
    properties.write_text(
        f"inference_address=http://127.0.0.1:{inference}\n"
        f"management_address=http://127.0.0.1:{management}\n"
        f"metrics_address=http://127.0.0.1:{metrics}\n"
        f"grpc_inference_port={grpc_inference}\n"
        f"grpc_management_port={grpc_management}\n"
        "disable_token_authorization=true\n"
        "default_workers_per_model=1\n"
        "install_py_dep_per_model=false\n"
        "vmargs=-Xmx256m -XX:+UseSerialGC\n"
    )
    # TMPDIR/TEMP hold TorchServe's pid file and worker sockets: nothing shared with others.
    env = {**os.environ, "TMPDIR": str(scratch), "TEMP": str(scratch), "OMP_NUM_THREADS": "1"}
    log = (root / "torchserve.log").open("w")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("torchserve")),
            "--start",
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--model-store",
            str(store),
            "--models",
            "toy2d=toy2d.mar",
            "--ts-config",
            str(properties),
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{inference}/predictions/toy2d"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"TorchServe exited with {process.returncode}:\n{_tail(root)}")
            try:
                status, _ = _post(url, {"num_samples": 1, "seed": 0})
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # frontend not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"TorchServe not ready in {START_TIMEOUT_SECONDS} s:\n{_tail(root)}")
            time.sleep(1.0)
        yield url, model_dir
    finally:
        # The session holds the launcher, the JVM and the Python worker: stop them all.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def _tail(root: Path) -> str:
    return "\n".join((root / "torchserve.log").read_text(errors="replace").splitlines()[-40:])


def test_inference_over_http_is_seeded_and_matches_flows(torchserve: tuple[str, Path]) -> None:
    url, model_dir = torchserve
    status, first = _post(url, {"num_samples": 6, "num_steps": 5, "seed": 21})
    assert status == 200, first
    _, second = _post(url, {"num_samples": 6, "num_steps": 5, "seed": 21})
    _, other = _post(url, {"num_samples": 6, "num_steps": 5, "seed": 22})
    assert first["shape"] == [6, 2]
    assert first["samples"] == second["samples"]  # the seed fixes the samples exactly
    assert first["samples"] != other["samples"]
    model = load_model_dir(model_dir)
    x_0 = torch.randn((6, 2), generator=torch.Generator().manual_seed(21))
    expected = sample(model.velocity_fn(), x_0, 5, "heun")
    # Another process and thread count: the MLP's matmuls may sum in another order.
    torch.testing.assert_close(torch.tensor(first["samples"]), expected, atol=1e-5, rtol=0)


def test_bad_request_is_a_client_error(torchserve: tuple[str, Path]) -> None:
    url, _ = torchserve
    status, body = _post(url, {"num_samples": 2, "solver": "leapfrog"})
    assert status == 400
    assert "solver" in body
