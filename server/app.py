"""Wiring: `create_server(config) -> (server, port)` builds everything; `serve(config)` runs it.

Start-up: load the store, start the engine, build the gRPC server (Generator, ModelAdmin,
grpc.health.v1 and reflection on one port) and bind it. `FlowServer.start()` then listens
(health NOT_SERVING) and serves metrics; `FlowServer.ready()` warms every model up and turns
health to SERVING. On SIGTERM (or SIGINT) `serve` drains: health goes NOT_SERVING, new
work is refused with UNAVAILABLE, in-flight requests get the grace period to finish, and the
process exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2 as oip_pb
from protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from server.admin import ModelAdminServicer
from server.admission_gate import AdmissionInterceptor, WorkGate
from server.config import ServerConfig
from server.decoding import DecodingInterceptor
from server.engine import Engine
from server.lifecycle import ModelLifecycle
from server.live_store import LiveStore
from server.metrics import MetricsEndpoint, ServerMetrics, start_metrics_endpoint
from server.oip import InferenceServicer
from server.rpc import Admission
from server.servicer import GeneratorServicer
from server.store import ModelStore
from server.transport import bind, grpc_options, token_interceptors
from server.warmup import warm_up

logger = logging.getLogger(__name__)

GENERATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Generator"].full_name
MODEL_ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["ModelAdmin"].full_name
OIP_SERVICE = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Health name for liveness probes: SERVING from start-up until the process exits, also while
# draining (readiness, on "" and the service names, turns NOT_SERVING then), so that a liveness
# probe never kills a pod that is finishing its in-flight requests.
LIVENESS_HEALTH_NAME = "liveness"
# Every service on the port (reflection lists them; health answers for each and for "").
SERVICE_NAMES: tuple[str, ...] = (
    GENERATOR_SERVICE,
    MODEL_ADMIN_SERVICE,
    OIP_SERVICE,
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)
HEALTH_NAMES: tuple[str, ...] = ("", *SERVICE_NAMES)
# How long gRPC may take to send the last responses once the engine has drained.
_RESPONSE_FLUSH_SECONDS = 5.0


@dataclass
class FlowServer:
    """A built server: its gRPC server and everything it serves.

    Attributes:
        config: The configuration it was built from.
        grpc_server: The gRPC server (bound, not yet started until `start()`).
        port: The bound gRPC port.
        store: The served models (the serving pointer, swapped on promotion).
        engine: The running engine.
        metrics: The metrics registry and engine observer.
        health: The grpc.health.v1 servicer.
        admission: The gate that closes when draining starts.
        lifecycle: Pushes, pins and directory mode of the store.
        metrics_endpoint: The /metrics HTTP server once started.
        serving: Set while health reports SERVING (read by the OIP ServerReady).
        work_gate: Lets work RPCs in until draining starts; draining waits for those it let in.
    """

    config: ServerConfig
    grpc_server: grpc.Server
    port: int
    store: LiveStore
    engine: Engine
    metrics: ServerMetrics
    health: health.HealthServicer
    admission: Admission
    lifecycle: ModelLifecycle
    metrics_endpoint: MetricsEndpoint | None = field(default=None)
    serving: threading.Event = field(default_factory=threading.Event)
    work_gate: WorkGate = field(default_factory=WorkGate)

    def _set_health(self, status: int) -> None:
        for name in HEALTH_NAMES:
            self.health.set(name, status)
        if status == health_pb2.HealthCheckResponse.SERVING:
            self.serving.set()
        else:
            self.serving.clear()

    def start(self) -> None:
        """Listen for RPCs (health NOT_SERVING) and serve metrics."""
        self.grpc_server.start()
        if self.config.metrics.enabled:
            self.metrics_endpoint = start_metrics_endpoint(
                self.metrics.registry, self.config.grpc.host, self.config.metrics.port
            )

    def ready(self) -> None:
        """Warm every model up, then report SERVING.

        Raises:
            server.warmup.WarmupFailed: a model could not run its warm-up request.
        """
        for entry in self.store.entries():
            warm_up(entry, self.engine, self.config.limits.exact_max_dimension)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.lifecycle.start_polling()
        logger.info("serving %d model(s): %s", len(self.store), ", ".join(self.store.names()))

    def drain_and_stop(self, grace_seconds: float) -> bool:
        """Stop admitting, let in-flight requests finish within the grace period, shut down.

        Returns:
            Whether every in-flight request finished within the grace period.
        """
        logger.info(
            "draining: refusing new requests, %.1fs grace for in-flight ones", grace_seconds
        )
        end = time.monotonic() + grace_seconds
        # Readiness first, so that clients watching health stop picking this replica; not
        # enter_graceful_shutdown(), which would also fail LIVENESS_HEALTH_NAME. Then new work
        # gets UNAVAILABLE before any header (clients may retry it elsewhere); the servicers'
        # own Admission check closes only once the calls let in have finished.
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.work_gate.close()
        self.lifecycle.stop()
        idle = self.work_gate.wait_idle(grace_seconds)
        self.admission.close()
        drained = self.engine.drain(max(0.0, end - time.monotonic())) and idle
        if not drained:
            logger.warning("grace period over with requests in flight; failing them")
        self.engine.shutdown(0.0)
        self.grpc_server.stop(_RESPONSE_FLUSH_SECONDS).wait(_RESPONSE_FLUSH_SECONDS + 1.0)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        logger.info("stopped")
        return drained


def create_server(config: ServerConfig) -> tuple[FlowServer, int]:
    """Build the server: models loaded, engine running, port bound, not yet listening.

    Args:
        config: The whole configuration.

    Returns:
        The server and its bound gRPC port (useful when `config.grpc.port` is 0).

    Raises:
        server.store.StoreError: the store directory is unusable.
        OSError: the port cannot be bound.
    """
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    metrics = ServerMetrics()
    store = LiveStore(ModelStore.load(config.store, config.engine.device))
    metrics.set_models(store.entries())
    engine = Engine(config.engine, observer=metrics)
    engine.start()
    lifecycle = ModelLifecycle(
        store,
        config.store,
        config.push,
        engine,
        metrics,
        config.limits.exact_max_dimension,
        config.engine.device,
    )
    # Clear what a crashed push left behind even when pushes are now off (no admin token).
    if config.admin.token is not None or lifecycle.staging_root.exists():
        lifecycle.prepare_staging()
    metrics.track_engine(engine.stats)
    admission = Admission()
    serving = threading.Event()
    work_gate = WorkGate()
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.grpc.max_workers, thread_name_prefix="flowserve-rpc"
        ),
        options=grpc_options(config),
        interceptors=[
            *token_interceptors(config, metrics),
            AdmissionInterceptor(work_gate, metrics),
            # Innermost: undecodable requests get INVALID_ARGUMENT, not grpcio's INTERNAL.
            DecodingInterceptor((GENERATOR_SERVICE, MODEL_ADMIN_SERVICE, OIP_SERVICE)),
        ],
        maximum_concurrent_rpcs=config.grpc.max_concurrent_rpcs,
    )
    generator = GeneratorServicer(store, engine, config.limits, metrics, admission)
    # The generated registration functions carry no type hints.
    pb_grpc.add_GeneratorServicer_to_server(generator, server)  # type: ignore[no-untyped-call]
    pb_grpc.add_ModelAdminServicer_to_server(  # type: ignore[no-untyped-call]
        ModelAdminServicer(metrics, config.admin, lifecycle), server
    )
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(store, engine, config.limits, metrics, admission, serving), server
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in HEALTH_NAMES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.set(LIVENESS_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    try:
        port = bind(server, config)
    except BaseException:
        engine.shutdown(0.0)
        raise
    flow_server = FlowServer(
        config=config,
        grpc_server=server,
        port=port,
        store=store,
        engine=engine,
        metrics=metrics,
        health=health_servicer,
        admission=admission,
        lifecycle=lifecycle,
        serving=serving,
        work_gate=work_gate,
    )
    return flow_server, port


def _write_port_file(path: Path, grpc_port: int, metrics_port: int | None) -> None:
    """Write the bound ports as JSON, atomically (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"grpc_port": grpc_port, "metrics_port": metrics_port}, handle)
    os.replace(staging, path)


def _print_listening(server: FlowServer) -> None:
    host = server.config.grpc.host
    lines = [f"flowserve listening on {host}:{server.port}"]
    if server.metrics_endpoint is not None:
        lines.append(f"flowserve metrics on http://{host}:{server.metrics_endpoint.port}/metrics")
    print("\n".join(lines), flush=True)


def _print_ready(server: FlowServer) -> None:
    target = f"{server.config.grpc.host}:{server.port}"
    example = server.store.names()[0] if len(server.store) else "MODEL"
    lines = [
        f"flowserve ready: {len(server.store)} model(s) ({', '.join(server.store.names())})",
        "try:",
        f"  flowserve models --server {target}",
        f"  flowserve sample {example} -n 16 --steps 50 --out samples.png --server {target}",
        f'  grpcurl -plaintext -d \'{{"model": "{example}", "num_samples": 4}}\' '
        f"{target} {GENERATOR_SERVICE}/Sample",
    ]
    print("\n".join(lines), flush=True)


def serve(config: ServerConfig) -> int:
    """Run the server until SIGTERM or SIGINT, then drain and stop.

    Returns:
        The process exit status: 0 after a clean drain (also when the grace period ran out).
    """
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    server, _ = create_server(config)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server.start()
        _print_listening(server)
        server.ready()
    except BaseException:
        server.drain_and_stop(0.0)
        raise
    if config.grpc.port_file is not None:
        metrics_port = server.metrics_endpoint.port if server.metrics_endpoint else None
        _write_port_file(config.grpc.port_file, server.port, metrics_port)
    _print_ready(server)
    # Wake up now and then: signal handlers run between the main thread's bytecodes.
    while not stop.wait(0.5):
        pass
    server.drain_and_stop(config.grpc.grace_seconds)
    sys.stdout.flush()
    return 0
