"""Deadlines, cancellation, a full queue, health transitions and SIGTERM, on real processes.

The module's server has a small engine (1,024 rows in flight, 1,024 queued) so that a few
long requests fill it. "Rows freed" is read from the server's own /metrics: the rows of a
cancelled or expired request leave `flowserve_queue_rows` and
`flowserve_pending_network_evaluations` without the request ever being counted as done.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flows.solvers import sample
from flowserve.modeldir import load_model_dir
from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, poll_until

TIMEOUT = 60.0
WAIT = 15.0  # bound on every poll
Code = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# ~4 s of engine time on one CPU thread: long enough to act on while it runs.
LONG = pb.SampleRequest(model="toy2d", num_samples=1024, num_steps=1000, solver=pb.RK4)


# Every wait is bounded; the shared helper names what it waited for when it gives up.
poll = partial(poll_until, timeout=WAIT)


ADMIN_TOKEN = "lifecycle-admin-token-0123456789"


def _start(tiny_store: Path, directory: Path, *extra: str) -> ServerProcess:
    token_file = directory / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    config = directory / "flowserve.toml"
    config.write_text(
        "torch_threads = 1\n"
        "[engine]\nmax_rows_in_flight = 1024\nmax_rows_queued = 1024\n"
        "[limits]\nmax_num_samples = 1024\n"
    )
    return ServerProcess(
        ["--store", str(tiny_store), "--port", "0", "--metrics-port", "0", "--config", str(config),
         "--admin-token-file", str(token_file), "--port-file", str(directory / "ports.json"),
         *extra],
        directory / "server.log",
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = _start(tiny_store, tmp_path_factory.mktemp("lifecycle"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as open_channel:
        yield open_channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GeneratorStub:
    return pb_grpc.GeneratorStub(channel)


def _rows(server: ServerProcess) -> float:
    return server.metric("flowserve_queue_rows")


def _assert_rows_freed(server: ServerProcess, samples_before: float) -> None:
    poll(lambda: _rows(server) == 0, "the rows to leave the engine")
    assert server.metric("flowserve_pending_network_evaluations") == 0
    # Freed, not finished: no samples were produced.
    assert server.metric("flowserve_samples_total", model="toy2d") == samples_before


def test_health_turns_serving_once_models_are_warm(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    seen = []
    for response in watch:
        seen.append(response.status)
        if response.status == SERVING:
            watch.cancel()
            break
    # Listening starts before the warm-up, which we may or may not catch.
    assert seen in ([NOT_SERVING, SERVING], [SERVING])
    server.wait_for_line("flowserve ready")
    # The port file, written once ready, agrees with what the server printed.
    ports = json.loads((server.log_path.parent / "ports.json").read_text())
    assert server.target.endswith(f":{ports['grpc_port']}")
    assert f":{ports['metrics_port']}/metrics" in server.metrics_url


def test_deadline_reaches_the_engine(server: ServerProcess, stub: pb_grpc.GeneratorStub) -> None:
    samples_before = server.metric("flowserve_samples_total", model="toy2d")
    with pytest.raises(grpc.RpcError) as error:
        stub.Sample(LONG, timeout=0.5)
    assert error.value.code() == Code.DEADLINE_EXCEEDED
    _assert_rows_freed(server, samples_before)
    poll(
        lambda: (
            server.metric(
                "flowserve_requests_total", method="Sample", model="toy2d", code="DEADLINE_EXCEEDED"
            )
            == 1
        ),
        "the expired request to be counted",
    )


def test_cancellation_frees_the_rows(server: ServerProcess, stub: pb_grpc.GeneratorStub) -> None:
    samples_before = server.metric("flowserve_samples_total", model="toy2d")
    future = stub.Sample.future(LONG, timeout=TIMEOUT)
    poll(lambda: _rows(server) == 1024, "the request's rows to be admitted")
    future.cancel()
    _assert_rows_freed(server, samples_before)
    poll(
        lambda: (
            server.metric(
                "flowserve_requests_total", method="Sample", model="toy2d", code="CANCELLED"
            )
            == 1
        ),
        "the cancelled request to be counted",
    )


def test_cancelling_a_stream_frees_the_rows(
    server: ServerProcess, stub: pb_grpc.GeneratorStub
) -> None:
    samples_before = server.metric("flowserve_samples_total", model="toy2d")
    stream = stub.SampleStream(LONG, timeout=TIMEOUT)
    first = next(stream)
    assert first.HasField("progress")
    stream.cancel()
    _assert_rows_freed(server, samples_before)


def test_a_full_queue_is_resource_exhausted(
    server: ServerProcess, stub: pb_grpc.GeneratorStub
) -> None:
    # A stream's first progress event shows its rows were admitted, not just queued.
    running = stub.SampleStream(LONG, timeout=TIMEOUT)
    queued = None
    try:
        assert next(running).HasField("progress")
        queued = stub.Sample.future(LONG, timeout=TIMEOUT)
        poll(lambda: _rows(server) == 2048, "1,024 rows running and 1,024 queued")
        with pytest.raises(grpc.RpcError) as error:
            stub.Sample(pb.SampleRequest(model="toy2d", num_samples=1), timeout=TIMEOUT)
        assert error.value.code() == Code.RESOURCE_EXHAUSTED
        assert "queue is full" in error.value.details()
    finally:
        running.cancel()
        if queued is not None:
            queued.cancel()
    poll(lambda: _rows(server) == 0, "the cancelled requests to leave")


@pytest.mark.parametrize(
    ("metadata", "codes"),
    [
        ((), (Code.UNAUTHENTICATED,) * 2),
        ((("authorization", ADMIN_TOKEN),), (Code.UNAUTHENTICATED,) * 2),  # no "Bearer "
        ((("authorization", "Bearer not-the-token-at-all-0000"),), (Code.PERMISSION_DENIED,) * 2),
        # With the token the calls reach the lifecycle, which judges the requests themselves:
        # an unknown model, and a push stream without its header.
        ((("authorization", f"Bearer {ADMIN_TOKEN}"),), (Code.NOT_FOUND, Code.INVALID_ARGUMENT)),
    ],
)
def test_model_admin_checks_the_token_first(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], codes: tuple[Code, Code]
) -> None:
    admin = pb_grpc.ModelAdminStub(channel)
    calls = (
        lambda: admin.SetServingVersion(
            pb.SetServingVersionRequest(model="no-such-model"), metadata=metadata, timeout=TIMEOUT
        ),
        lambda: admin.PushModel(iter([pb.PushModelChunk()]), metadata=metadata, timeout=TIMEOUT),
    )
    for call, code in zip(calls, codes, strict=True):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == code


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(
    server: ServerProcess, stub: pb_grpc.GeneratorStub, channel: grpc.Channel, tiny_store: Path
) -> None:
    # 4 x 256 rows x 1,000 midpoint steps: about 2 s of engine time, all in flight at once.
    requests = [
        pb.SampleRequest(model="toy2d", num_samples=256, num_steps=1000, solver=pb.MIDPOINT, seed=s)
        for s in range(4)
    ]
    futures = [stub.Sample.future(request, timeout=TIMEOUT) for request in requests]
    poll(lambda: _rows(server) == 1024, "every request to be admitted")
    server.terminate()
    health = health_pb2_grpc.HealthStub(channel)
    poll(
        lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING,
        "health to report NOT_SERVING while draining",
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.Sample(pb.SampleRequest(model="toy2d", num_samples=1), timeout=TIMEOUT)
    assert error.value.code() == Code.UNAVAILABLE
    assert "draining" in error.value.details()
    assert not all(f.done() for f in futures), "the requests finished before the drain began"
    responses = [f.result(timeout=TIMEOUT) for f in futures]
    assert [len(r.samples.data) for r in responses] == [256 * 2 * 4] * 4
    # The first rows of one request equal flows' sampler on the seed's noise.
    x0 = torch.randn((256, 2), generator=torch.Generator("cpu").manual_seed(3))[:8]
    model = load_model_dir(tiny_store / "toy2d" / "2")
    with torch.no_grad():
        expected = sample(model.velocity_fn(), x0, 1000, solver="midpoint")
    got = torch.frombuffer(bytearray(responses[3].samples.data), dtype=torch.float32)
    # float32 over 1,000 steps of a smooth field: rounding stays well below 1e-4.
    torch.testing.assert_close(got.reshape(256, 2)[:8], expected, atol=1e-4, rtol=1e-4)
    assert server.process.wait(timeout=TIMEOUT) == 0
    assert "draining" in server.log()


def test_requests_beyond_the_grace_period_fail_and_the_exit_is_still_0(
    tiny_store: Path, tmp_path: Path
) -> None:
    process = _start(tiny_store, tmp_path, "--grace-seconds", "0.3")
    try:
        process.wait_for_line("flowserve ready")
        with grpc.insecure_channel(process.target) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            future = stub.Sample.future(LONG, timeout=TIMEOUT)
            poll(lambda: _rows(process) == 1024, "the request to be admitted")
            process.terminate()
            with pytest.raises(grpc.RpcError) as error:
                future.result(timeout=TIMEOUT)
            assert error.value.code() in (Code.UNAVAILABLE, Code.CANCELLED)
        assert process.process.wait(timeout=TIMEOUT) == 0
    finally:
        process.stop()
