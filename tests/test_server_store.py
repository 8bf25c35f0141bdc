"""The model store manager: which version serves, what is skipped and why, lookups."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from export.model_export import SAMPLER_TOLERANCE
from flows.solvers import sample
from flowserve.modeldir import load_model_dir
from server.config import StoreConfig
from server.errors import ModelNotFound
from server.store import ModelStore, StoreError

STORE_LOGGER = "server.store"


def _copy(tiny_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_store, tmp_path / "store"))


def test_highest_valid_version_serves_and_invalid_ones_are_logged(
    tiny_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        store = ModelStore.load(StoreConfig(path=tiny_store), "cpu")
    assert store.names() == ("toy2d", "toycond", "toyvp")
    toy2d = store.get("toy2d")
    assert toy2d.version == 2 and not toy2d.pinned
    assert toy2d.versions == (1, 2)  # 3 has corrupted weights
    assert toy2d.available_backends == ("eager",)
    assert "toy2d/3" in caplog.text and "sha256 mismatch" in caplog.text
    assert "toy2d/latest: not a positive integer version" in caplog.text


def test_served_backend_is_the_stored_network(tiny_store: Path) -> None:
    entry = ModelStore.load(StoreConfig(path=tiny_store), "cpu").get("toycond")
    reference = load_model_dir(tiny_store / "toycond" / "1")  # independent load of the same files
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0, 1, 5)
    labels = torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        expected = reference.net(x, t, labels)
        # Same weights, same inputs, same kernels: bit-identical.
        torch.testing.assert_close(entry.model.backend(x, t, labels), expected, rtol=0, atol=0)
        torch.testing.assert_close(entry.model.eager(x, t, labels), expected, rtol=0, atol=0)


def test_serving_json_pins_a_version(tiny_store: Path, tmp_path: Path) -> None:
    root = _copy(tiny_store, tmp_path)
    (root / "toy2d" / "serving.json").write_text('{"version": 1}')
    entry = ModelStore.load(StoreConfig(path=root), "cpu").get("toy2d")
    assert (entry.version, entry.pinned) == (1, True)
    assert entry.directory == root / "toy2d" / "1"


@pytest.mark.parametrize(
    ("pin", "reason"),
    [
        ('{"version": 3}', "pins version 3, valid versions are [1, 2, 3]"),
        ('{"version": 7}', "pins version 7"),
        ('{"version": "2"}', 'must be {"version": N}'),
        ("not json", "unreadable"),
    ],
)
def test_a_bad_pin_takes_the_model_out_of_service(
    tiny_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, pin: str, reason: str
) -> None:
    root = _copy(tiny_store, tmp_path)
    (root / "toy2d" / "serving.json").write_text(pin)
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        store = ModelStore.load(StoreConfig(path=root), "cpu")
    # A broken pin is never silently replaced by another version.
    assert "toy2d" not in store.names()
    assert "toycond" in store.names()
    assert reason in caplog.text or "no version loads" in caplog.text


def test_a_version_naming_another_model_is_skipped(
    tiny_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(tiny_store, tmp_path)
    shutil.copytree(root / "toycond" / "1", root / "toy2d" / "9")
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        entry = ModelStore.load(StoreConfig(path=root), "cpu").get("toy2d")
    assert entry.version == 2
    assert "config.json names model 'toycond', the directory 'toy2d'" in caplog.text


def test_missing_export_falls_back_to_eager(
    tiny_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        store = ModelStore.load(StoreConfig(path=tiny_store, backend="onnxruntime"), "cpu")
    assert {entry.model.backend.name for entry in store.entries()} == {"eager"}
    assert "backend onnxruntime unavailable" in caplog.text


def test_lookups(tiny_store: Path) -> None:
    store = ModelStore.load(StoreConfig(path=tiny_store), "cpu")
    assert store.get("toy2d", 2).version == 2
    with pytest.raises(ModelNotFound, match=r"'nope' is not served \(served models: toy2d"):
        store.get("nope")
    with pytest.raises(ModelNotFound, match="version 1 exists but is not loaded"):
        store.get("toy2d", 1)
    with pytest.raises(ModelNotFound, match="version 5 does not exist"):
        store.get("toy2d", 5)


def test_missing_store_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is not a directory"):
        ModelStore.load(StoreConfig(path=tmp_path / "absent"), "cpu")


def _shipped_moons(tmp_path: Path) -> Path:
    """A store holding a copy of the shipped `moons` model with its exports."""
    shipped = Path(__file__).resolve().parents[1] / "model_store" / "moons"
    return Path(shutil.copytree(shipped, tmp_path / "store" / "moons")).parent


def test_whole_loop_sampler_is_loaded_only_for_onnxruntime_on_cpu(tmp_path: Path) -> None:
    root = _shipped_moons(tmp_path)
    onnx = ModelStore.load(StoreConfig(path=root, backend="onnxruntime"), "cpu").get("moons")
    eager = ModelStore.load(StoreConfig(path=root, backend="eager"), "cpu").get("moons")
    assert eager.model.whole_loop is None
    sampler = onnx.model.whole_loop
    assert sampler is not None and sampler.solvers == {"euler", "heun"}
    # It integrates the stored network: compare with the reference solver on the eager copy.
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    expected = sample(load_model_dir(root / "moons" / "1").velocity_fn(), x0, 10, "heun")
    actual = sampler(x0, 10, "heun", torch.zeros(3, dtype=torch.int64), torch.ones(3))
    # export's sampler tolerance: 1e-4 at O(1) samples (one rounding difference per step).
    assert float((actual - expected).abs().max()) <= SAMPLER_TOLERANCE * max(
        1.0, float(expected.abs().max())
    )


def test_an_unloadable_whole_loop_sampler_is_skipped_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _shipped_moons(tmp_path)
    (root / "moons" / "1" / "sampler.onnx").write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        entry = ModelStore.load(StoreConfig(path=root, backend="onnxruntime"), "cpu").get("moons")
    assert entry.model.backend.name == "onnxruntime" and entry.model.whole_loop is None
    assert "sampler.onnx unusable" in caplog.text and "serving step by step" in caplog.text
