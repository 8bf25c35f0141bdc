"""Parity of an exported network or sampler against eager PyTorch.

The figures go into the manifest: the largest absolute difference over a fixed, seeded set of
inputs, with `t` spread evenly over [0, 1] (endpoints included, where conversions are most
sensitive) and labels drawn over every class including the null class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.contract import SAMPLER_SOLVER_CODES
from flows.solvers import sample
from flowserve.modeldir import LoadedModel

PARITY_ROWS = 1024
SAMPLER_PARITY_ROWS = 64


@dataclass(frozen=True)
class ParityInputs:
    """A batch for parity checks.

    Attributes:
        x: float32 `(rows, *sample_shape)`, standard normal.
        t: float32 `(rows,)`, evenly spaced over [0, 1] then shuffled.
        class_labels: int64 `(rows,)` in [0, num_classes] (all 0 when unconditional).
    """

    x: Tensor
    t: Tensor
    class_labels: Tensor


def parity_inputs(
    sample_shape: Sequence[int], num_classes: int, rows: int = PARITY_ROWS, seed: int = 0
) -> ParityInputs:
    """Seeded random network inputs.

    Args:
        sample_shape: Shape of one sample.
        num_classes: Real classes (label `num_classes` is the null class).
        rows: Batch size, >= 2.
        seed: Generator seed.

    Returns:
        The inputs.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 2:
        raise ValueError(f"rows must be an int >= 2, got {rows!r}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, *sample_shape), generator=generator)
    t = torch.linspace(0.0, 1.0, rows)[torch.randperm(rows, generator=generator)]
    class_labels = torch.randint(0, num_classes + 1, (rows,), generator=generator)
    return ParityInputs(x=x, t=t, class_labels=class_labels)


def max_abs_error(actual: Tensor | np.ndarray, expected: Tensor | np.ndarray) -> float:
    """Largest absolute elementwise difference (shapes must match)."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    b = torch.as_tensor(expected, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"actual has shape {tuple(a.shape)}, expected {tuple(b.shape)}")
    return float((a - b).abs().max())


def eager_prediction(net: nn.Module, inputs: ParityInputs) -> Tensor:
    """The eager network's prediction on the parity inputs, `(rows, *sample_shape)`."""
    with torch.no_grad():
        return net(inputs.x, inputs.t, inputs.class_labels)  # type: ignore[no-any-return]


def module_parity(exported: Callable[..., Tensor], net: nn.Module, inputs: ParityInputs) -> float:
    """Max abs error of an exported torch module (e.g. TorchScript) against eager."""
    with torch.no_grad():
        actual = exported(inputs.x, inputs.t, inputs.class_labels)
    return max_abs_error(actual, eager_prediction(net, inputs))


def onnx_network_parity(
    session: ort.InferenceSession, net: nn.Module, inputs: ParityInputs
) -> float:
    """Max abs error of an onnxruntime network session against eager."""
    feeds = {
        "x": inputs.x.numpy(),
        "t": inputs.t.numpy(),
        "class_labels": inputs.class_labels.numpy(),
    }
    (actual,) = session.run(["prediction"], feeds)
    return max_abs_error(actual, eager_prediction(net, inputs))


@dataclass(frozen=True)
class SamplerParity:
    """Sampler-versus-`flows.solvers.sample` figures for one solver.

    Attributes:
        solver: `euler` or `heun`.
        num_steps: Steps of the comparison.
        rows: Samples compared.
        guidance_scale: Guidance used (1 for unconditional models).
        max_abs_error: Largest absolute difference of the samples.
        max_abs_sample: Largest absolute sample value (the scale of the error).
    """

    solver: str
    num_steps: int
    rows: int
    guidance_scale: float
    max_abs_error: float
    max_abs_sample: float


def run_sampler(
    session: ort.InferenceSession,
    x0: Tensor,
    num_steps: int,
    solver: str,
    class_labels: Tensor,
    guidance_scale: Tensor,
) -> Tensor:
    """One call of the exported sampling loop.

    Args:
        session: A `sampler.onnx` session.
        x0: float32 `(batch, *sample_shape)` noise.
        num_steps: Steps, >= 0.
        solver: A key of `SAMPLER_SOLVER_CODES`.
        class_labels: int64 `(batch,)`.
        guidance_scale: float32 `(batch,)`.

    Returns:
        float32 `(batch, *sample_shape)` samples.
    """
    if solver not in SAMPLER_SOLVER_CODES:
        raise ValueError(f"solver must be one of {tuple(SAMPLER_SOLVER_CODES)}, got {solver!r}")
    feeds = {
        "x0": x0.numpy(),
        "num_steps": np.array(num_steps, dtype=np.int64),
        "class_labels": class_labels.numpy(),
        "guidance_scale": guidance_scale.numpy().astype(np.float32),
        "solver": np.array(SAMPLER_SOLVER_CODES[solver], dtype=np.int64),
    }
    (x1,) = session.run(["x1"], feeds)
    return torch.from_numpy(x1)


def sampler_parity(
    session: ort.InferenceSession,
    model: LoadedModel,
    solver: str,
    num_steps: int,
    rows: int = SAMPLER_PARITY_ROWS,
    seed: int = 0,
) -> SamplerParity:
    """Compare the exported loop with `flows.solvers.sample` on the eager model.

    Conditional models are compared with guidance 2 on real classes (both network branches
    matter); unconditional ones with the plain velocity.
    """
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn((rows, *config.sample_shape), generator=generator)
    if config.num_classes > 0:
        labels = torch.randint(0, config.num_classes, (rows,), generator=generator)
        guidance = 2.0
        velocity_fn = model.velocity_fn(labels, guidance)
    else:
        labels = torch.zeros(rows, dtype=torch.int64)
        guidance = 1.0
        velocity_fn = model.velocity_fn()
    expected = sample(velocity_fn, x0, num_steps, solver)
    actual = run_sampler(session, x0, num_steps, solver, labels, torch.full((rows,), guidance))
    return SamplerParity(
        solver=solver,
        num_steps=num_steps,
        rows=rows,
        guidance_scale=guidance,
        max_abs_error=max_abs_error(actual, expected),
        max_abs_sample=float(expected.abs().max()),
    )
