"""deploy/: every manifest parses, and agrees with the server it deploys.

The truth is the server itself: metric names come from the real registry built by
`server.metrics.ServerMetrics`, ports and grace periods from the config defaults, health names
from `server.app`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.app import _RESPONSE_FLUSH_SECONDS, HEALTH_NAMES, LIVENESS_HEALTH_NAME
from server.config import ServerConfig
from server.engine import EngineStats
from server.metrics import ServerMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
METRIC = re.compile(r"\bflowserve_[a-z_]+\b")
DEFAULTS = ServerConfig()


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> dict[str, dict[str, Any]]:
    """Every YAML document under deploy/, keyed by kind (each kind appears once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in _documents(path):
            assert doc["kind"] not in found, f"{doc['kind']} twice"
            found[doc["kind"]] = doc
    return found


def registry_metric_names() -> set[str]:
    """Every sample name the server's registry can expose, suffixes included."""
    metrics = ServerMetrics()
    metrics.track_engine(lambda: EngineStats(0, 0, 0))
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "flowserve-dashboard.json").read_text())


def _queries() -> dict[str, list[str]]:
    """PromQL of the dashboard, the alerts and the scaler, by source."""
    kinds = _manifests()
    rules = kinds["PrometheusRule"]["spec"]["groups"][0]["rules"]
    triggers = kinds["ScaledObject"]["spec"]["triggers"]
    return {
        "dashboard": [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]],
        "alerts": [rule["expr"] for rule in rules],
        "scaler": [t["metadata"]["query"] for t in triggers],
    }


def test_every_file_parses_and_has_the_expected_kinds() -> None:
    kinds = _manifests()
    expected = {
        "Deployment",
        "Service",
        "ServiceMonitor",
        "ScaledObject",
        "PrometheusRule",
        "ServingRuntime",
        "InferenceService",
    }
    assert set(kinds) == expected
    assert _dashboard()["panels"]


def test_registry_names_are_real() -> None:
    names = registry_metric_names()
    # A sanity check of the helper itself, so that the next test cannot pass vacuously.
    assert "flowserve_requests_total" in names
    assert "flowserve_request_duration_seconds_bucket" in names
    assert "flowserve_pending_network_evaluations" in names
    assert "flowserve_requests" not in names


@pytest.mark.parametrize("source", ["dashboard", "alerts", "scaler"])
def test_every_metric_used_exists_in_the_registry(source: str) -> None:
    names = registry_metric_names()
    queries = _queries()[source]
    used = {name for query in queries for name in METRIC.findall(query)}
    assert used, f"{source} uses no flowserve metric"
    assert used <= names, f"{source} uses unknown metrics {sorted(used - names)}"


def test_dashboard_covers_what_operators_watch() -> None:
    text = " ".join(_queries()["dashboard"])
    assert "histogram_quantile(0.99, sum by (le) (rate(flowserve_request_duration" in text
    for metric in (
        "flowserve_requests_total",
        "flowserve_queue_rows",
        "flowserve_pending_network_evaluations",
        "flowserve_batch_rows_sum",
        "flowserve_model_info",
    ):
        assert metric in text, metric
    assert 'code!="OK"' in text  # errors


def test_scaler_uses_the_autoscaling_signal() -> None:
    (query,) = _queries()["scaler"]
    assert METRIC.findall(query) == ["flowserve_pending_network_evaluations"]
    spec = _manifests()["ScaledObject"]["spec"]
    assert spec["scaleTargetRef"]["name"] == _manifests()["Deployment"]["metadata"]["name"]


def _container(kind: str) -> dict[str, Any]:
    kinds = _manifests()
    if kind == "ServingRuntime":
        return kinds[kind]["spec"]["containers"][0]
    return kinds[kind]["spec"]["template"]["spec"]["containers"][0]


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_deployment_ports_probes_and_grace_match_the_server() -> None:
    pod = _manifests()["Deployment"]["spec"]["template"]["spec"]
    container = _container("Deployment")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": DEFAULTS.grpc.port, "metrics": DEFAULTS.metrics.port}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Readiness (and startup) on the whole server, which turns NOT_SERVING when draining.
    for probe in ("readinessProbe", "startupProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == DEFAULTS.grpc.port
        assert grpc_probe.get("service", "") in HEALTH_NAMES
    # Liveness on the name that stays SERVING while draining.
    liveness = container["livenessProbe"]["grpc"]
    assert liveness == {"port": DEFAULTS.grpc.port, "service": LIVENESS_HEALTH_NAME}
    grace = float(_arg(container["args"], "--grace-seconds") or DEFAULTS.grpc.grace_seconds)
    assert grace == DEFAULTS.grpc.grace_seconds
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + grace + _RESPONSE_FLUSH_SECONDS
    assert needed < pod["terminationGracePeriodSeconds"] <= needed + 30
    service = _manifests()["Service"]["spec"]["ports"]
    assert {p["name"]: p["port"] for p in service} == ports
    monitor = _manifests()["ServiceMonitor"]["spec"]["endpoints"][0]
    assert monitor["port"] == "metrics" and monitor["path"] == "/metrics"


def test_kserve_runtime_speaks_the_open_inference_protocol() -> None:
    kinds = _manifests()
    runtime = kinds["ServingRuntime"]
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    container = _container("ServingRuntime")
    assert container["ports"][0]["containerPort"] == DEFAULTS.grpc.port
    assert container["ports"][0]["name"] == "h2c"  # KServe's name for a gRPC port
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_HEALTH_NAME
    model = kinds["InferenceService"]["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "grpc-v2"
    formats = [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["modelFormat"]["name"] in formats
