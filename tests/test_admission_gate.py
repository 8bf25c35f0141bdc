"""server.admission_gate.WorkGate: closing lets no new call in and waits for those let in."""

from __future__ import annotations

import threading
import time

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.inference import grpc_predict_v2_pb2 as oip
from server.admission_gate import WORK_METHODS, WorkGate


def test_closed_gate_refuses_and_waits_for_calls_let_in() -> None:
    gate = WorkGate()
    assert gate.enter() and gate.enter()
    gate.close()
    assert not gate.enter()
    assert not gate.wait_idle(0.05)  # two calls still running
    gate.leave()
    releaser = threading.Timer(0.1, gate.leave)
    releaser.start()
    start = time.monotonic()
    assert gate.wait_idle(10.0)
    assert 0.05 < time.monotonic() - start < 5.0
    releaser.join()


def test_every_gated_method_exists() -> None:
    # A misspelt name would silently let that method's work in while draining.
    services = {
        service.full_name: service
        for module in (pb, oip)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    for method in WORK_METHODS:
        service, name = method.strip("/").split("/")
        assert name in services[service].methods_by_name, method
    assert len(WORK_METHODS) == 4
