"""`flowserve serve | sample | loglik | models | push`: run the server, or call one.

`serve` builds the configuration once (file, then flags) and runs `server.app.serve`. The
client commands talk to a running server (default 127.0.0.1:8001) and say clearly when none
answers.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import grpc
import numpy as np
import typer

from protos.flowserve.v1 import flowserve_pb2 as pb
from server import codec
from server.client import DEFAULT_SERVER, Connection, ServerUnreachable, connect, explain
from server.options import BACKENDS, LOG_LEVELS
from server.output import SUFFIXES, OutputError, write_samples
from server.wire_names import ESTIMATOR_ENUMS, SOLVER_ENUMS

__all__ = ["loglik", "models", "push", "sample", "serve"]

ServerOption = Annotated[
    str, typer.Option("--server", help="Address of a running flowserve server, HOST:PORT.")
]


def _choice(allowed: tuple[str, ...]) -> Callable[[str | None], str | None]:
    """A typer callback accepting only `allowed` (None passes: the option was not given)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    return check


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _connection(target: str) -> Iterator[Connection]:
    """A connection whose failures end the command with a readable message."""
    try:
        conn = connect(target)
    except ServerUnreachable as error:
        raise _fail(str(error)) from None
    try:
        yield conn
    except grpc.RpcError as error:
        raise _fail(explain(error, target)) from None
    finally:
        conn.close()


def serve(
    store: Annotated[
        Path | None, typer.Option(help="Model store directory [default: model_store].")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind [default: 127.0.0.1].")] = None,
    port: Annotated[
        int | None, typer.Option(help="gRPC port; 0 picks a free one [default: 8001].")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port; 0 picks one [default: 8002].")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML or JSON configuration file (flags override it).")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help=f"Sampling backend: {', '.join(BACKENDS)}.", callback=_choice(BACKENDS)),
    ] = None,
    grace_seconds: Annotated[
        float | None, typer.Option(help="After SIGTERM, time in-flight requests get to finish.")
    ] = None,
    port_file: Annotated[
        Path | None, typer.Option(help="Write the bound ports here as JSON once serving.")
    ] = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (0 = torch's default).")
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help=f"Log level: {', '.join(LOG_LEVELS)}.", callback=_choice(LOG_LEVELS)),
    ] = None,
    log_json: Annotated[
        bool | None, typer.Option("--log-json/--log-text", help="Log one JSON object per line.")
    ] = None,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the ModelAdmin bearer token (else $FLOWSERVE_ADMIN_TOKEN)."
        ),
    ] = None,
) -> None:
    """Serve the models of a store over gRPC (health, reflection, metrics included)."""
    # Imported here: the client commands should not pay for loading the engine.
    from server.app import serve as run_server
    from server.config import ConfigError, load_config, read_admin_token
    from server.logs import configure_logging
    from server.store import StoreError
    from server.warmup import WarmupFailed

    flags: dict[str, dict[str, Any]] = {
        "grpc": {
            "host": host,
            "port": port,
            "grace_seconds": grace_seconds,
            "port_file": port_file,
        },
        "metrics": {"port": metrics_port},
        "store": {"path": store, "backend": backend},
        "logging": {"level": log_level, "json": log_json},
    }
    overrides: dict[str, Any] = {
        section: {key: value for key, value in values.items() if value is not None}
        for section, values in flags.items()
    }
    if torch_threads is not None:
        overrides["torch_threads"] = torch_threads
    try:
        # The only place the environment is read: once, at start-up.
        token = read_admin_token(admin_token_file, os.environ)
        server_config = load_config(config, overrides, admin_token=token)
    except ConfigError as error:
        raise _fail(f"configuration: {error}", code=2) from None
    configure_logging(server_config.logging)
    try:
        status = run_server(server_config)
    except ConfigError as error:  # a file the config names (TLS, token) cannot be read
        raise _fail(f"configuration: {error}", code=2) from None
    except (StoreError, WarmupFailed, OSError) as error:
        raise _fail(str(error)) from None
    raise typer.Exit(status)


def _solver_option(value: str | None) -> str | None:
    return _choice(tuple(SOLVER_ENUMS))(value)


def sample(
    model: Annotated[str, typer.Argument(help="Model name (see `flowserve models`).")],
    out: Annotated[Path, typer.Option("--out", help=f"Output file: {' or '.join(SUFFIXES)}.")],
    num_samples: Annotated[int, typer.Option("-n", "--num-samples", min=1, help="Samples.")] = 16,
    steps: Annotated[int, typer.Option(min=0, help="Solver steps (0 = model default).")] = 0,
    solver: Annotated[
        str | None,
        typer.Option(
            help=f"Solver: {', '.join(SOLVER_ENUMS)} [default: the model's].",
            callback=_solver_option,
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed (the server picks one).")] = None,
    label: Annotated[
        list[int] | None, typer.Option(help="Class label: once for all samples, or n times.")
    ] = None,
    guidance: Annotated[
        float, typer.Option(help="Classifier-free guidance weight (0 = 1 = none).")
    ] = 0.0,
    server: ServerOption = DEFAULT_SERVER,
) -> None:
    """Draw samples from a served model and write them as .npy or .png."""
    if out.suffix.lower() not in SUFFIXES:
        raise typer.BadParameter(f"must end in {' or '.join(SUFFIXES)}", param_hint="--out")
    request = pb.SampleRequest(
        model=model,
        num_samples=num_samples,
        num_steps=steps,
        solver=SOLVER_ENUMS[solver] if solver else pb.SOLVER_UNSPECIFIED,
        class_labels=label or [],
        guidance_scale=guidance,
    )
    if seed is not None:
        request.seed = seed
    with _connection(server) as conn:
        response = conn.generator.Sample(request)
    samples = codec.decode_array(response.samples)
    labels = np.broadcast_to(np.asarray(label), (len(samples),)) if label else None
    try:
        write_samples(out, samples, labels)
    except OutputError as error:
        raise _fail(str(error)) from None
    typer.echo(
        f"wrote {len(samples)} samples of {response.model} v{response.version} to {out} "
        f"({response.num_steps} steps, seed {response.seed}, "
        f"{response.network_evaluations} network evaluations, "
        f"{response.compute_seconds:.3f}s compute)"
    )


def loglik(
    model: Annotated[str, typer.Argument(help="Model name.")],
    data: Annotated[
        Path, typer.Argument(help="Points to score: .npy of shape (n, *sample_shape).")
    ],
    steps: Annotated[int, typer.Option(min=0, help="Solver steps (0 = model default).")] = 0,
    estimator: Annotated[
        str | None,
        typer.Option(
            help="exact or hutchinson [default: exact up to 64 dims].",
            callback=_choice(tuple(ESTIMATOR_ENUMS)),
        ),
    ] = None,
    probes: Annotated[int, typer.Option(min=0, help="Hutchinson probes (0 = 8).")] = 0,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of the probes.")] = None,
    server: ServerOption = DEFAULT_SERVER,
) -> None:
    """Log-likelihood (nats) and bits per dimension of data points under a served model."""
    try:
        # allow_pickle=False: a data file is never unpickled.
        points = np.load(data, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise _fail(f"cannot read {data} as .npy: {error}") from None
    if points.dtype.kind not in "fiu" or points.ndim < 2:
        raise _fail(f"{data} must hold numbers of shape (n, *sample_shape), got {points.shape}")
    request = pb.LogLikelihoodRequest(
        model=model,
        data=codec.encode_array(points.astype(np.float32)),
        num_steps=steps,
        estimator=ESTIMATOR_ENUMS[estimator] if estimator else pb.ESTIMATOR_UNSPECIFIED,
        num_probes=probes,
    )
    if seed is not None:
        request.seed = seed
    with _connection(server) as conn:
        response = conn.generator.LogLikelihood(request)
    log_prob = np.asarray(response.log_prob)
    bits = np.asarray(response.bits_per_dim)
    for index, (lp, se, bpd) in enumerate(
        zip(response.log_prob, response.std_error, response.bits_per_dim, strict=True)
    ):
        if index == 20:
            typer.echo(f"... ({len(log_prob) - 20} more)")
            break
        typer.echo(f"{index:6d}  log p = {lp:12.5f} ± {se:.5f} nats   {bpd:9.5f} bits/dim")
    typer.echo(
        f"{len(log_prob)} points under {response.model} v{response.version}: mean log p = "
        f"{log_prob.mean():.5f} nats, mean {bits.mean():.5f} bits/dim"
    )


def models(server: ServerOption = DEFAULT_SERVER) -> None:
    """List the served models."""
    with _connection(server) as conn:
        response = conn.generator.ListModels(pb.ListModelsRequest())
    if not response.models:
        typer.echo(f"{server} serves no models")
        return
    for info in response.models:
        shape = "x".join(str(n) for n in info.sample_shape)
        classes = f"{info.num_classes} classes" if info.num_classes else "unconditional"
        solver = pb.Solver.Name(info.default_solver).lower()
        typer.echo(
            f"{info.name:16s} v{info.serving_version} (versions {list(info.versions)})  "
            f"shape {shape} (D={math.prod(info.sample_shape)})  {classes}  "
            f"{info.parameterization} on {info.path}  {solver} x {info.default_num_steps}  "
            f"backend {info.backend}"
        )


def push(
    directory: Annotated[
        Path, typer.Argument(help="Model directory (config.json + model.safetensors).")
    ],
    server: ServerOption = DEFAULT_SERVER,
    name: Annotated[
        str | None, typer.Option(help="Store it under this name (default: config.json's).")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the admin token (else $FLOWSERVE_ADMIN_TOKEN)."),
    ] = None,
    make_serving: Annotated[
        bool, typer.Option(help="Pin the new version as the serving one.")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Promote even if the quality gate finds it worse.")
    ] = False,
) -> None:
    """Push a model directory to a running server: validated, stored as the next version, served.

    Sends config.json, model.safetensors and model.onnx (if present), nothing else.
    """
    typer.echo(_push(directory, server, token_file, name or "", make_serving, force))


def _push(
    directory: Path,
    server: str,
    token_file: Path | None,
    name: str,
    make_serving: bool,
    force: bool,
) -> str:
    """Push and describe the result; failures end the command with a readable message."""
    from server.config import ConfigError, read_admin_token
    from server.push_client import PushError, push_model_dir

    try:
        # The command's start-up: the one place it reads the environment.
        token = read_admin_token(token_file, os.environ)
    except ConfigError as error:
        raise _fail(str(error), code=2) from None
    if token is None:
        raise _fail("no admin token: pass --token-file or set FLOWSERVE_ADMIN_TOKEN", code=2)
    try:
        response = push_model_dir(
            server, directory, token, name=name, make_serving=make_serving, force=force
        )
    except PushError as error:
        raise _fail(str(error), code=2) from None
    except ServerUnreachable as error:
        raise _fail(str(error)) from None
    except grpc.RpcError as error:
        raise _fail(explain(error, server)) from None
    info = response.model
    return (
        f"pushed {info.name} version {info.version} to {server} "
        f"(serving version {info.serving_version}; versions {list(info.versions)})"
    )


def push_for_training(directory: Path, server: str, token_file: Path | None) -> str:
    """`flowserve train --push`: push the trained directory under its own name."""
    return _push(directory, server, token_file, "", make_serving=False, force=False)


def main() -> None:
    """Entry point of `python -m server`: the serving commands without the rest of the CLI."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    for command in (serve, sample, loglik, models, push):
        app.command()(command)
    app(sys.argv[1:])
