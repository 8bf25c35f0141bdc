"""Scale-out: two replicas behind one client channel with gRPC's round_robin policy.

Both replicas take load (each one's own metrics say so), and SIGTERM to one of them under load
fails no request: it drains what it holds, answers new work UNAVAILABLE (which the channel's
retry policy sends to the other replica; client-side health checking stops picking it as soon
as readiness turns NOT_SERVING), and its liveness stays SERVING while readiness does not. Every
wait is bounded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from server.app import LIVENESS_HEALTH_NAME
from tests.conftest import ServerProcess, poll_until

TIMEOUT = 30.0
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    # Client-side health checking: round_robin skips a replica once it reports NOT_SERVING.
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [
        {
            "name": [{"service": "flowserve.v1.Generator"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
SMALL = pb.SampleRequest(model="toy2d", num_samples=4, num_steps=8, solver=pb.EULER)
# About a second of engine time on one replica: keeps it draining while the test looks.
LONG = pb.SampleRequest(model="toy2d", num_samples=256, num_steps=1000, solver=pb.MIDPOINT)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# Every wait is bounded; the shared helper names what it waited for when it gives up.
poll = partial(poll_until, timeout=TIMEOUT)


@pytest.fixture
def replicas(tiny_store: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    args = [
        "--store",
        str(tiny_store),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--torch-threads",
        "1",
    ]
    started = [ServerProcess(args, tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        for server in started:
            server.wait_for_line("flowserve ready")
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


def _port(server: ServerProcess) -> str:
    return server.target.rsplit(":", 1)[1]


def _sample_ok(server: ServerProcess) -> float:
    return server.metric("flowserve_requests_total", method="Sample", model="toy2d", code="OK")


class Load:
    """Threads sending SMALL over one channel until stopped (bounded by count and time)."""

    def __init__(self, stub: pb_grpc.GeneratorStub, threads: int = 3, limit: int = 5000) -> None:
        self._stub = stub
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._limit = limit
        self._started = 0
        self.ok = 0
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        end = time.monotonic() + 2 * TIMEOUT
        while not self._stop.is_set() and time.monotonic() < end:
            with self._lock:
                if self._started >= self._limit:
                    return
                self._started += 1
            try:
                response = self._stub.Sample(SMALL, timeout=TIMEOUT)
                assert len(response.samples.data) == 4 * 2 * 4
                with self._lock:
                    self.ok += 1
            except grpc.RpcError as error:
                with self._lock:
                    self.errors.append(f"{error.code().name}: {error.details()}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=TIMEOUT)
        assert not any(thread.is_alive() for thread in self._threads)


def test_round_robin_spreads_load_and_a_drain_fails_nothing(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = replicas
    target = f"ipv4:127.0.0.1:{_port(first)},127.0.0.1:{_port(second)}"
    options = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)]
    with (
        grpc.insecure_channel(target, options=options) as channel,
        grpc.insecure_channel(second.target) as direct,
    ):
        stub = pb_grpc.GeneratorStub(channel)
        with Load(stub, limit=40) as load:
            poll(lambda: load.ok + len(load.errors) >= 40, "40 requests")
        assert load.errors == [] and load.ok == 40
        # Both replicas answered some of them.
        assert _sample_ok(first) > 0 and _sample_ok(second) > 0
        assert _sample_ok(first) + _sample_ok(second) == 40

        # Drain the second replica under load while it holds long requests of its own.
        long_calls = [
            pb_grpc.GeneratorStub(direct).Sample.future(LONG, timeout=TIMEOUT) for _ in range(2)
        ]
        poll(lambda: second.metric("flowserve_queue_rows") >= 512, "the long requests to run")
        health = health_pb2_grpc.HealthStub(direct)
        with Load(stub) as load:
            poll(lambda: load.ok >= 20, "load before the drain")
            first_before = _sample_ok(first)
            second.terminate()
            poll(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
                ),
                "readiness to turn NOT_SERVING",
            )
            liveness = health.Check(
                health_pb2.HealthCheckRequest(service=LIVENESS_HEALTH_NAME), timeout=5
            )
            assert liveness.status == SERVING, "liveness must stay SERVING while draining"
            assert not all(call.done() for call in long_calls), "drained before looking"
            assert second.process.wait(timeout=TIMEOUT) == 0
            ok_at_exit = load.ok
            poll(
                lambda: load.ok >= ok_at_exit + 20,
                f"load after the replica left ({load.ok} ok, {len(load.errors)} errors)",
            )
        assert load.errors == [], load.errors[:5]
        assert [len(call.result(timeout=TIMEOUT).samples.data) for call in long_calls] == [
            256 * 2 * 4
        ] * 2
        assert _sample_ok(first) >= first_before + 20
