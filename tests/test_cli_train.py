"""`flowserve train` through the real typer app: outputs, and errors that name the option."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from typer.testing import CliRunner

from flowserve.cli import app
from flowserve.modeldir import load_model_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    previous = torch.get_num_threads()  # --threads sets torch's process-wide thread count
    yield
    torch.set_num_threads(previous)


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, result.output


def test_train_writes_a_loadable_model_dir_and_pngs(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "moons"
    code, output = _invoke(
        "moons", "--steps", "200", "--out", str(out), "--seed", "3", "--no-progress",
        "--threads", "1",
    )  # fmt: skip
    assert code == 0, output
    model = load_model_dir(out, verify=True)
    assert model.config.name == "moons"
    assert model.config.dataset == "moons"
    assert model.config.training["steps"] == 200
    assert model.config.training["seed"] == 3
    # The PNGs sit beside the model directory, which holds only what a push sends.
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    for name in ("moons-loss.png", "moons-samples.png"):
        png = tmp_path / "runs" / name
        assert png.read_bytes()[:8] == PNG_MAGIC
        height, width, _ = imread(png).shape
        assert height > 100 and width > 100
        assert str(png) in output


def test_train_vp_options_reach_the_config(tmp_path: Path) -> None:
    out = tmp_path / "vp"
    code, output = _invoke(
        "moons", "--steps", "5", "--out", str(out), "--path", "vp", "--parameterization",
        "score", "--name", "tiny-vp", "--batch-size", "16", "--lr", "0.0005", "--ema-decay",
        "0.9", "--plots-dir", str(tmp_path / "plots"), "--no-progress", "--threads", "1",
    )  # fmt: skip
    assert code == 0, output
    config = load_model_dir(out).config
    assert config.name == "tiny-vp"
    assert config.path["kind"] == "vp"
    assert config.parameterization == "score"
    assert config.training["batch_size"] == 16
    assert config.training["lr"] == 0.0005
    assert config.training["ema_decay"] == 0.9
    assert (tmp_path / "plots" / "tiny-vp-samples.png").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["swiss_roll"], "dataset"),
        (["moons", "--steps", "0"], "--steps"),
        (["moons", "--steps", "many"], "--steps"),
        (["moons", "--batch-size", "0"], "--batch-size"),
        (["moons", "--path", "cosine"], "--path"),
        (["moons", "--parameterization", "noise"], "--parameterization"),
        (["moons", "--parameterization", "logits"], "--parameterization"),
        (["moons", "--ema-decay", "1.0"], "--ema-decay"),
        (["moons", "--lr", "-1"], "--lr"),
        (["moons", "--name", "a/b"], "--name"),
    ],
)
def test_bad_options_are_named(tmp_path: Path, args: list[str], needle: str) -> None:
    code, output = _invoke(*args, "--out", str(tmp_path / "m"), "--no-progress")
    assert code == 2, output  # click's usage-error exit status
    assert needle in output
    assert not (tmp_path / "m").exists()


def test_existing_out_needs_overwrite(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    code, output = _invoke("moons", "--out", str(tmp_path / "m"), "--no-progress")
    assert code == 2
    assert "--out" in output
    assert "--overwrite" in output
