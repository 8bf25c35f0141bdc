"""TorchScript export: parity with eager, and loading in a process that cannot import flowserve."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from export.parity import parity_inputs
from export.torchscript import load_torchscript, save_torchscript, script_network
from flows.nets import NetSpec, build_net

REPO_ROOT = Path(__file__).resolve().parents[1]
# TorchScript runs the same ATen kernels as eager; 1e-6 leaves room for a fused op ordering.
TS_ATOL = 1e-6
SPECS = [
    NetSpec("time_mlp", {"dim": 2, "hidden": 32, "depth": 2}),
    NetSpec("time_mlp", {"dim": 3, "hidden": 32, "depth": 2, "num_classes": 4}),
    NetSpec("conv_unet8", {"channels": 1, "width": 8, "num_classes": 3}),
]


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _net(spec: NetSpec) -> nn.Module:
    torch.manual_seed(0)
    return build_net(spec).eval()


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: f"{spec.kind}-{spec.num_classes}")
def test_saved_module_matches_eager(spec: NetSpec, tmp_path: Path) -> None:
    net = _net(spec)
    save_torchscript(net, tmp_path / "model.ts")
    loaded = load_torchscript(tmp_path / "model.ts")
    inputs = parity_inputs(spec.sample_shape, spec.num_classes, 128, seed=1)
    with torch.no_grad():
        expected = net(inputs.x, inputs.t, inputs.class_labels)
        actual = loaded(inputs.x, inputs.t, inputs.class_labels)
        single = loaded(inputs.x[:1], inputs.t[:1], inputs.class_labels[:1])  # batch is dynamic
    torch.testing.assert_close(actual, expected, atol=TS_ATOL, rtol=0)
    torch.testing.assert_close(single, expected[:1], atol=TS_ATOL, rtol=0)


def test_loads_in_a_process_that_cannot_import_the_project(tmp_path: Path) -> None:
    """A fresh interpreter, repository off sys.path and editable-install finders removed."""
    spec = SPECS[1]
    net = _net(spec)
    save_torchscript(net, tmp_path / "model.ts")
    inputs = parity_inputs(spec.sample_shape, spec.num_classes, 64, seed=2)
    with torch.no_grad():
        expected = net(inputs.x, inputs.t, inputs.class_labels)
    save_file(
        {"x": inputs.x, "t": inputs.t, "class_labels": inputs.class_labels, "expected": expected},
        str(tmp_path / "io.safetensors"),
    )
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        repo = {str(REPO_ROOT)!r}
        # Keep the environment's site-packages (the venv may live inside the repository).
        sys.path[:] = [p for p in sys.path
                       if p and (not p.startswith(repo) or p.startswith(sys.prefix))]
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        project = ("flows", "export", "flowserve", "server", "training")
        reachable = [name for name in project if importlib.util.find_spec(name) is not None]
        import torch
        from safetensors.torch import load_file
        io = load_file("io.safetensors")
        module = torch.jit.load("model.ts")
        with torch.no_grad():
            out = module(io["x"], io["t"], io["class_labels"])
        imported = sorted({{m.split(".")[0] for m in sys.modules}} & set(project))
        print(json.dumps({{"reachable": reachable, "imported": imported,
                           "error": float((out - io["expected"]).abs().max())}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["reachable"] == []  # the project really was out of reach
    assert report["imported"] == []
    assert report["error"] <= TS_ATOL


def test_script_network_rejects_non_modules() -> None:
    with pytest.raises(ValueError, match=r"net must be a torch\.nn\.Module"):
        script_network(lambda x, t, labels: x)  # type: ignore[arg-type]
