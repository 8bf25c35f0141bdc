"""The network every section of the performance report serves: one model directory, one net.

A 4x256 SiLU TimeMLP on 2-D data (the shape of the shipped `moons` model), velocity
parameterisation on the linear path, random weights (speed does not depend on them). Every peer
loads these same weights: flowserve from the directory, the in-process samplers from the same
`LoadedModel`, Triton and TorchServe from the same files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flows.nets import NetSpec, build_net
from flowserve.modeldir import LoadedModel, ModelConfig, load_model_dir, write_model_dir

MODEL = "bench-mlp"
DIM, HIDDEN, DEPTH = 2, 256, 4


def write_bench_store(root: Path) -> Path:
    """Write the benchmark network as `MODEL` version 1 under `root`; returns its directory."""
    torch.manual_seed(0)
    config = ModelConfig(
        name=MODEL,
        architecture=NetSpec("time_mlp", {"dim": DIM, "hidden": HIDDEN, "depth": DEPTH}),
        sample_shape=(DIM,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=0,
        default_solver="euler",
        default_num_steps=100,
    )
    directory = root / MODEL / "1"
    write_model_dir(directory, config, build_net(config.architecture).state_dict())
    return directory


def load_bench_model(directory: Path) -> LoadedModel:
    """The benchmark model, loaded and verified as the server loads it."""
    return load_model_dir(directory)


def noise(num_samples: int, seed: int = 0) -> Tensor:
    """Seeded standard-normal starting points `(num_samples, DIM)`."""
    return torch.randn(num_samples, DIM, generator=torch.Generator().manual_seed(seed))
