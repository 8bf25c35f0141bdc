"""Every backend agrees with the eager network within its proven parity, alone and in the engine.

The exported files come from export/ itself (export.torchscript, export.onnx_network) for a tiny
conditional model, plus any model in model_store/ that ships exports. The bound for a file is the
`tolerance` its manifest.json records when there is one, else the export issue's bounds
(export.model_export.TOLERANCES: torchscript 1e-6, onnx 1e-5).

The triton-fused backend needs CUDA; without it its fused updates still run here through
triton's interpreter (TRITON_INTERPRET=1, set before triton is imported, as
tests/test_triton_kernels.py does), and the CUDA check is skipped with its reason.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from export.contract import MANIFEST_FILE, ONNX_FILE, TORCHSCRIPT_FILE
from export.manifest import read_manifest
from export.model_export import TOLERANCES
from export.onnx_network import export_network_onnx
from export.torchscript import save_torchscript
from flows.nets import NetSpec
from flowserve.modeldir import LoadedModel, ModelConfig, build_net, load_model_dir, write_model_dir
from server.engine import Engine, EngineConfig, SampleJob, ServedModel, load_backend
from server.engine.backends import EagerBackend, TritonFusedBackend
from tests.test_engine_support import WAIT_SECONDS, running_engine

REPO_ROOT = Path(__file__).resolve().parents[1]
FILES = {"torchscript": TORCHSCRIPT_FILE, "onnxruntime": ONNX_FILE}
MANIFEST_FORMATS = {"torchscript": TORCHSCRIPT_FILE, "onnxruntime": ONNX_FILE}
BOUND_KEYS = {"torchscript": "torchscript", "onnxruntime": "onnx"}
# A sampled trajectory accumulates one parity error per evaluation; export bounds its own
# sampler at 1e-4 for O(1) samples (export.model_export.SAMPLER_TOLERANCE), and so do we.
SAMPLE_TOL = 1e-4


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny conditional model directory with model.ts and model.onnx written by export/."""
    config = ModelConfig(
        name="tiny",
        architecture=NetSpec("time_mlp", {"dim": 3, "hidden": 16, "depth": 2, "num_classes": 2}),
        sample_shape=(3,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=2,
        default_solver="heun",
        default_num_steps=8,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("store") / "tiny" / "1"
    write_model_dir(directory, config, build_net(config).state_dict())
    net = load_model_dir(directory).net
    save_torchscript(net, directory / TORCHSCRIPT_FILE)
    (directory / ONNX_FILE).write_bytes(export_network_onnx(net, (3,)).SerializeToString())
    return directory


def _shipped_dirs() -> list[Path]:
    store = REPO_ROOT / "model_store"
    if not store.is_dir():
        return []
    return sorted(
        d
        for d in store.glob("*/*")
        if d.is_dir() and d.name.isdigit() and (d / MANIFEST_FILE).is_file()
    )


def _bound(directory: Path, kind: str) -> float:
    """The file's recorded parity tolerance, else the export issue's bound."""
    manifest_path = directory / MANIFEST_FILE
    if manifest_path.is_file():
        entry = read_manifest(manifest_path).file(MANIFEST_FORMATS[kind])
        if "tolerance" in entry.parity:
            return float(entry.parity["tolerance"])
    return TOLERANCES[BOUND_KEYS[kind]]


def _inputs(loaded: LoadedModel, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (rows, *loaded.config.sample_shape)
    x = torch.randn(shape, generator=generator)
    t = torch.rand(rows, generator=generator)
    labels = torch.randint(0, loaded.config.num_classes + 1, (rows,), generator=generator)
    return x, t, labels


def _check_parity(directory: Path, kind: str) -> None:
    loaded = load_model_dir(directory)
    backend = load_backend(kind, directory, loaded, "cpu")
    assert backend.name == kind and backend.supports_autograd is False
    eager = load_backend("eager", directory, loaded, "cpu")
    # Batch sizes the engine's buckets produce, and an odd one.
    for rows in (1, 7, 64):
        x, t, labels = _inputs(loaded, rows)
        with torch.no_grad():
            expected = eager(x, t, labels)
            got = backend(x, t, labels)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=_bound(directory, kind), rtol=0)


@pytest.mark.parametrize("kind", ["torchscript", "onnxruntime"])
def test_exported_backends_agree_with_eager(exported_dir: Path, kind: str) -> None:
    _check_parity(exported_dir, kind)


@pytest.mark.parametrize("directory", _shipped_dirs(), ids=lambda d: f"{d.parent.name}-{d.name}")
@pytest.mark.parametrize("kind", ["torchscript", "onnxruntime"])
def test_shipped_exports_agree_with_eager(directory: Path, kind: str) -> None:
    # Every shipped model carries its exports (`make models` writes them).
    assert (directory / FILES[kind]).is_file(), f"{directory} ships no {FILES[kind]}"
    _check_parity(directory, kind)


@pytest.mark.parametrize("kind", ["torchscript", "onnxruntime"])
def test_engine_samples_through_each_backend_like_eager(exported_dir: Path, kind: str) -> None:
    loaded = load_model_dir(exported_dir)
    eager = EagerBackend(loaded.net)
    other = load_backend(kind, exported_dir, loaded, "cpu")
    labels = torch.tensor([0, 1, 1, 0])
    results = []
    for backend in (eager, other):
        model = ServedModel("tiny", 1, loaded.config, backend, eager)
        job = SampleJob(model, 4, 6, "heun", seed=3, class_labels=labels, guidance_scale=1.5)
        with running_engine() as engine:
            results.append(engine.submit(job).future.result(WAIT_SECONDS).samples)
    torch.testing.assert_close(results[1], results[0], atol=SAMPLE_TOL, rtol=0)


def test_load_backend_rejects_unknown_kinds_missing_files_and_cpu_triton(tmp_path: Path) -> None:
    config = ModelConfig(
        name="bare",
        architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 8, "depth": 1}),
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=0,
        default_solver="euler",
        default_num_steps=4,
    )
    directory = tmp_path / "bare" / "1"
    write_model_dir(directory, config, build_net(config).state_dict())
    loaded = load_model_dir(directory)
    with pytest.raises(ValueError, match="kind must be one of"):
        load_backend("tensorrt", directory, loaded, "cpu")
    with pytest.raises(ValueError, match=r"model\.onnx"):
        load_backend("onnxruntime", directory, loaded, "cpu")
    with pytest.raises(ValueError, match=r"model\.ts"):
        load_backend("torchscript", directory, loaded, "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        load_backend("triton-fused", directory, loaded, "cpu")


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "euler_maruyama"])
def test_fused_updates_match_torch_updates_under_the_interpreter(
    exported_dir: Path, solver: str
) -> None:
    kernels = pytest.importorskip("export.triton_kernels", reason="triton is not installed")
    from server.engine.updaters import TritonUpdater

    loaded = load_model_dir(exported_dir)
    eager = EagerBackend(loaded.net)
    fused = TritonFusedBackend(loaded.net, TritonUpdater(kernels, allow_cpu=True))
    results = []
    for backend in (eager, fused):
        model = ServedModel("tiny", 1, loaded.config, backend, eager)
        job = SampleJob(model, 5, 4, solver, seed=8, class_labels=torch.tensor([0, 1, 2, 1, 0]))
        with running_engine() as engine:
            results.append(engine.submit(job).future.result(WAIT_SECONDS).samples)
    # The kernels do the updates' float32 operations (possibly fused multiply-adds), so they
    # differ from torch by about an ulp per step; 4 steps of O(1) values stay far below 1e-5.
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


_CUDA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from flowserve.modeldir import load_model_dir
    from server.engine import EngineConfig, Engine, SampleJob, ServedModel, load_backend

    directory = Path(sys.argv[1])
    loaded = load_model_dir(directory)
    samples = []
    for kind in ("eager", "triton-fused"):
        backend = load_backend(kind, directory, loaded, "cuda")
        model = ServedModel("tiny", 1, loaded.config, backend, backend)
        engine = Engine(EngineConfig(device="cuda"))
        engine.start()
        try:
            for solver in ("heun", "euler_maruyama"):
                job = SampleJob(model, 64, 20, solver, seed=1)
                samples.append(engine.submit(job).future.result(120).samples)
        finally:
            engine.shutdown()
    for got, expected in zip(samples[2:], samples[:2]):
        error = (got - expected).abs().max().item()
        assert error <= 1e-5, error
    print("ok")
    """
)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="triton-fused needs a CUDA GPU")
def test_triton_fused_backend_on_cuda_matches_eager(exported_dir: Path) -> None:
    # A fresh process without TRITON_INTERPRET, so the kernels are compiled for the GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, "-c", _CUDA_SCRIPT, str(exported_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout.strip().endswith("ok")


def test_engine_config_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(policy="fifo")
    with pytest.raises(ValueError, match="batch_buckets"):
        EngineConfig(max_rows_per_call=64, batch_buckets=(1, 2, 4))
    with pytest.raises(ValueError, match="max_rows_per_call"):
        EngineConfig(max_rows_per_call=1, batch_buckets=(1,))
    with pytest.raises(ValueError, match="config"):
        Engine("fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        Engine(EngineConfig(device="abacus"))
