"""TorchScript export of a network: `torch.jit.script`, so the archive carries its own code.

A scripted module reloads with `torch.jit.load` in a process that never imports flowserve (the
server's torchscript backend, or TorchServe), which a traced module would also do; scripting is
chosen because it keeps the `class_labels` branch of conditional nets as code rather than a
trace of one input.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from export.contract import INPUT_NAMES


def script_network(net: nn.Module) -> torch.jit.ScriptModule:
    """Script a network with `forward(x, t, class_labels) -> prediction`.

    Args:
        net: The network; it is put in eval mode.

    Returns:
        The scripted module (frozen weights, eval mode).

    Raises:
        ValueError: `net` is not an `nn.Module` or its forward does not take the contract's
            inputs.
    """
    if not isinstance(net, nn.Module):
        raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    net.eval()
    scripted = torch.jit.script(net)
    schema = scripted.forward.schema  # type: ignore[attr-defined]
    argument_names = [argument.name for argument in schema.arguments][1:]
    if tuple(argument_names) != INPUT_NAMES:
        raise ValueError(f"net.forward must take {INPUT_NAMES}, got {tuple(argument_names)}")
    return scripted


def save_torchscript(net: nn.Module, dest: str | os.PathLike[str]) -> None:
    """Script `net` and save it to `dest` (a `torch.jit.load`-able archive).

    Args:
        net: The network, `forward(x (batch, *sample_shape), t (batch,), class_labels (batch,))`.
        dest: Output file path.
    """
    torch.jit.save(script_network(net), os.fspath(dest))


def load_torchscript(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """Load a TorchScript archive on the CPU (TorchScript archives hold no pickled Python)."""
    module: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
        os.fspath(path), map_location="cpu"
    )
    return module
