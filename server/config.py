"""The server's configuration: one tree of frozen dataclasses, built once at start-up.

`load_config(path, overrides)` reads an optional TOML or JSON file whose tables mirror the tree
(`[grpc]`, `[metrics]`, `[limits]`, `[store]`, `[engine]`, `[logging]`, `[push]`, plus top-level
`torch_threads`), applies command-line overrides on top, type-checks and range-checks every
value, and returns a `ServerConfig`. Nothing else in the server reads files or the environment
for configuration; the tree is passed down.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engine import EngineConfig
from server.options import BACKENDS, LOG_LEVELS, MIB

MIN_ADMIN_TOKEN_CHARS = 16
ADMIN_TOKEN_ENV = "FLOWSERVE_ADMIN_TOKEN"
# gRPC messages cannot exceed 2 GiB; leave room for everything around the tensors.
_MAX_TENSOR_BYTES_CAP = 1024 * MIB


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")


def _check_port(name: str, value: int) -> None:
    _check_range(name, value, 0, 65535)


@dataclass(frozen=True)
class GrpcConfig:
    """The gRPC listener.

    Attributes:
        host: Address to bind ("127.0.0.1" for loopback only, "0.0.0.0" for every interface).
        port: Port to bind; 0 picks a free one (reported on stdout and in `port_file`).
        max_workers: Threads answering RPCs; each running request holds one while it waits.
        max_concurrent_rpcs: RPCs in progress at once; beyond it gRPC answers
            RESOURCE_EXHAUSTED.
        max_concurrent_streams: HTTP/2 streams one client connection may hold open at once
            (`grpc.http2.max_concurrent_streams`).
        grace_seconds: After SIGTERM, how long in-flight requests may take to finish.
        port_file: Where to write the bound gRPC port (and the metrics port) once serving.
    """

    host: str = "127.0.0.1"
    port: int = 8001
    max_workers: int = 64
    max_concurrent_rpcs: int = 1024
    max_concurrent_streams: int = 256
    grace_seconds: float = 30.0
    port_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("grpc.host must not be empty")
        _check_port("grpc.port", self.port)
        _check_range("grpc.max_workers", self.max_workers, 1, 4096)
        _check_range("grpc.max_concurrent_rpcs", self.max_concurrent_rpcs, 1, 1_000_000)
        _check_range("grpc.grace_seconds", self.grace_seconds, 0.0, 3600.0)
        _check_range("grpc.max_concurrent_streams", self.max_concurrent_streams, 1, 1_000_000)


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint, served over HTTP at /metrics on the gRPC host.

    Attributes:
        port: Port of the HTTP endpoint; 0 picks a free one.
        enabled: Serve metrics at all.
    """

    port: int = 8002
    enabled: bool = True

    def __post_init__(self) -> None:
        _check_port("metrics.port", self.port)


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits and defaults; a request beyond a limit gets INVALID_ARGUMENT.

    Attributes:
        max_num_samples: Samples (or likelihood data points) per request.
        max_num_steps: Solver steps per request.
        max_num_probes: Hutchinson probes per data point.
        max_tensor_bytes: Bytes of any one tensor in a request or response, and of a response's
            whole trajectory.
        max_guidance_scale: Largest classifier-free guidance weight.
        exact_max_dimension: LogLikelihood's default estimator is EXACT up to this many
            dimensions and HUTCHINSON above.
        default_num_probes: Hutchinson probes when a request asks for 0.
        default_likelihood_solver: LogLikelihood's solver when a request leaves it unset.
    """

    max_num_samples: int = 65536
    max_num_steps: int = 1000
    max_num_probes: int = 64
    max_tensor_bytes: int = 64 * MIB
    max_guidance_scale: float = 100.0
    exact_max_dimension: int = 64
    default_num_probes: int = 8
    default_likelihood_solver: str = "rk4"

    def __post_init__(self) -> None:
        _check_range("limits.max_num_samples", self.max_num_samples, 1, 1 << 24)
        _check_range("limits.max_num_steps", self.max_num_steps, 1, 100_000)
        _check_range("limits.max_num_probes", self.max_num_probes, 1, 4096)
        _check_range("limits.max_tensor_bytes", self.max_tensor_bytes, 4, _MAX_TENSOR_BYTES_CAP)
        _check_range("limits.max_guidance_scale", self.max_guidance_scale, 1.0, 1e6)
        _check_range("limits.exact_max_dimension", self.exact_max_dimension, 1, 1 << 20)
        _check_range("limits.default_num_probes", self.default_num_probes, 1, self.max_num_probes)
        ode_solvers = ("euler", "midpoint", "heun", "rk4")
        if self.default_likelihood_solver not in ode_solvers:
            raise ConfigError(
                f"limits.default_likelihood_solver must be one of {ode_solvers}, "
                f"got {self.default_likelihood_solver!r}"
            )

    @property
    def max_message_bytes(self) -> int:
        """gRPC message size limit: one full-size tensor plus room for the other fields."""
        return self.max_tensor_bytes + 4 * MIB


@dataclass(frozen=True)
class StoreConfig:
    """The model store.

    Attributes:
        path: Directory holding `NAME/VERSION/` model directories.
        backend: Backend for sampling; a model without the backend's file falls back to eager.
        verify: Check every file's sha256 when loading.
        warmup: Run a tiny request per model before reporting SERVING.
        poll_seconds: Directory mode: how often to look for version directories dropped into
            the store (validated like a push before they serve); 0 disables polling.
    """

    path: Path = Path("model_store")
    backend: str = "eager"
    verify: bool = True
    warmup: bool = True
    poll_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"store.backend must be one of {BACKENDS}, got {self.backend!r}")
        _check_range("store.poll_seconds", self.poll_seconds, 0.0, 86400.0)


@dataclass(frozen=True)
class PushConfig:
    """Checks a pushed (or dropped-in) model version must pass before it serves.

    Attributes:
        max_file_bytes: Largest single file of a push.
        max_push_bytes: Largest push, all files together.
        smoke_samples: Samples of the smoke test (drawn from noise by the eager network).
        smoke_steps: Euler steps of the smoke test.
        smoke_bound: Largest absolute sample value the smoke test accepts.
        quality_margin: Largest accepted relative quality loss against the serving version
            (0.25: up to 25% worse); larger losses are refused unless the push is forced.
        likelihood_margin: Largest accepted rise of the held-out negative log-likelihood, in
            nats per dimension (a difference: log-likelihoods have no natural scale).
        quality_samples: Samples drawn by the quality gate, per measurement.
        quality_seed: Seed of the gate's noise, data and projections (the same for both
            versions, so that the comparison does not depend on sampling luck).
    """

    max_file_bytes: int = 256 * MIB
    max_push_bytes: int = 512 * MIB
    smoke_samples: int = 256
    smoke_steps: int = 20
    smoke_bound: float = 1e4
    quality_margin: float = 0.25
    likelihood_margin: float = 0.1
    quality_samples: int = 500
    quality_seed: int = 0

    def __post_init__(self) -> None:
        _check_range("push.max_file_bytes", self.max_file_bytes, 1, 1 << 40)
        _check_range("push.max_push_bytes", self.max_push_bytes, 1, 1 << 40)
        _check_range("push.smoke_samples", self.smoke_samples, 1, 1 << 20)
        _check_range("push.smoke_steps", self.smoke_steps, 1, 10_000)
        _check_range("push.smoke_bound", self.smoke_bound, 1e-6, 1e30)
        _check_range("push.quality_margin", self.quality_margin, 0.0, 1e6)
        _check_range("push.likelihood_margin", self.likelihood_margin, 0.0, 1e6)
        _check_range("push.quality_samples", self.quality_samples, 10, 1 << 20)
        _check_range("push.quality_seed", self.quality_seed, 0, 2**63 - 1)


@dataclass(frozen=True)
class AdminConfig:
    """Access to the ModelAdmin service.

    Attributes:
        token: The bearer token admin clients must send (`authorization: Bearer TOKEN`);
            None disables the admin service. Read once at start-up from `--admin-token-file`
            or FLOWSERVE_ADMIN_TOKEN, never from the config file, and never printed.
    """

    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.token is not None and (
            len(self.token) < MIN_ADMIN_TOKEN_CHARS
            or not self.token.isprintable()
            or " " in self.token
        ):
            raise ConfigError(
                f"the admin token must be at least {MIN_ADMIN_TOKEN_CHARS} printable characters "
                "without spaces"
            )


@dataclass(frozen=True)
class LoggingConfig:
    """Log output on stderr.

    Attributes:
        level: Lowest level written.
        json: One JSON object per line instead of plain text.
    """

    level: str = "INFO"
    json: bool = False

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ConfigError(f"logging.level must be one of {LOG_LEVELS}, got {self.level!r}")


@dataclass(frozen=True)
class SecurityConfig:
    """Transport security and client authentication on the gRPC port.

    Attributes:
        tls_cert_file: PEM server certificate (chain); with `tls_key_file` the port speaks TLS.
        tls_key_file: PEM private key of the certificate.
        tls_client_ca_file: PEM CA bundle; when set, clients must present a certificate it
            signed (mutual TLS).
        inference_token_file: File holding a bearer token that Generator and the Open Inference
            Protocol then require (`authorization: Bearer TOKEN`); health and reflection stay
            open for probes. ModelAdmin has its own token (`--admin-token-file`).
    """

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    inference_token_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("security.tls_cert_file and security.tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("security.tls_client_ca_file (mutual TLS) needs tls_cert_file")

    @property
    def tls(self) -> bool:
        """Whether the port speaks TLS."""
        return self.tls_cert_file is not None


@dataclass(frozen=True)
class ServerConfig:
    """The whole configuration tree.

    Attributes:
        grpc: The gRPC listener and shutdown grace.
        metrics: The Prometheus endpoint.
        limits: Per-request limits and defaults.
        store: Where the models are and how they run.
        engine: The batching engine (its own frozen config).
        logging: Log format and level.
        admin: ModelAdmin access (built from flags and the environment, not the file).
        push: Checks of pushed and dropped-in model versions.
        security: TLS, mutual TLS and the optional inference token.
        torch_threads: Threads of torch's intra-op pool; 0 keeps torch's default.
    """

    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    push: PushConfig = field(default_factory=PushConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    torch_threads: int = 0

    def __post_init__(self) -> None:
        _check_range("torch_threads", self.torch_threads, 0, 1024)
        if self.limits.max_num_samples > self.engine.max_rows_in_flight:
            # A request bigger than the engine's in-flight capacity could never be admitted.
            raise ConfigError(
                f"limits.max_num_samples ({self.limits.max_num_samples}) must be <= "
                f"engine.max_rows_in_flight ({self.engine.max_rows_in_flight})"
            )
        if self.metrics.enabled and self.metrics.port != 0 and self.metrics.port == self.grpc.port:
            raise ConfigError(f"metrics.port and grpc.port are both {self.grpc.port}")


_SECTIONS: dict[str, type[Any]] = {
    "grpc": GrpcConfig,
    "metrics": MetricsConfig,
    "limits": LimitsConfig,
    "store": StoreConfig,
    "engine": EngineConfig,
    "logging": LoggingConfig,
    "push": PushConfig,
    "security": SecurityConfig,
}
_TOP_LEVEL = ("torch_threads",)


def _coerce(name: str, value: object, default: object) -> object:
    """Check `value` against the type of the field's default and convert where lossless."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{name} must be a list of integers, got {value!r}")
        return tuple(value)
    if isinstance(default, Path) or default is None:
        # Path-valued fields (store.path, grpc.port_file).
        if value is None and default is None:
            return None
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{name} must be a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{name}: unsupported configuration type {type(default).__name__}")


def _build_section(section: str, cls: type[Any], values: Mapping[str, object]) -> Any:
    defaults = cls()
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{section}]; allowed: {allowed}")
    kwargs = {
        key: _coerce(f"{section}.{key}", value, getattr(defaults, key))
        for key, value in values.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # EngineConfig's own range checks
        raise ConfigError(f"[{section}]: {error}") from error


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (`.toml`) or JSON (any other suffix) configuration file.

    Raises:
        ConfigError: the file is missing, unreadable or not a table of tables.
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    try:
        if path.suffix == ".toml":
            data: object = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"config file {path} does not parse: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object at the top")
    return data


def build_config(values: Mapping[str, object], admin_token: str | None = None) -> ServerConfig:
    """Build and check the tree from nested values (`{"grpc": {"port": 1}, ...}`).

    Args:
        values: Sections and top-level keys, as in the config file.
        admin_token: The ModelAdmin bearer token, or None to disable the admin service.

    Raises:
        ConfigError: naming the first unknown key or bad value.
    """
    unknown = sorted(set(values) - set(_SECTIONS) - set(_TOP_LEVEL))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; allowed: {[*_SECTIONS, *_TOP_LEVEL]}")
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        section_values = values.get(section, {})
        if not isinstance(section_values, Mapping):
            raise ConfigError(f"[{section}] must be a table, got {section_values!r}")
        sections[section] = _build_section(section, cls, section_values)
    top: dict[str, Any] = {
        key: _coerce(key, values[key], getattr(ServerConfig(), key))
        for key in _TOP_LEVEL
        if key in values
    }
    return ServerConfig(**sections, **top, admin=AdminConfig(token=admin_token))


def read_admin_token(token_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The admin token from `token_file` if given, else from FLOWSERVE_ADMIN_TOKEN, else None.

    Called once at start-up with the process environment; surrounding whitespace is dropped.

    Raises:
        ConfigError: the token file cannot be read.
    """
    if token_file is not None:
        try:
            return token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read admin token file {token_file}: {error}") from error
    token = environ.get(ADMIN_TOKEN_ENV, "").strip()
    return token or None


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Nested values of `base` with those of `overrides` on top (one level of tables)."""
    merged: dict[str, Any] = {key: value for key, value in base.items()}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    admin_token: str | None = None,
) -> ServerConfig:
    """The configuration from an optional file plus overrides (the command line wins).

    Args:
        path: TOML or JSON file, or None for defaults only.
        overrides: Nested values in the file's layout, e.g. `{"grpc": {"port": 0}}`.
        admin_token: The ModelAdmin bearer token (see `read_admin_token`), or None.

    Raises:
        ConfigError: naming the bad key or value.
    """
    base = read_config_file(path) if path is not None else {}
    return build_config(merge(base, overrides or {}), admin_token)
