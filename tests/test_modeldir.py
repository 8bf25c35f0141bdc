"""flowserve.modeldir: round trips, every failure mode, and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

import flowserve.modeldir as modeldir
from flows.nets import NetSpec, build_net
from flows.paths import VPPath
from flowserve.modeldir import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelConfig,
    ModelDirError,
    load_model_dir,
    read_config,
    write_model_dir,
)

MLP = NetSpec("time_mlp", {"dim": 2, "hidden": 8, "depth": 2})
COND_MLP = NetSpec("time_mlp", {"dim": 2, "hidden": 8, "depth": 2, "num_classes": 3})


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _config(spec: NetSpec = MLP, **changes: Any) -> ModelConfig:
    base = ModelConfig(
        name="toy",
        architecture=spec,
        sample_shape=spec.sample_shape,
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=spec.num_classes,
        default_solver="heun",
        default_num_steps=8,
        dataset="moons",
        training={"seed": 0, "steps": 1},
    )
    return replace(base, **changes)


def _weights(spec: NetSpec = MLP, seed: int = 0) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return dict(build_net(spec).state_dict())


def _entries(parent: Path) -> list[str]:
    """Everything in a directory, hidden temporaries included."""
    return sorted(os.listdir(parent))


def _rewrite_config(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((model_dir / CONFIG_FILE).read_text())
    edit(data)
    (model_dir / CONFIG_FILE).write_text(json.dumps(data))


def _rehash(model_dir: Path) -> None:
    """Make config.json's digest agree with the weights file as it now is."""
    digest = hashlib.sha256((model_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    _rewrite_config(model_dir, lambda d: d["sha256"].__setitem__(WEIGHTS_FILE, digest))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    dest = tmp_path / "toy" / "1"
    write_model_dir(dest, _config(), _weights())
    return dest


def test_round_trip_restores_config_and_exact_weights(tmp_path: Path) -> None:
    dest = tmp_path / "toy" / "1"
    weights = _weights(COND_MLP)
    config = _config(COND_MLP, path=VPPath().to_dict(), parameterization="noise")
    written = write_model_dir(dest, config, weights)
    assert _entries(dest.parent) == ["1"]  # no temporary left beside it
    assert _entries(dest) == sorted([CONFIG_FILE, WEIGHTS_FILE])

    rng_state = torch.get_rng_state()
    loaded = load_model_dir(dest, verify=True)
    assert torch.equal(torch.get_rng_state(), rng_state)  # no random init behind the caller
    assert loaded.config == written
    assert ModelConfig.from_dict(json.loads((dest / CONFIG_FILE).read_text())) == written
    # The digest in config.json is the sha256 of the bytes on disk (computed independently).
    assert written.sha256 == {
        WEIGHTS_FILE: hashlib.sha256((dest / WEIGHTS_FILE).read_bytes()).hexdigest()
    }
    state = loaded.net.state_dict()
    assert set(state) == set(weights)
    for name, value in weights.items():
        assert torch.equal(state[name], value)  # float32 round trip through safetensors is exact
    assert all(value.device.type == "cpu" for value in state.values())
    assert not loaded.net.training
    assert not any(p.requires_grad for p in loaded.net.parameters())


def test_config_records_the_full_path_schedule() -> None:
    config = _config(path={"kind": "vp"}, parameterization="noise")
    assert config.path == {"kind": "vp", "beta_min": 0.1, "beta_max": 20.0, "eps": 1e-3}


def test_files_not_listed_in_config_are_ignored(model_dir: Path) -> None:
    # export/ adds files with their digests in manifest.json, not config.json.
    (model_dir / "model.onnx").write_bytes(b"not really onnx")
    (model_dir / "manifest.json").write_text("{}")
    assert load_model_dir(model_dir, verify=True).config.name == "toy"


def test_missing_weights_file(model_dir: Path) -> None:
    (model_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelDirError, match=f"missing {WEIGHTS_FILE}"):
        load_model_dir(model_dir)


def test_missing_config_file(model_dir: Path) -> None:
    (model_dir / CONFIG_FILE).unlink()
    with pytest.raises(ModelDirError, match=f"missing {CONFIG_FILE}"):
        load_model_dir(model_dir)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="not a directory"):
        load_model_dir(tmp_path / "nothing")


def test_invalid_json(model_dir: Path) -> None:
    (model_dir / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        load_model_dir(model_dir)


def test_sha256_mismatch_is_caught_only_when_verifying(model_dir: Path) -> None:
    # Flip the last byte: still valid safetensors (it is inside a float), but a different file.
    path = model_dir / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="sha256 mismatch"):
        load_model_dir(model_dir, verify=True)
    assert load_model_dir(model_dir, verify=False).config.name == "toy"


def test_listed_extra_file_is_checked(model_dir: Path) -> None:
    (model_dir / "notes.txt").write_text("hello")
    digest = hashlib.sha256(b"hello").hexdigest()
    _rewrite_config(model_dir, lambda d: d["sha256"].__setitem__("notes.txt", digest))
    assert load_model_dir(model_dir).config.sha256["notes.txt"] == digest
    (model_dir / "notes.txt").write_text("hellO")
    with pytest.raises(ModelDirError, match=r"notes\.txt: sha256 mismatch"):
        load_model_dir(model_dir)
    (model_dir / "notes.txt").unlink()
    with pytest.raises(ModelDirError, match=r"missing notes\.txt"):
        load_model_dir(model_dir)


@pytest.mark.parametrize("verify", [True, False])
def test_corrupt_safetensors(model_dir: Path, verify: bool) -> None:
    path = model_dir / WEIGHTS_FILE
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])  # garbage header length
    _rehash(model_dir)  # so that the parse, not the digest, is what fails
    with pytest.raises(ModelDirError, match="not a valid safetensors"):
        load_model_dir(model_dir, verify=verify)


def test_truncated_safetensors(model_dir: Path) -> None:
    path = model_dir / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-16])
    _rehash(model_dir)
    with pytest.raises(ModelDirError, match="not a valid safetensors"):
        load_model_dir(model_dir)


def test_config_that_does_not_match_the_weights(model_dir: Path) -> None:
    _rewrite_config(model_dir, lambda d: d["architecture"]["kwargs"].__setitem__("hidden", 16))
    with pytest.raises(ModelDirError, match="shape"):
        load_model_dir(model_dir)


def test_weights_with_missing_and_extra_tensors(model_dir: Path) -> None:
    weights = _weights()
    weights["extra.bias"] = torch.zeros(3)
    del weights["output_layer.bias"]
    save_file(weights, str(model_dir / WEIGHTS_FILE))
    _rehash(model_dir)
    with pytest.raises(ModelDirError, match=r"missing \['output_layer.bias'\].*extra.bias"):
        load_model_dir(model_dir)


def test_weights_with_the_wrong_dtype(model_dir: Path) -> None:
    weights = {name: value.double() for name, value in _weights().items()}
    save_file(weights, str(model_dir / WEIGHTS_FILE))
    _rehash(model_dir)
    with pytest.raises(ModelDirError, match="dtype"):
        load_model_dir(model_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_on_disk(model_dir: Path, bad: float) -> None:
    weights = _weights()
    weights["input_layer.weight"][0, 0] = bad
    save_file(weights, str(model_dir / WEIGHTS_FILE))
    _rehash(model_dir)
    with pytest.raises(ModelDirError, match="non-finite"):
        load_model_dir(model_dir)


def test_writing_nan_weights_fails_and_leaves_nothing(tmp_path: Path) -> None:
    weights = _weights()
    weights["output_layer.bias"][0] = float("nan")
    with pytest.raises(ModelDirError, match="non-finite"):
        write_model_dir(tmp_path / "m", _config(), weights)
    assert _entries(tmp_path) == []


def test_writing_mismatched_weights_fails_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="shape"):
        write_model_dir(
            tmp_path / "m", _config(), _weights(replace(MLP, kwargs={**MLP.kwargs, "hidden": 4}))
        )
    assert _entries(tmp_path) == []


def test_writing_a_non_tensor_state_dict_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="state_dict"):
        write_model_dir(tmp_path / "m", _config(), {"input_layer.weight": [[0.0]]})  # type: ignore[dict-item]
    assert _entries(tmp_path) == []


def test_failure_mid_write_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def save_half_then_fail(tensors: dict[str, Tensor], filename: str, **_: Any) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(modeldir, "save_file", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_model_dir(tmp_path / "m", _config(), _weights())
    assert _entries(tmp_path) == []


def test_failure_in_the_final_check_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = modeldir.save_file

    def save_then_corrupt(tensors: dict[str, Tensor], filename: str, **kwargs: Any) -> None:
        real_save(tensors, filename, **kwargs)
        with open(filename, "r+b") as handle:  # corrupt after the digest could be taken
            handle.seek(0)
            handle.write(b"\xff" * 8)

    monkeypatch.setattr(modeldir, "save_file", save_then_corrupt)
    with pytest.raises(ModelDirError):
        write_model_dir(tmp_path / "m", _config(), _weights())
    assert _entries(tmp_path) == []


def test_existing_destination_needs_overwrite(model_dir: Path) -> None:
    before = (model_dir / WEIGHTS_FILE).read_bytes()
    with pytest.raises(ModelDirError, match="already exists"):
        write_model_dir(model_dir, _config(), _weights(seed=1))
    assert (model_dir / WEIGHTS_FILE).read_bytes() == before

    write_model_dir(model_dir, _config(), _weights(seed=1), overwrite=True)
    assert (model_dir / WEIGHTS_FILE).read_bytes() != before
    assert _entries(model_dir.parent) == ["1"]
    loaded = load_model_dir(model_dir)
    assert torch.equal(
        loaded.net.state_dict()["input_layer.weight"], _weights(seed=1)["input_layer.weight"]
    )


def test_failed_overwrite_keeps_the_old_version(model_dir: Path) -> None:
    before = (model_dir / WEIGHTS_FILE).read_bytes()
    weights = _weights(seed=1)
    weights["output_layer.bias"][0] = float("inf")
    with pytest.raises(ModelDirError):
        write_model_dir(model_dir, _config(), weights, overwrite=True)
    assert (model_dir / WEIGHTS_FILE).read_bytes() == before
    assert _entries(model_dir.parent) == ["1"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("format_version", 2),
        ("name", "../escape"),
        ("name", ""),
        ("sample_shape", [3]),
        ("sample_shape", "2"),
        ("parameterization", "epsilon"),
        ("parameterization", "noise"),  # singular at t=0 on the linear path of this config
        ("path", {"kind": "cosine"}),
        ("path", {"kind": "vp", "beta_min": -1.0}),
        ("num_classes", 3),
        ("default_solver", "dopri5"),
        ("default_num_steps", 0),
        ("default_num_steps", 1001),
        ("default_num_steps", 2.5),
        ("dataset", 7),
        ("training", [1, 2]),
        ("sha256", {"../model.safetensors": "0" * 64}),
        ("sha256", {WEIGHTS_FILE: "abc"}),
        ("architecture", {"kind": "resnet", "kwargs": {}}),
        ("architecture", {"kind": "time_mlp", "kwargs": {"dim": 2, "widht": 8}}),
    ],
)
def test_bad_config_field_is_named(model_dir: Path, field: str, value: object) -> None:
    _rewrite_config(model_dir, lambda d: d.__setitem__(field, value))
    with pytest.raises(ModelDirError, match=f"'{field}'"):
        load_model_dir(model_dir)


def test_missing_and_unknown_config_fields(model_dir: Path) -> None:
    _rewrite_config(model_dir, lambda d: d.pop("default_solver"))
    with pytest.raises(ModelDirError, match="'default_solver': is required"):
        read_config(model_dir)
    _rewrite_config(model_dir, lambda d: d.update(default_solver="heun", colour="blue"))
    with pytest.raises(ModelDirError, match="unknown fields \\['colour'\\]"):
        read_config(model_dir)


def test_constructing_a_bad_config_raises_value_error() -> None:
    with pytest.raises(ValueError, match="'default_num_steps'"):
        _config(default_num_steps=-3)


def test_velocity_fn_of_a_velocity_model_is_the_net(model_dir: Path) -> None:
    loaded = load_model_dir(model_dir)
    x, t = torch.randn(5, 2), torch.rand(5)
    expected = loaded.net(x, t, torch.zeros(5, dtype=torch.int64))
    torch.testing.assert_close(loaded.velocity_fn()(x, t), expected, rtol=0, atol=0)


def test_velocity_fn_converts_noise_predictions_on_the_vp_path(tmp_path: Path) -> None:
    config = _config(path=VPPath().to_dict(), parameterization="noise")
    write_model_dir(tmp_path / "m", config, _weights())
    loaded = load_model_dir(tmp_path / "m")
    x, t = torch.randn(5, 2), torch.rand(5) * 0.9 + 0.05
    eps_hat = loaded.net(x, t, torch.zeros(5, dtype=torch.int64))
    # Independent closed form of the VP schedule (DESIGN.md): s = eps + (1 - eps)(1 - t),
    # alpha = exp(-B(s)/2) with B(s) = beta_min s + (beta_max - beta_min) s^2 / 2.
    beta_min, beta_max, eps = 0.1, 20.0, 1e-3
    s = (eps + (1 - eps) * (1 - t.double())).unsqueeze(1)
    alpha = torch.exp(-0.5 * (beta_min * s + 0.5 * (beta_max - beta_min) * s**2))
    sigma = torch.sqrt(1 - alpha**2)
    d_alpha = 0.5 * (1 - eps) * (beta_min + (beta_max - beta_min) * s) * alpha
    d_sigma = -alpha * d_alpha / sigma
    x1_hat = (x.double() - sigma * eps_hat.double()) / alpha
    expected = d_alpha * x1_hat + d_sigma * eps_hat.double()
    # float32 arithmetic against a float64 reference; 1/alpha reaches ~150 at t=0.05.
    torch.testing.assert_close(loaded.velocity_fn()(x, t).double(), expected, rtol=1e-4, atol=1e-4)


def test_velocity_fn_guidance_combines_conditional_and_null_rows(tmp_path: Path) -> None:
    write_model_dir(tmp_path / "m", _config(COND_MLP), _weights(COND_MLP))
    loaded = load_model_dir(tmp_path / "m")
    x, t = torch.randn(4, 2), torch.rand(4)
    labels = torch.tensor([0, 1, 2, 1])
    v_cond = loaded.net(x, t, labels)
    v_null = loaded.net(x, t, torch.full((4,), 3))
    for scale in (1.0, 2.5):
        expected = v_null + scale * (v_cond - v_null)
        # The guided call runs both halves in one batch: float32 batch-size rounding only.
        torch.testing.assert_close(
            loaded.velocity_fn(labels, scale)(x, t), expected, rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(loaded.velocity_fn()(x, t), v_null, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("labels", "scale", "needle"),
    [
        (torch.tensor([4]), 1.0, "class_labels"),
        (torch.tensor([-1]), 1.0, "class_labels"),
        (torch.tensor([0.5]), 1.0, "class_labels"),
        (torch.tensor([1]), float("nan"), "guidance_scale"),
    ],
)
def test_velocity_fn_rejects_bad_arguments(
    tmp_path: Path, labels: Tensor, scale: float, needle: str
) -> None:
    write_model_dir(tmp_path / "m", _config(COND_MLP), _weights(COND_MLP))
    loaded = load_model_dir(tmp_path / "m")
    with pytest.raises(ValueError, match=needle):
        loaded.velocity_fn(labels, scale)


def test_unconditional_model_rejects_guidance(model_dir: Path) -> None:
    loaded = load_model_dir(model_dir)
    with pytest.raises(ValueError, match="guidance_scale"):
        loaded.velocity_fn(None, 2.0)
    with pytest.raises(ValueError, match="unconditional"):
        loaded.velocity_fn(torch.tensor([0]))
