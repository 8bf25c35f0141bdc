"""The training loop: seeded minibatch regression on a Gaussian path, with EMA weights.

`train(config)` is deterministic: one `torch.Generator` seeded with `config.seed` draws the
training set, every minibatch, noise, time and label-dropout decision, and the network is
initialised under a forked, seeded global RNG, so the same seed gives bit-equal weights on the
same machine (and thread count) without touching the caller's RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from flows.nets import NetSpec, build_net
from flows.paths import path_from_dict
from flows.solvers import SOLVERS
from flowserve.modeldir import ModelConfig, ModelDirError
from training.datasets import DATASETS, make_labeled_dataset
from training.ema import EMA
from training.losses import TRAINABLE_PARAMETERIZATIONS, regression_loss

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]

_LOSS_NAMES = {
    "velocity": "conditional flow matching",
    "noise": "denoising score matching (noise prediction, sigma_t^2 weighting)",
    "score": "denoising score matching (score prediction, sigma_t^2 weighting)",
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (lower the learning rate)."""


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _require_float(name: str, value: object, low: float, high: float, open_high: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    if value < low or (value >= high if open_high else value > high):
        bracket = ")" if open_high else "]"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
        dataset: one of `training.datasets.DATASETS`.
        net: the architecture; its sample shape must match the data set's.
        name: model name written to config.json.
        path: `GaussianPath.to_dict()` of the path to train on.
        parameterization: "velocity", "noise" or "score".
        conditional: train class-conditionally with label dropout to the null class.
        steps: optimiser steps.
        batch_size: rows per step.
        lr: peak Adam learning rate (cosine decay to `lr * min_lr_ratio`).
        min_lr_ratio: final learning rate as a fraction of `lr`.
        ema_decay: long-run EMA decay of the shipped weights.
        seed: the run's only source of randomness.
        num_train: size of the fixed training set (digits: at most 1797).
        label_dropout: probability of replacing a label by the null class.
        grad_clip: maximum global gradient norm.
        default_solver: solver recorded as the model's default.
        default_num_steps: step count recorded as the model's default.
    """

    dataset: str
    net: NetSpec
    name: str
    path: Mapping[str, Any] = field(default_factory=lambda: {"kind": "linear"})
    parameterization: str = "velocity"
    conditional: bool = False
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    num_train: int = 2000
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    default_solver: str = "heun"
    default_num_steps: int = 50

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {self.dataset!r}")
        info = DATASETS[self.dataset]
        if not isinstance(self.net, NetSpec):
            raise ValueError(f"net must be a NetSpec, got {type(self.net).__name__}")
        if self.net.sample_shape != info.sample_shape:
            raise ValueError(
                f"net has sample shape {self.net.sample_shape}, dataset {self.dataset!r} "
                f"has {info.sample_shape}"
            )
        if self.parameterization not in TRAINABLE_PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {TRAINABLE_PARAMETERIZATIONS}, "
                f"got {self.parameterization!r}"
            )
        path_from_dict(self.path)
        if not isinstance(self.conditional, bool):
            raise ValueError(f"conditional must be a bool, got {self.conditional!r}")
        wanted_classes = info.num_classes if self.conditional else 0
        if self.net.num_classes != wanted_classes:
            raise ValueError(
                f"net num_classes must be {wanted_classes} for "
                f"{'conditional' if self.conditional else 'unconditional'} training on "
                f"{self.dataset!r}, got {self.net.num_classes}"
            )
        _require_int("steps", self.steps, 1)
        _require_int("batch_size", self.batch_size, 1)
        _require_int("seed", self.seed, 0)
        _require_int("num_train", self.num_train, 1)
        if info.max_size is not None and self.num_train > info.max_size:
            raise ValueError(f"num_train must be <= {info.max_size} for {self.dataset!r}")
        _require_float("lr", self.lr, 0.0, 1.0, open_high=False)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        _require_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, open_high=False)
        _require_float("ema_decay", self.ema_decay, 0.0, 1.0, open_high=True)
        _require_float("label_dropout", self.label_dropout, 0.0, 1.0, open_high=True)
        _require_float("grad_clip", self.grad_clip, 0.0, math.inf, open_high=True)
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip!r}")
        if self.default_solver not in SOLVERS:
            raise ValueError(
                f"default_solver must be one of {SOLVERS}, got {self.default_solver!r}"
            )
        # The model config checks the name, step count and path/parameterisation pairing.
        try:
            self.model_config()
        except ModelDirError as error:
            raise ValueError(str(error)) from error

    def provenance(self) -> dict[str, Any]:
        """What config.json records under `training` (deterministic: no clocks, no hosts)."""
        return {
            "loss": _LOSS_NAMES[self.parameterization],
            "seed": self.seed,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "optimizer": "adam",
            "lr": self.lr,
            "lr_schedule": f"cosine to {self.min_lr_ratio} * lr",
            "ema_decay": self.ema_decay,
            "num_train": self.num_train,
            "conditional": self.conditional,
            "label_dropout": self.label_dropout if self.conditional else 0.0,
            "grad_clip": self.grad_clip,
            "time_sampling": "uniform",
            "torch_version": torch.__version__,
        }

    def model_config(self, extra_provenance: Mapping[str, Any] | None = None) -> ModelConfig:
        """The `ModelConfig` of the trained model (sha256s are filled in when written)."""
        return ModelConfig(
            name=self.name,
            architecture=self.net,
            sample_shape=self.net.sample_shape,
            parameterization=self.parameterization,
            path=self.path,
            num_classes=self.net.num_classes,
            default_solver=self.default_solver,
            default_num_steps=self.default_num_steps,
            dataset=self.dataset,
            training={**self.provenance(), **(extra_provenance or {})},
        )


@dataclass(frozen=True)
class TrainResult:
    """A finished run.

    Attributes:
        config: the run's settings.
        model_config: config.json content (without sha256s) including the final loss.
        state_dict: the EMA weights.
        losses: the minibatch loss of every step.
    """

    config: TrainConfig
    model_config: ModelConfig
    state_dict: Mapping[str, Tensor]
    losses: tuple[float, ...]


def _learning_rate_factor(step: int, steps: int, min_ratio: float) -> float:
    # Cosine decay from 1 to min_ratio: the late small steps let the EMA settle.
    progress = step / max(steps - 1, 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a model.

    Args:
        config: the run's settings.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The EMA weights, per-step losses and the model config.

    Raises:
        TrainingDiverged: the loss became non-finite.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    generator = torch.Generator().manual_seed(config.seed)
    data = make_labeled_dataset(config.dataset, config.num_train, generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = build_net(config.net)
    net.train()
    path = path_from_dict(config.path)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, foreach=True)  # fewer tiny ops
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, config.steps, config.min_lr_ratio)
    )
    ema = EMA(net, config.ema_decay)
    null_label = config.net.num_classes
    losses: list[float] = []
    bar = tqdm(
        range(config.steps), desc=f"train {config.name}", disable=not progress, mininterval=1
    )
    for step in bar:
        index = torch.randint(0, config.num_train, (config.batch_size,), generator=generator)
        x_1 = data.x[index]  # (batch, *sample_shape)
        x_0 = torch.randn(x_1.shape, generator=generator)
        t = torch.rand(config.batch_size, generator=generator)
        if config.conditional:
            dropped = torch.rand(config.batch_size, generator=generator) < config.label_dropout
            labels = torch.where(dropped, null_label, data.labels[index])
        else:
            labels = torch.zeros(config.batch_size, dtype=torch.int64)
        loss = regression_loss(net, path, config.parameterization, x_0, x_1, t, labels)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss became {value} at step {step}; lower lr (now {config.lr})"
            )
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update(net)
        losses.append(value)
        if step % 50 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
    bar.close()
    tail = losses[-min(len(losses), 100) :]
    model_config = config.model_config({"final_loss": round(sum(tail) / len(tail), 6)})
    return TrainResult(config, model_config, ema.state_dict(), tuple(losses))
