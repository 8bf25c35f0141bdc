"""`flowserve export`: the typer command end to end, and every bad input it must refuse cleanly.

A refused export exits non-zero with a message and leaves the model directory exactly as it
was: no export, no manifest, no hidden temporary file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from export import model_export
from export.contract import MANIFEST_FILE, ONNX_FILE, SAMPLER_FILE, TORCHSCRIPT_FILE
from export.manifest import read_manifest
from flows.nets import NetSpec
from flowserve.cli import app
from flowserve.modeldir import ModelConfig, build_net, load_model_dir, sha256_file, write_model_dir

CONFIG = ModelConfig(
    name="tiny",
    architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2}),
    sample_shape=(2,),
    parameterization="velocity",
    path={"kind": "linear"},
    num_classes=0,
    default_solver="heun",
    default_num_steps=3,
)


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)  # the command sets torch's thread count


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    directory = tmp_path / "tiny" / "1"
    write_model_dir(directory, CONFIG, build_net(CONFIG).state_dict())
    return directory


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["export", *args])
    return result.exit_code, result.output


def test_export_adds_files_and_keeps_config_and_weights(model_dir: Path) -> None:
    before = _snapshot(model_dir)
    code, output = _run(str(model_dir), "--format", "torchscript")
    assert code == 0, output
    assert {TORCHSCRIPT_FILE, MANIFEST_FILE} <= set(os_names(model_dir))
    for name, content in before.items():  # config.json and the weights are byte-identical
        assert (model_dir / name).read_bytes() == content
    load_model_dir(model_dir, verify=True)
    # A later ONNX export adds its files and keeps the TorchScript entry (same weights).
    code, output = _run(str(model_dir), "--format", "onnx", "--threads", "2")
    assert code == 0, output
    manifest = read_manifest(model_dir / MANIFEST_FILE)
    assert [entry.file for entry in manifest.files] == [ONNX_FILE, TORCHSCRIPT_FILE, SAMPLER_FILE]
    for entry in manifest.files:
        assert entry.sha256 == sha256_file(model_dir / entry.file)
    assert not [name for name in os_names(model_dir) if name.endswith(".tmp")]


def os_names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def _remove_weights(directory: Path) -> None:
    (directory / "model.safetensors").unlink()


def _corrupt_weights(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")


def _truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _mismatched_config(directory: Path) -> None:
    """A config whose architecture no longer matches the weights (hidden 16 -> 24)."""
    config = json.loads((directory / "config.json").read_text())
    config["architecture"]["kwargs"]["hidden"] = 24
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_remove_weights, "missing model.safetensors"),
        (_corrupt_weights, "sha256 mismatch"),
        (_truncate_weights, "sha256 mismatch"),
        (_mismatched_config, "shape"),
    ],
    ids=["missing", "corrupt", "truncated", "config-mismatch"],
)
def test_bad_model_dir_fails_cleanly(
    model_dir: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(model_dir)
    before = _snapshot(model_dir)
    code, output = _run(str(model_dir), "--format", "torchscript,onnx")
    assert code == 1
    assert message in output
    assert _snapshot(model_dir) == before


def test_corrupt_weights_with_a_matching_digest_fail_cleanly(model_dir: Path) -> None:
    """Garbage whose sha256 was written into the config: caught by the safetensors parser."""
    (model_dir / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{garbage")
    config = json.loads((model_dir / "config.json").read_text())
    config["sha256"]["model.safetensors"] = sha256_file(model_dir / "model.safetensors")
    (model_dir / "config.json").write_text(json.dumps(config))
    before = _snapshot(model_dir)
    code, output = _run(str(model_dir))
    assert code == 1
    assert "not a valid safetensors file" in output
    assert _snapshot(model_dir) == before


def test_unknown_format_is_refused(model_dir: Path) -> None:
    before = _snapshot(model_dir)
    code, output = _run(str(model_dir), "--format", "torchscript,tflite")
    assert code != 0
    assert "tflite" in output and "torchscript" in output  # names the bad and the allowed
    assert _snapshot(model_dir) == before


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    code, output = _run(str(tmp_path / "nope"))
    assert code == 1
    assert "not a directory" in output


def test_failed_parity_leaves_nothing_behind(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ONNX check fails after model.ts was already staged: neither may appear."""
    monkeypatch.setattr(model_export, "TOLERANCES", {"torchscript": 1e-6, "onnx": -1.0})
    before = _snapshot(model_dir)
    code, output = _run(str(model_dir), "--format", "torchscript,onnx")
    assert code == 1
    assert "exceeds the tolerance" in output
    assert _snapshot(model_dir) == before


def test_size_limit_is_enforced_before_anything_is_renamed(model_dir: Path) -> None:
    before = _snapshot(model_dir)
    limit = sum(len(content) for content in before.values()) + 100  # no room for model.ts
    code, output = _run(str(model_dir), "--format", "torchscript", "--max-dir-bytes", str(limit))
    assert code == 1
    assert "limit" in output and TORCHSCRIPT_FILE in output
    assert _snapshot(model_dir) == before
