"""Sampling requests for the TorchServe handler: parse, validate, sample. No TorchServe imports.

A request is a JSON object:

    {"num_samples": 16, "num_steps": 0, "seed": 7, "solver": "heun",
     "class_labels": [3], "guidance_scale": 2.0}

`num_samples` is required; `num_steps` 0 or absent means the model's default; `seed` absent
means a fresh random seed (reported in the response); `solver` absent means the model's
default; `class_labels` empty, one for all rows, or one per row; `guidance_scale` 0 or absent
means 1. The initial noise is `torch.randn((num_samples, *sample_shape), generator)` with a CPU
generator seeded by `seed`, so a seed fixes the samples. Euler-Maruyama draws its Brownian
increments from the same generator after the initial noise.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flows.solvers import ODE_SOLVERS, SOLVERS, sample, sample_gaussian_sde
from flowserve.modeldir import LoadedModel, load_model_dir

MAX_NUM_SAMPLES = 65_536
MAX_NUM_STEPS = 1_000
_FIELDS = ("num_samples", "num_steps", "seed", "solver", "class_labels", "guidance_scale")


@dataclass(frozen=True)
class SampleSpec:
    """A validated sampling request.

    Attributes:
        num_samples: Rows to sample, in [1, MAX_NUM_SAMPLES].
        num_steps: Solver steps, in [1, MAX_NUM_STEPS] (defaults resolved).
        seed: Seed of the noise generator, in [0, 2**63).
        solver: One of `flows.solvers.SOLVERS`.
        class_labels: One label per row (empty for unconditional models).
        guidance_scale: Classifier-free guidance weight (1 = plain conditional).
    """

    num_samples: int
    num_steps: int
    seed: int
    solver: str
    class_labels: tuple[int, ...]
    guidance_scale: float


def _int_field(data: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def decode_body(body: object) -> Mapping[str, Any]:
    """Decode a request body (JSON bytes or text, or an already decoded object)."""
    if isinstance(body, bytes | bytearray):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"request body must be UTF-8 JSON ({error})") from error
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as error:
            raise ValueError(f"request body must be a JSON object ({error})") from error
    if not isinstance(body, Mapping):
        raise ValueError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_request(body: object, model: LoadedModel) -> SampleSpec:
    """Validate a request against a model.

    Args:
        body: The JSON request (see the module docstring).
        model: The model it is for (defaults, classes).

    Returns:
        The request with every default resolved.

    Raises:
        ValueError: naming the first bad field and its allowed values.
    """
    data = decode_body(body)
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown request fields {unknown}; allowed: {list(_FIELDS)}")
    config = model.config
    if "num_samples" not in data:
        raise ValueError("num_samples is required")
    num_samples = _int_field(data, "num_samples", 0, 1, MAX_NUM_SAMPLES)
    num_steps = _int_field(data, "num_steps", 0, 0, MAX_NUM_STEPS) or config.default_num_steps
    seed = data.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**63)
    seed = _int_field({"seed": seed}, "seed", 0, 0, 2**63 - 1)
    solver = data.get("solver") or config.default_solver
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    labels = _labels(data.get("class_labels", []), num_samples, config.num_classes)
    scale = data.get("guidance_scale", 0.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite number, got {scale!r}")
    scale = float(scale) or 1.0
    if config.num_classes == 0 and scale != 1.0:
        raise ValueError("guidance_scale must be 0 or 1 for an unconditional model")
    return SampleSpec(num_samples, num_steps, seed, solver, labels, scale)


def _labels(raw: object, num_samples: int, num_classes: int) -> tuple[int, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ValueError(f"class_labels must be a list of ints, got {raw!r}")
    if num_classes == 0:
        if raw:
            raise ValueError("class_labels must be empty for an unconditional model")
        return ()
    if len(raw) not in (0, 1, num_samples):
        raise ValueError(
            f"class_labels must be empty, one label, or {num_samples} labels, got {len(raw)}"
        )
    for label in raw:
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= num_classes:
            raise ValueError(
                f"class_labels must be ints in [0, {num_classes}] ({num_classes} = null), "
                f"got {label!r}"
            )
    if not raw:
        return (num_classes,) * num_samples  # no label: the unconditional (null) class
    if len(raw) == 1:
        return (int(raw[0]),) * num_samples
    return tuple(int(label) for label in raw)


def initial_noise(spec: SampleSpec, sample_shape: Sequence[int]) -> tuple[Tensor, torch.Generator]:
    """The request's x_0 `(num_samples, *sample_shape)` and the generator after drawing it."""
    generator = torch.Generator().manual_seed(spec.seed)
    return torch.randn((spec.num_samples, *sample_shape), generator=generator), generator


def run_sample(model: LoadedModel, spec: SampleSpec) -> Tensor:
    """Samples at t=1, `(num_samples, *sample_shape)`, from `flows.solvers`."""
    x0, generator = initial_noise(spec, model.config.sample_shape)
    labels = torch.tensor(spec.class_labels, dtype=torch.int64) if spec.class_labels else None
    velocity_fn = model.velocity_fn(labels, spec.guidance_scale)
    if spec.solver in ODE_SOLVERS:
        return sample(velocity_fn, x0, spec.num_steps, spec.solver)
    return sample_gaussian_sde(
        velocity_fn, x0, spec.num_steps, model.config.gaussian_path, generator
    )


class SamplingService:
    """A loaded model answering JSON sampling requests.

    Args:
        model_dir: A model directory (as unpacked by TorchServe from the archive).
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.model = load_model_dir(model_dir, verify=True)

    def handle(self, body: object) -> dict[str, Any]:
        """Answer one request.

        Returns:
            `{"model", "samples" (nested lists), "shape", "seed", "num_steps", "solver"}`.

        Raises:
            ValueError: a bad request (the message names the field).
        """
        spec = parse_request(body, self.model)
        samples = run_sample(self.model, spec)
        return {
            "model": self.model.config.name,
            "samples": samples.tolist(),
            "shape": list(samples.shape),
            "seed": spec.seed,
            "num_steps": spec.num_steps,
            "solver": spec.solver,
        }
