"""Backends: one network behind `(x, t, class_labels) -> prediction`, however it is executed.

`load_backend(kind, model_dir, loaded, device)` builds one per model from configuration:

- "eager": the torch module rebuilt from model.safetensors (autograd-capable; the likelihood
  lane always uses it).
- "torchscript": `model.ts` through `torch.jit.load` (a TorchScript archive holds no pickles).
- "onnxruntime": `model.onnx` in an onnxruntime session: the CUDA provider when onnxruntime-gpu
  and a GPU are present and the device is CUDA, else the CPU provider.
- "triton-fused": the eager network on CUDA plus export's fused Triton update kernels, which the
  engine picks up through the backend's `updater` (CUDA only; triton is imported lazily).

Every backend returns a fresh tensor on the engine's device that the caller owns.

`load_whole_loop_sampler(model_dir)` opens `sampler.onnx`, the whole fixed-step loop in one ONNX
graph, which the engine runs for lone small requests on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.contract import (
    INPUT_NAMES,
    ONNX_FILE,
    OUTPUT_NAME,
    SAMPLER_FILE,
    SAMPLER_INPUT_NAMES,
    SAMPLER_SOLVER_CODES,
    TORCHSCRIPT_FILE,
)
from export.onnx_runtime import session_options
from export.parity import run_sampler
from server.engine.api import Backend
from server.engine.updaters import StateUpdater, TritonUpdater

if TYPE_CHECKING:
    from flowserve.modeldir import LoadedModel

BACKEND_KINDS: tuple[str, ...] = ("eager", "torchscript", "onnxruntime", "triton-fused")


class EagerBackend:
    """A torch module called directly; gradients flow when the caller enables them.

    Args:
        net: `forward(x, t, class_labels) -> prediction`, already on its device.
    """

    name = "eager"
    supports_autograd = True

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        """Evaluate on `(batch, *sample_shape)`, `(batch,)`, `(batch,)`."""
        prediction: Tensor = self.net(x, t, class_labels)
        return prediction


class TorchScriptBackend:
    """A TorchScript archive (`model.ts`).

    Args:
        path: The archive.
        device: Where to run it.
    """

    name = "torchscript"
    supports_autograd = False

    def __init__(self, path: Path, device: torch.device) -> None:
        self.module = torch.jit.load(os.fspath(path), map_location=device)  # type: ignore[no-untyped-call]
        self.module.eval()

    def __call__(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        """Evaluate on `(batch, *sample_shape)`, `(batch,)`, `(batch,)`."""
        prediction: Tensor = self.module(x, t, class_labels)
        return prediction


class OnnxRuntimeBackend:
    """An ONNX model (`model.onnx`) in an onnxruntime session.

    Args:
        path: The model file (inputs `x`, `t`, `class_labels`; output `prediction`).
        device: The engine's device; CUDA uses the CUDA execution provider when available.
        threads: Intra-op threads of the session.
    """

    name = "onnxruntime"
    supports_autograd = False

    def __init__(self, path: Path, device: torch.device, threads: int = 1) -> None:
        self.session = _serving_session(path, device, threads, INPUT_NAMES)
        self.providers = tuple(self.session.get_providers())
        self.device = device

    def __call__(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        """Evaluate on `(batch, *sample_shape)`, `(batch,)`, `(batch,)`."""
        feeds: dict[str, Any] = {
            "x": x.detach().to("cpu", torch.float32).numpy(),
            "t": t.detach().to("cpu", torch.float32).numpy(),
            "class_labels": class_labels.detach().to("cpu", torch.int64).numpy(),
        }
        (prediction,) = self.session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(prediction).to(self.device)


class OnnxWholeLoopSampler:
    """`sampler.onnx` in a one-thread CPU session: the engine's fast path for lone requests.

    One thread because it only serves small batches, where splitting a matmul across cores
    costs more in synchronisation than it saves.

    Args:
        path: The sampler model (inputs `SAMPLER_INPUT_NAMES`, output `x1`).
    """

    solvers = frozenset(SAMPLER_SOLVER_CODES)

    def __init__(self, path: Path) -> None:
        self.session = _serving_session(path, torch.device("cpu"), 1, SAMPLER_INPUT_NAMES)

    def __call__(
        self,
        x0: Tensor,
        num_steps: int,
        solver: str,
        class_labels: Tensor,
        guidance_scale: Tensor,
    ) -> Tensor:
        """Integrate `x0` from t=0 to t=1 in one session call (see `WholeLoopSampler`)."""
        return run_sampler(self.session, x0, num_steps, solver, class_labels, guidance_scale)


def load_whole_loop_sampler(model_dir: Path) -> OnnxWholeLoopSampler:
    """Open `model_dir/sampler.onnx`.

    Raises:
        ValueError: the file is missing or does not have the sampler's inputs.
        Exception: onnxruntime's own error for a graph it cannot load.
    """
    return OnnxWholeLoopSampler(_required_file(Path(model_dir), SAMPLER_FILE, "whole-loop"))


def _serving_session(
    path: Path, device: torch.device, threads: int, input_names: tuple[str, ...]
) -> Any:
    """An onnxruntime session of `path` set up for serving, checked to take `input_names`."""
    # The exporter's options (all graph optimisations, sequential execution), so the session
    # runs as the parity check that produced manifest.json did.
    options = session_options(max(threads, 1))
    # Spinning worker threads would compete with the engine loop for the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(os.fspath(path), options, providers=providers)
    names = tuple(i.name for i in session.get_inputs())
    if set(names) != set(input_names):
        raise ValueError(f"{path}: inputs must be {input_names}, got {names}")
    return session


class TritonFusedBackend(EagerBackend):
    """The eager network on CUDA with export's fused Triton kernels for the solver updates.

    Args:
        net: The network, already on the CUDA device.
        updater: The fused-kernel updater the engine uses for this model's row groups.
    """

    name = "triton-fused"

    def __init__(self, net: nn.Module, updater: StateUpdater) -> None:
        super().__init__(net)
        self.updater = updater


def load_backend(kind: str, model_dir: Path, loaded: LoadedModel, device: str) -> Backend:
    """Build the backend `kind` for one model version.

    Args:
        kind: One of BACKEND_KINDS.
        model_dir: The version's directory (`model.ts` / `model.onnx` are read from it).
        loaded: The model rebuilt from config.json + model.safetensors.
        device: Torch device string ("cpu", "cuda", "cuda:1").

    Returns:
        The backend.

    Raises:
        ValueError: `kind` is unknown, its file is missing, or it cannot run on `device`.
    """
    if kind not in BACKEND_KINDS:
        raise ValueError(f"kind must be one of {BACKEND_KINDS}, got {kind!r}")
    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must be a torch device string, got {device!r}") from error
    model_dir = Path(model_dir)
    if kind == "eager":
        return EagerBackend(loaded.net.to(target).eval())
    if kind == "torchscript":
        return TorchScriptBackend(_required_file(model_dir, TORCHSCRIPT_FILE, kind), target)
    if kind == "onnxruntime":
        threads = torch.get_num_threads() if target.type == "cpu" else 1
        return OnnxRuntimeBackend(_required_file(model_dir, ONNX_FILE, kind), target, threads)
    # triton-fused
    if target.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"backend 'triton-fused' needs a CUDA device, got {device!r}")
    try:
        from export import triton_kernels
    except ImportError as error:
        raise ValueError(f"backend 'triton-fused' needs triton ({error})") from error
    return TritonFusedBackend(loaded.net.to(target).eval(), TritonUpdater(triton_kernels))


def _required_file(model_dir: Path, name: str, kind: str) -> Path:
    path = model_dir / name
    if not path.is_file():
        raise ValueError(f"backend {kind!r} needs {path}, which does not exist")
    return path
