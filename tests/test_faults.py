"""Faults through the real server: a failing network call, damaged model files, a killed client,
SIGTERM under load, and a server killed in the middle of a push.

What is proven, and against what truth:

1. A network call that raises fails exactly the requests with rows in that call (INTERNAL, a
   message without internals); a request on another model in the same engine iteration and a
   later request on the same model succeed with `flows.solvers.sample`'s samples. The server is
   built in this process by `server.app.create_server`; the fault is injected by replacing the
   served entry's backend with a wrapper through the serving pointer (`LiveStore.replace`, the
   same seam a promotion uses), so no production code knows about it. The failing call's batch
   size proves which requests were in it.
2. Model files deleted or corrupted under a running server: requests keep being answered from
   memory with unchanged samples; switching to (or pinning) a damaged version is refused with
   FAILED_PRECONDITION naming the problem, the serving version and the pin file stay as they
   were, and directory-mode polling refuses a damaged dropped-in version.
3. A client process killed with SIGKILL in the middle of a SampleStream frees its rows: the
   server's own `flowserve_queue_rows` returns to 0 and no sample is counted as produced.
4. SIGTERM while many requests are admitted (some integrating, some still queued, on both
   Generator.Sample and OIP ModelInfer): every one completes OK with the reference's samples,
   new work is refused with UNAVAILABLE, and the process exits 0.
5. A server killed with SIGKILL during a push, both mid-upload and after the upload while the
   version is being checked: after a restart on the same store the previous version serves
   (its samples equal the reference of its files), no new version directory exists, and
   STORE/.staging is empty. The instant between the atomic rename and the pin cannot be reached
   from outside without a test hook in production code, so it is not tested.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import Tensor

from flows.nets import NetSpec
from flows.solvers import sample
from flowserve.modeldir import ModelConfig, build_net, load_model_dir, write_model_dir
from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2 as oip
from protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from server.app import FlowServer, create_server
from server.config import load_config
from server.engine import Backend
from server.push_client import admin_metadata, push_chunks
from server.store import SERVING_FILE
from tests.conftest import REPO_ROOT, ServerProcess, poll_until

Code = grpc.StatusCode
TIMEOUT = 60.0  # gRPC deadline of every call
WAIT = 30.0  # bound on every poll
TOKEN = "faults-admin-token-0123456789"
# Same arithmetic, different batch composition: float32 rounding only.
TOLERANCE = 1e-4


# Every wait is bounded; the shared helper names what it waited for when it gives up.
poll = partial(poll_until, timeout=WAIT)


def seeded_noise(rows: int, dim: int, seed: int) -> Tensor:
    """The engine's initial noise for a seed (the contract in server.engine.api.SampleJob)."""
    return torch.randn((rows, dim), generator=torch.Generator("cpu").manual_seed(seed))


def reference(
    directory: Path, noise: Tensor, steps: int, solver: str, labels: Tensor | None = None
) -> Tensor:
    """flows' own sampler on a model directory as stored: the truth samples must equal."""
    model = load_model_dir(directory)
    with torch.no_grad():
        return sample(model.velocity_fn(labels), noise, steps, solver=solver)


def samples_of(response: pb.SampleResponse) -> Tensor:
    shape = tuple(response.samples.shape)
    return torch.frombuffer(bytearray(response.samples.data), dtype=torch.float32).reshape(shape)


def in_process_server(
    store: Path, admin_token: str | None = None, **store_keys: object
) -> FlowServer:
    """The real server (create_server) in this process on a free loopback port, warmed up."""
    config = load_config(
        None,
        {
            "grpc": {"host": "127.0.0.1", "port": 0},
            "metrics": {"enabled": False},
            "store": {"path": str(store), **store_keys},
        },
        admin_token=admin_token,
    )
    server, _ = create_server(config)
    server.start()
    server.ready()
    return server


# ---------------------------------------------------------------- 1. a failing network call


class FaultInjector:
    """Wraps a backend: counts calls, can hold them at a gate, and fails one chosen call.

    Attributes:
        calls: Calls made so far.
        entered: Set when a call starts.
        gate: Calls wait until it is set (bounded); set by default.
        fail_call: The number (1-based) of the call that raises instead of evaluating.
        failed_rows: The (padded) batch size of the call that raised.
    """

    supports_autograd = True

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_call: int | None = None
        self.failed_rows: int | None = None
        self._lock = threading.Lock()

    def __call__(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        with self._lock:
            self.calls += 1
            number = self.calls
        self.entered.set()
        if not self.gate.wait(WAIT):
            raise RuntimeError("the test never opened the gate")
        if number == self.fail_call:
            self.failed_rows = int(x.shape[0])
            raise RuntimeError(f"injected fault in network call {number}")
        return self.inner(x, t, class_labels)


def test_a_network_call_that_raises_fails_only_its_requests(
    tiny_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = in_process_server(tiny_store)
    try:
        entry = server.store.get("toy2d")
        faults = FaultInjector(entry.model.backend)
        # The serving pointer swap a promotion uses: requests from now on run on the wrapper.
        model = dataclasses.replace(entry.model, backend=faults)
        server.store.replace(dataclasses.replace(entry, model=model))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GeneratorStub(channel)  # type: ignore[no-untyped-call]

            def toy2d(rows: int, seed: int) -> pb.SampleRequest:
                return pb.SampleRequest(
                    model="toy2d", num_samples=rows, num_steps=20, solver=pb.HEUN, seed=seed
                )

            labels = [0, 1, 2, 0]
            other_model = pb.SampleRequest(
                model="toycond",
                num_samples=4,
                num_steps=20,
                solver=pb.EULER,
                seed=3,
                class_labels=labels,
            )
            # Hold the first call of A1 so that A2 and B queue behind it; the call after it
            # then carries the rows of A1 and A2 together, and raises.
            faults.gate.clear()
            first = stub.Sample.future(toy2d(3, seed=1), timeout=TIMEOUT)
            assert faults.entered.wait(WAIT)
            second = stub.Sample.future(toy2d(5, seed=2), timeout=TIMEOUT)
            other = stub.Sample.future(other_model, timeout=TIMEOUT)
            poll(lambda: server.engine.stats().queued_rows == 5 + 4, "A2 and B to queue")
            faults.fail_call = faults.calls + 1
            with caplog.at_level(logging.WARNING):
                faults.gate.set()
                errors = []
                for future in (first, second):
                    with pytest.raises(grpc.RpcError) as error:
                        future.result(timeout=TIMEOUT)
                    errors.append(error.value)
                response = other.result(timeout=TIMEOUT)
            # 3 + 5 rows: the failing call held both requests (padded to the 8-row bucket).
            assert faults.failed_rows == 8
            for error in errors:
                assert error.code() == Code.INTERNAL
                assert "the model failed while computing this request" in error.details()
                assert "injected" not in error.details()  # internals go to the log only
            assert "injected fault in network call" in caplog.text
            # B ran on another model's lane, in its own call of the same iterations.
            expected = reference(
                tiny_store / "toycond" / "1",
                seeded_noise(4, 2, 3),
                20,
                "euler",
                torch.tensor(labels),
            )
            torch.testing.assert_close(samples_of(response), expected, atol=TOLERANCE, rtol=0)
            # The server keeps serving, on the same (wrapped) backend.
            calls = faults.calls
            after = stub.Sample(toy2d(6, seed=4), timeout=TIMEOUT)
            assert faults.calls > calls
            version = tiny_store / "toy2d" / str(after.version)
            expected = reference(version, seeded_noise(6, 2, 4), 20, "heun")
            torch.testing.assert_close(samples_of(after), expected, atol=TOLERANCE, rtol=0)
        poll(lambda: server.engine.stats().queued_rows == 0, "the engine to be idle")
        stats = server.engine.stats()
        assert (stats.running_rows, stats.pending_network_evaluations) == (0, 0)
        registry = server.metrics.registry
        counts = {
            code: registry.get_sample_value(
                "flowserve_requests_total", {"method": "Sample", "model": "toy2d", "code": code}
            )
            for code in ("OK", "INTERNAL")
        }
        assert counts == {"OK": 1.0, "INTERNAL": 2.0}
    finally:
        server.drain_and_stop(5.0)


# ------------------------------------------------------------- 2. damaged files while serving


def corrupt_in_place(path: Path) -> None:
    """Flip bytes in the middle of a file, writing into the same inode (no new file)."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(size // 2)
        chunk = handle.read(8)
        handle.seek(size // 2)
        handle.write(bytes(b ^ 0xFF for b in chunk))


def test_damaged_files_do_not_change_what_serves_and_are_not_loaded(
    tiny_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = shutil.copytree(tiny_store, tmp_path / "store")
    server = in_process_server(store, admin_token=TOKEN, poll_seconds=0.2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GeneratorStub(channel)  # type: ignore[no-untyped-call]
            admin = pb_grpc.ModelAdminStub(channel)  # type: ignore[no-untyped-call]
            request = pb.SampleRequest(
                model="toy2d", num_samples=8, num_steps=10, solver=pb.HEUN, seed=5
            )
            before = stub.Sample(request, timeout=TIMEOUT)
            assert before.version == 2  # 3 is corrupt in the tiny store: 2 is the highest
            expected = reference(tiny_store / "toy2d" / "2", seeded_noise(8, 2, 5), 10, "heun")
            torch.testing.assert_close(samples_of(before), expected, atol=TOLERANCE, rtol=0)

            # The serving version's weights corrupted in place; version 1 loses its weights.
            corrupt_in_place(store / "toy2d" / "2" / "model.safetensors")
            (store / "toy2d" / "1" / "model.safetensors").unlink()

            # Requests are answered from memory, exactly as before.
            during = stub.Sample(request, timeout=TIMEOUT)
            assert during.version == 2
            assert during.samples.data == before.samples.data

            def serving_version() -> int:
                info = stub.GetModel(pb.GetModelRequest(model="toy2d"), timeout=TIMEOUT)
                return int(info.serving_version)

            def set_serving(version: int) -> grpc.RpcError:
                with pytest.raises(grpc.RpcError) as error:
                    admin.SetServingVersion(
                        pb.SetServingVersionRequest(model="toy2d", version=version),
                        metadata=admin_metadata(TOKEN),
                        timeout=TIMEOUT,
                    )
                return error.value

            # Switching to the damaged, not loaded version 1 is refused.
            refused = set_serving(1)
            assert refused.code() == Code.FAILED_PRECONDITION
            assert "version 1 does not load" in refused.details()
            assert "missing model.safetensors" in refused.details()
            # Pinning the serving version 2, whose files no longer verify, is refused too: a
            # restart would load the pinned version from those files and fail.
            refused = set_serving(2)
            assert refused.code() == Code.FAILED_PRECONDITION
            assert "version 2 serves from memory but its files no longer load" in refused.details()
            assert "sha256 mismatch" in refused.details()
            assert serving_version() == 2
            assert not (store / "toy2d" / SERVING_FILE).exists()

            # Directory mode: a damaged version dropped in (renamed into place whole, as ops
            # are told to) is checked and refused.
            prepared = shutil.copytree(tiny_store / "toy2d" / "2", tmp_path / "prepared")
            corrupt_in_place(prepared / "model.safetensors")
            dropped = store / "toy2d" / "4"
            with caplog.at_level(logging.WARNING, logger="server.lifecycle"):
                prepared.rename(dropped)

                def refusals() -> list[str]:
                    return [
                        r.getMessage()
                        for r in caplog.records
                        if r.getMessage().startswith(f"not serving dropped-in {dropped}")
                    ]

                poll(lambda: bool(refusals()), "the poller to refuse the damaged version")
            assert all("sha256 mismatch" in message for message in refusals()), refusals()
            assert serving_version() == 2
            after = stub.Sample(request, timeout=TIMEOUT)
            assert (after.version, after.samples.data) == (2, before.samples.data)
    finally:
        server.drain_and_stop(5.0)


# ------------------------------------------- 3 and 4: a killed client, SIGTERM under load

IN_FLIGHT_ROWS, QUEUED_ROWS = 1024, 2048

# The client of test 3: a stream of 1,024 rows x 1,000 RK4 steps (seconds of engine time, long
# enough to kill the client while it runs); says "admitted" at its first progress event.
CLIENT_SCRIPT = """
import sys, time
import grpc
from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc

channel = grpc.insecure_channel(sys.argv[1])
stub = pb_grpc.GeneratorStub(channel)
request = pb.SampleRequest(model="toy2d", num_samples=1024, num_steps=1000, solver=pb.RK4)
stream = stub.SampleStream(request, timeout=120)  # referenced: dropping it would cancel it
for event in stream:
    if event.HasField("progress"):
        print("admitted", flush=True)
        break
time.sleep(120)  # holds the stream open until it is killed
"""


@pytest.fixture(scope="module")
def busy_server(
    tiny_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("faults_busy")
    config = directory / "flowserve.toml"
    config.write_text(
        "torch_threads = 1\n"
        f"[engine]\nmax_rows_in_flight = {IN_FLIGHT_ROWS}\nmax_rows_queued = {QUEUED_ROWS}\n"
        f"[limits]\nmax_num_samples = {IN_FLIGHT_ROWS}\n"
    )
    process = ServerProcess(
        ["--store", str(tiny_store), "--port", "0", "--metrics-port", "0", "--config", str(config)],
        directory / "server.log",
    )
    process.wait_for_line("flowserve ready")
    yield process
    process.stop()  # test 4 has already stopped it with SIGTERM


def test_a_killed_client_process_frees_its_rows(busy_server: ServerProcess) -> None:
    samples_before = busy_server.metric("flowserve_samples_total", model="toy2d")
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, busy_server.target],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(client.stdout or ()), daemon=True)
        reader.start()
        poll(lambda: "admitted\n" in lines, "the client's stream to be admitted", timeout=TIMEOUT)
        # Its rows are in the engine (a first progress event means admitted, not queued).
        poll(lambda: busy_server.metric("flowserve_queue_rows") == 1024, "the rows to show")
        client.send_signal(signal.SIGKILL)
        assert client.wait(timeout=WAIT) == -signal.SIGKILL
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=WAIT)
    # The kernel closes the dead client's connection; the server cancels the job.
    poll(lambda: busy_server.metric("flowserve_queue_rows") == 0, "the rows to be freed")
    assert busy_server.metric("flowserve_pending_network_evaluations") == 0
    # Freed, not finished: no sample was produced for it.
    assert busy_server.metric("flowserve_samples_total", model="toy2d") == samples_before
    poll(
        lambda: (
            busy_server.metric(
                "flowserve_requests_total", method="SampleStream", model="toy2d", code="CANCELLED"
            )
            == 1
        ),
        "the stream to be counted as cancelled",
    )


def _model_infer(noise: np.ndarray, steps: int, solver: str) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(
        model_name="toy2d",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="NOISE", datatype="FP32", shape=list(noise.shape)
            )
        ],
        raw_input_contents=[noise.astype("<f4").tobytes()],
    )
    request.parameters["num_steps"].int64_param = steps
    request.parameters["solver"].string_param = solver
    return request


def test_sigterm_under_load_completes_every_admitted_request(
    busy_server: ServerProcess, tiny_store: Path
) -> None:
    # 8 Sample + 4 ModelInfer requests of 128 rows: 1,536 rows, of which at most 1,024 are
    # integrated at once, so at SIGTERM at least 512 rows are still queued.
    rows, steps, count_sample, count_oip = 128, 500, 8, 4
    oip_noise = [seeded_noise(rows, 2, 100 + i) for i in range(count_oip)]
    with grpc.insecure_channel(busy_server.target) as channel:
        stub = pb_grpc.GeneratorStub(channel)  # type: ignore[no-untyped-call]
        inference = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        sample_futures = [
            stub.Sample.future(
                pb.SampleRequest(
                    model="toy2d", num_samples=rows, num_steps=steps, solver=pb.MIDPOINT, seed=s
                ),
                timeout=TIMEOUT,
            )
            for s in range(count_sample)
        ]
        oip_futures = [
            inference.ModelInfer.future(
                _model_infer(noise.numpy(), steps, "midpoint"), timeout=TIMEOUT
            )
            for noise in oip_noise
        ]
        total_rows = rows * (count_sample + count_oip)
        poll(
            lambda: busy_server.metric("flowserve_queue_rows") == total_rows,
            "every request to be admitted",
        )
        assert total_rows - IN_FLIGHT_ROWS >= 512  # some were queued, not yet integrating
        busy_server.terminate()
        health = health_pb2_grpc.HealthStub(channel)
        poll(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
            "health to report NOT_SERVING while draining",
        )
        with pytest.raises(grpc.RpcError) as error:
            stub.Sample(pb.SampleRequest(model="toy2d", num_samples=1), timeout=TIMEOUT)
        assert error.value.code() == Code.UNAVAILABLE
        futures = [*sample_futures, *oip_futures]
        assert not all(f.done() for f in futures), "the requests finished before the drain"
        sample_responses = [f.result(timeout=TIMEOUT) for f in sample_futures]
        oip_responses = [f.result(timeout=TIMEOUT) for f in oip_futures]
    assert busy_server.process.wait(timeout=TIMEOUT) == 0
    assert "draining" in busy_server.log()
    # Every admitted request's samples are flows' own (one batch: rows are independent).
    (version,) = {r.version for r in sample_responses} | {
        int(r.model_version) for r in oip_responses
    }
    noise = torch.cat([*(seeded_noise(rows, 2, s) for s in range(count_sample)), *oip_noise])
    got = torch.cat(
        [
            *(samples_of(r) for r in sample_responses),
            *(
                torch.from_numpy(
                    np.frombuffer(r.raw_output_contents[0], dtype="<f4").reshape(rows, 2).copy()
                )
                for r in oip_responses
            ),
        ]
    )
    expected = reference(tiny_store / "toy2d" / str(version), noise, steps, "midpoint")
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


# ------------------------------------------------------------- 5. SIGKILL during a push

PUSH_SPEC = NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2})


def write_version(directory: Path, seed: int) -> Path:
    """A valid version of model "pushy" with weights drawn from `seed`."""
    config = ModelConfig(
        name="pushy",
        architecture=PUSH_SPEC,
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=0,
        default_solver="euler",
        default_num_steps=4,
    )
    torch.manual_seed(seed)
    write_model_dir(directory, config, build_net(PUSH_SPEC).state_dict())
    return directory


def start_push_server(store: Path, directory: Path) -> ServerProcess:
    token_file = directory / "admin-token"
    token_file.write_text(TOKEN + "\n")
    config = directory / "flowserve.toml"
    # A smoke test of 2^20 samples x 10,000 Euler steps: a push spends minutes in its checks,
    # so a kill after its upload certainly lands before the version could be renamed into
    # place.
    config.write_text("torch_threads = 1\n[push]\nsmoke_samples = 1048576\nsmoke_steps = 10000\n")
    process = ServerProcess(
        ["--store", str(store), "--port", "0", "--metrics-port", "0", "--config", str(config),
         "--admin-token-file", str(token_file)],
        directory / f"server-{time.monotonic_ns()}.log",
    )  # fmt: skip
    process.wait_for_line("flowserve ready")
    return process


class HeldPush:
    """A PushModel call in a thread whose stream stops after `send` messages until released.

    With `send` None the whole stream is sent and closed.
    """

    def __init__(self, target: str, source: Path, send: int | None) -> None:
        self.sent_all = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()
        self.error: grpc.RpcError | None = None
        self._chunks = list(push_chunks(source, chunk_bytes=256))
        self._send = send
        self._target = target
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _stream(self) -> Iterator[pb.PushModelChunk]:
        for index, chunk in enumerate(self._chunks):
            if index == self._send:
                self.held.set()
                self.release.wait(WAIT)
                return
            yield chunk
        self.sent_all.set()

    def _run(self) -> None:
        with grpc.insecure_channel(self._target) as channel:
            admin = pb_grpc.ModelAdminStub(channel)  # type: ignore[no-untyped-call]
            try:
                admin.PushModel(self._stream(), metadata=admin_metadata(TOKEN), timeout=TIMEOUT)
            except grpc.RpcError as error:
                self.error = error

    def join(self) -> None:
        self.release.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


def staged_files(store: Path) -> dict[str, int]:
    """Files under STORE/.staging with their sizes."""
    staging = store / ".staging"
    if not staging.is_dir():
        return {}
    return {
        str(p.relative_to(staging)): p.stat().st_size for p in staging.rglob("*") if p.is_file()
    }


def assert_previous_version_serves(server: ServerProcess, store: Path) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GeneratorStub(channel)  # type: ignore[no-untyped-call]
        info = stub.GetModel(pb.GetModelRequest(model="pushy"), timeout=TIMEOUT)
        assert (info.serving_version, list(info.versions)) == (1, [1])
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
        assert [(m.name, m.version) for m in listed.models] == [("pushy", 1)]
        response = stub.Sample(
            pb.SampleRequest(model="pushy", num_samples=16, num_steps=8, solver=pb.EULER, seed=9),
            timeout=TIMEOUT,
        )
    assert response.version == 1
    expected = reference(store / "pushy" / "1", seeded_noise(16, 2, 9), 8, "euler")
    torch.testing.assert_close(samples_of(response), expected, atol=TOLERANCE, rtol=0)
    assert sorted(p.name for p in (store / "pushy").iterdir()) == ["1"]
    staging = store / ".staging"
    assert not (staging.exists() and any(staging.iterdir())), list(staging.iterdir())


def test_a_server_killed_during_a_push_restarts_on_the_previous_version(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    write_version(store / "pushy" / "1", seed=1)
    source = write_version(tmp_path / "candidate", seed=2)
    server = start_push_server(store, tmp_path)
    try:
        # Mid-upload: the header, config.json and part of the weights, then the stream stalls.
        chunks = list(push_chunks(source, chunk_bytes=256))
        config_chunks = sum(1 for c in chunks if c.file.filename == "config.json")
        push = HeldPush(server.target, source, send=1 + config_chunks + 2)
        assert push.held.wait(WAIT)
        poll(
            lambda: (
                any(name.endswith("config.json") for name in staged_files(store))
                and any(name.endswith("model.safetensors") for name in staged_files(store))
            ),
            "the staged files to exist",
        )
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=WAIT) == -signal.SIGKILL
        push.join()
        assert push.error is not None and push.error.code() == Code.UNAVAILABLE
        assert staged_files(store)  # the killed server left its staging behind
    finally:
        server.stop()

    server = start_push_server(store, tmp_path)
    try:
        assert_previous_version_serves(server, store)
        # After the upload, while the version is checked: every byte is staged and the stream
        # is closed, so only the checks (minutes, see start_push_server) stand between the push
        # and its rename into place.
        push = HeldPush(server.target, source, send=None)
        assert push.sent_all.wait(WAIT)
        sizes = {p.name: p.stat().st_size for p in source.iterdir()}
        poll(
            lambda: (
                sorted((Path(name).name, size) for name, size in staged_files(store).items())
                == sorted(sizes.items())
            ),
            "the upload to be complete in staging",
        )
        assert not (store / "pushy" / "2").exists()
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=WAIT) == -signal.SIGKILL
        push.join()
        assert push.error is not None and push.error.code() == Code.UNAVAILABLE
        assert staged_files(store)
    finally:
        server.stop()

    server = start_push_server(store, tmp_path)
    try:
        assert_previous_version_serves(server, store)
    finally:
        assert server.stop() == 0, server.log()
