"""The configuration tree: DESIGN.md defaults, file + flag layering, and range checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from server.config import (
    ConfigError,
    GrpcConfig,
    LimitsConfig,
    ServerConfig,
    build_config,
    load_config,
    read_admin_token,
)
from server.engine import EngineConfig


def test_defaults_are_the_ones_design_md_fixes() -> None:
    config = load_config(None)
    assert config.grpc.port == 8001
    assert config.metrics.port == 8002
    assert config.limits.max_num_samples == 65_536
    assert config.limits.max_num_steps == 1_000
    assert config.limits.max_num_probes == 64
    assert config.limits.max_tensor_bytes == 64 * 1024 * 1024
    assert config.limits.exact_max_dimension == 64
    assert config.limits.default_num_probes == 8
    assert config.limits.default_likelihood_solver == "rk4"
    assert config.engine == EngineConfig()


def test_every_node_is_frozen() -> None:
    config = ServerConfig()
    for node in (config, config.grpc, config.limits, config.store, config.engine):
        with pytest.raises(dataclasses.FrozenInstanceError):
            node.port = 1  # type: ignore[union-attr]


def test_toml_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'torch_threads = 2\n[grpc]\nport = 9000\nhost = "0.0.0.0"\n'
        '[engine]\nmax_rows_per_call = 256\nbatch_buckets = [1, 16, 256]\npolicy = "request"\n'
        '[store]\npath = "elsewhere"\n'
    )
    config = load_config(path, {"grpc": {"port": 9100}, "store": {"backend": "onnxruntime"}})
    assert config.grpc.port == 9100  # the flag wins
    assert config.grpc.host == "0.0.0.0"  # the file's value survives other flags
    assert config.engine.batch_buckets == (1, 16, 256)
    assert config.engine.policy == "request"
    assert config.store.path == Path("elsewhere")
    assert config.store.backend == "onnxruntime"
    assert config.torch_threads == 2


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"limits": {"max_num_steps": 50}, "logging": {"json": True}}))
    config = load_config(path)
    assert config.limits.max_num_steps == 50
    assert config.logging.json is True


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"grpc": {"port": 70000}}, "grpc.port must be in [0, 65535]"),
        ({"grpc": {"port": "8001"}}, "grpc.port must be an integer"),
        ({"grpc": {"prot": 1}}, "unknown key(s) ['prot'] in [grpc]"),
        ({"limits": {"max_num_steps": 0}}, "limits.max_num_steps"),
        ({"limits": {"max_tensor_bytes": 2**40}}, "limits.max_tensor_bytes"),
        ({"limits": {"default_num_probes": 65}}, "limits.default_num_probes"),
        ({"limits": {"default_likelihood_solver": "euler_maruyama"}}, "default_likelihood_solver"),
        ({"limits": {"max_num_samples": 70_000}}, "engine.max_rows_in_flight"),
        ({"engine": {"policy": "greedy"}}, "[engine]: policy must be one of"),
        ({"engine": {"batch_buckets": [4, 2]}}, "[engine]: batch_buckets"),
        ({"store": {"backend": "tensorrt"}}, "store.backend must be one of"),
        ({"logging": {"level": "LOUD"}}, "logging.level"),
        ({"grpc": {"grace_seconds": float("nan")}}, "grpc.grace_seconds must be finite"),
        ({"metrics": {"port": 8001}}, "metrics.port and grpc.port are both 8001"),
        ({"gprc": {}}, "unknown config key(s) ['gprc']"),
        ({"torch_threads": True}, "torch_threads must be an integer"),
    ],
)
def test_bad_values_name_the_key_and_the_range(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config(values)
    assert fragment in str(error.value)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[grpc\nport = 1")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(broken)


def test_message_limit_leaves_room_around_a_full_tensor() -> None:
    limits = LimitsConfig(max_tensor_bytes=1024)
    assert limits.max_message_bytes > limits.max_tensor_bytes
    assert GrpcConfig(port=0).port == 0  # 0 asks the OS for a free port


def test_admin_token_comes_from_the_file_then_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file-0123456789\n")
    environ = {"FLOWSERVE_ADMIN_TOKEN": "from-the-environment-0123"}
    assert read_admin_token(token_file, environ) == "from-the-file-0123456789"
    assert read_admin_token(None, environ) == "from-the-environment-0123"
    assert read_admin_token(None, {}) is None
    with pytest.raises(ConfigError, match="cannot read admin token file"):
        read_admin_token(tmp_path / "absent", environ)


def test_admin_token_is_checked_and_never_printed() -> None:
    config = load_config(None, admin_token="a-long-enough-secret-token")
    assert config.admin.token == "a-long-enough-secret-token"
    assert "secret" not in repr(config)
    with pytest.raises(ConfigError, match="at least 16 printable characters"):
        load_config(None, admin_token="short")
