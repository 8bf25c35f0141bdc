"""Training recipes: per-data-set defaults and the shipped models (`make models`).

`python -m training.defaults --store model_store` retrains every shipped model, seeded, into
`STORE/NAME/1/` (replacing the old version atomically) with its PNGs in `STORE/NAME/`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from flows.nets import NetSpec
from flows.paths import PATH_KINDS, LinearPath, VPPath
from training.artifacts import write_run
from training.datasets import DATASETS
from training.trainer import TrainConfig, train

__all__ = ["SHIPPED", "default_config", "main"]


def default_config(dataset: str, path: str = "linear", name: str | None = None) -> TrainConfig:
    """Sensible settings for a data set on a path (the CLI starts from these).

    Args:
        dataset: one of `training.datasets.DATASETS`.
        path: "linear" (flow matching, velocity) or "vp" (DSM, noise prediction).
        name: model name (default: the data set's name, plus "-vp" on the VP path).

    Returns:
        The run settings.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {dataset!r}")
    if path not in PATH_KINDS:
        raise ValueError(f"path must be one of {PATH_KINDS}, got {path!r}")
    info = DATASETS[dataset]
    vp = path == "vp"
    path_dict = VPPath().to_dict() if vp else LinearPath().to_dict()
    # The VP path's velocity is stiff near t = 0 (d log alpha / dt ~ beta_max / 2), so it gets
    # more steps than the straight linear path for the same accuracy.
    num_steps = 100 if vp else 50
    parameterization = "noise" if vp else "velocity"
    model_name = name or (f"{dataset}-vp" if vp else dataset)
    if info.sample_shape == (2,):
        return TrainConfig(
            dataset=dataset,
            net=NetSpec("time_mlp", {"dim": 2, "hidden": 256, "depth": 4}),
            name=model_name,
            path=path_dict,
            parameterization=parameterization,
            steps=6000,
            batch_size=256,
            lr=1e-3,
            ema_decay=0.999,
            num_train=2000,
            default_solver="heun",
            default_num_steps=num_steps,
        )
    return TrainConfig(
        dataset=dataset,
        # Width 16 keeps the shipped dir (weights + three exports) under 5 MB; 24 gives 5.5 MB.
        net=NetSpec("conv_unet8", {"channels": 1, "width": 16, "num_classes": info.num_classes}),
        name=model_name,
        path=path_dict,
        parameterization=parameterization,
        conditional=True,
        steps=2500,
        batch_size=64,
        lr=2e-3,
        ema_decay=0.995,
        num_train=info.max_size or 2000,
        label_dropout=0.1,
        default_solver="heun",
        default_num_steps=20 if not vp else num_steps,
    )


SHIPPED: dict[str, TrainConfig] = {
    "moons": replace(default_config("moons"), steps=8000),
    "moons-vp": replace(default_config("moons", "vp"), steps=8000),
    "digits": default_config("digits"),
}
"""The models in model_store/, each rebuilt at version 1 by `make models`."""


def main(argv: Sequence[str] | None = None) -> int:
    """Retrain the shipped models into a model store."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="model store directory")
    parser.add_argument(
        "--only", action="append", choices=sorted(SHIPPED), help="train just these (repeatable)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 keeps a shared CPU usable)"
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    for name in args.only or list(SHIPPED):
        config = SHIPPED[name]
        started = time.perf_counter()
        print(f"[{name}] training {config.steps} steps on {config.dataset}", flush=True)
        result = train(config)
        artifacts = write_run(
            result, args.store / name / "1", plots_dir=args.store / name, overwrite=True
        )
        seconds = time.perf_counter() - started
        final = result.model_config.training["final_loss"]
        print(f"[{name}] wrote {artifacts.model_dir} in {seconds:.0f} s (final loss {final})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
