"""The `flowserve` command line: serve's start-up errors and the client commands.

Client commands run in-process through the real typer app (`flowserve.cli.app`) against the
shared server process; their outputs are checked against flows computed here.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from typer.testing import CliRunner

from flows.likelihood import log_likelihood
from flows.solvers import sample
from flowserve.cli import app
from flowserve.modeldir import load_model_dir
from server.output import OutputError, write_samples
from tests.conftest import ServerProcess

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_every_serving_command_is_registered() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "sample", "loglik", "models"):
        assert command in result.output
    serve_help = runner.invoke(app, ["serve", "--help"], terminal_width=200).output
    for flag in ("--store", "--port", "--metrics-port", "--host", "--config", "--backend",
                 "--grace-seconds"):  # fmt: skip
        assert flag in serve_help


def test_models_lists_the_store(shared_server: ServerProcess) -> None:
    result = runner.invoke(app, ["models", "--server", shared_server.target])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == ["toy2d", "toycond", "toyvp"]
    assert "v2 (versions [1, 2])" in lines[0] and "heun x 8" in lines[0]
    assert "3 classes" in lines[1]


def test_sample_writes_the_seeded_samples(
    shared_server: ServerProcess, tiny_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "samples.npy"
    args = ["sample", "toy2d", "-n", "16", "--steps", "5", "--solver", "rk4", "--seed", "1"]
    result = runner.invoke(app, [*args, "--out", str(out), "--server", shared_server.target])
    assert result.exit_code == 0, result.output
    assert "wrote 16 samples of toy2d v2" in result.output and "seed 1" in result.output
    samples = np.load(out, allow_pickle=False)
    x0 = torch.randn((16, 2), generator=torch.Generator("cpu").manual_seed(1))
    with torch.no_grad():
        expected = sample(load_model_dir(tiny_store / "toy2d" / "2").velocity_fn(), x0, 5, "rk4")
    # Same float32 field and solver; batch composition differs (see test_grpc_service).
    np.testing.assert_allclose(samples, expected.numpy(), atol=1e-5, rtol=1e-5)


def test_sample_png_scatter_with_labels_and_guidance(
    shared_server: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "cond.png"
    result = runner.invoke(
        app,
        ["sample", "toycond", "-n", "32", "--label", "2", "--guidance", "2.0",
         "--out", str(out), "--server", shared_server.target],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    image = imread(out)
    assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_sample_reports_server_side_validation(
    shared_server: ServerProcess, tmp_path: Path
) -> None:
    result = runner.invoke(
        app,
        ["sample", "toy2d", "--steps", "5000", "--out", str(tmp_path / "x.npy"),
         "--server", shared_server.target],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT: num_steps: must be in [1, 1000]" in result.output


def test_loglik_prints_what_flows_computes(
    shared_server: ServerProcess, tiny_store: Path, tmp_path: Path
) -> None:
    data = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    path = tmp_path / "data.npy"
    np.save(path, data)
    result = runner.invoke(
        app, ["loglik", "toy2d", str(path), "--steps", "3", "--server", shared_server.target]
    )
    assert result.exit_code == 0, result.output
    printed = re.search(r"mean log p = (-?[0-9.]+) nats, mean (-?[0-9.]+) bits/dim", result.output)
    assert printed is not None, result.output
    model = load_model_dir(tiny_store / "toy2d" / "2")
    expected = log_likelihood(model.velocity_fn(), torch.from_numpy(data), 3).log_prob.mean()
    # Printed with 5 decimals; the computation agrees to ~1e-5 (see test_grpc_service).
    assert float(printed.group(1)) == pytest.approx(float(expected), abs=1e-4)


def test_loglik_refuses_a_pickled_file(shared_server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    result = runner.invoke(app, ["loglik", "toy2d", str(path), "--server", shared_server.target])
    assert result.exit_code == 1
    assert "cannot read" in result.output


@pytest.mark.parametrize("command", [["models"], ["sample", "toy2d", "--out", "x.npy"]])
def test_unreachable_server_is_explained(command: list[str]) -> None:
    target = f"127.0.0.1:{_free_port()}"
    result = runner.invoke(app, [*command, "--server", target])
    assert result.exit_code == 1
    assert f"cannot reach a flowserve server at {target}" in result.output
    assert "flowserve serve" in result.output


def test_serve_refuses_a_missing_store(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["serve", "--store", str(tmp_path / "absent"), "--port", "0", "--metrics-port", "0"]
    )
    assert result.exit_code == 1
    assert "is not a directory" in result.output


def test_serve_refuses_a_busy_port(shared_server: ServerProcess, tiny_store: Path) -> None:
    port = shared_server.target.rsplit(":", 1)[1]
    result = runner.invoke(
        app,
        ["serve", "--store", str(tiny_store), "--host", "127.0.0.1", "--port", port,
         "--metrics-port", "0"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"cannot bind gRPC port 127.0.0.1:{port}" in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--port", "70000"], "grpc.port must be in [0, 65535]"),
        (["--grace-seconds", "-1"], "grpc.grace_seconds must be in"),
        (["--config", "missing.toml"], "cannot read config file"),
    ],
)
def test_serve_configuration_errors_exit_2(args: list[str], fragment: str) -> None:
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 2
    assert fragment in result.output


def test_png_of_images_is_a_grid_and_other_shapes_need_npy(tmp_path: Path) -> None:
    images = np.random.default_rng(1).uniform(size=(10, 1, 8, 8)).astype(np.float32)
    write_samples(tmp_path / "grid.png", images)
    assert imread(tmp_path / "grid.png").ndim == 3
    with pytest.raises(OutputError, match=r"can only be written as \.npy"):
        write_samples(tmp_path / "cube.png", np.zeros((2, 3, 3), dtype=np.float32))
    with pytest.raises(OutputError, match=r"must end in \.npy or \.png"):
        write_samples(tmp_path / "samples.csv", images)
