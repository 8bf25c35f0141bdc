"""The captured step loop of `export.cuda_graph` against `flows.solvers.sample`.

The loop logic (time grid, guidance, conversion, Euler and Heun updates) runs on the CPU with
the torch-reference ops; the CUDA-graph capture and replay with the Triton kernels run only
where CUDA exists (marked `cuda`, skipped otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from export.cuda_graph import TORCH_OPS, CudaGraphSampler, StepLoop
from flows.field import velocity_field
from flows.nets import NetSpec
from flows.solvers import sample
from flowserve.modeldir import LoadedModel, ModelConfig, build_net, load_model_dir, write_model_dir

# Same fp32 operations up to order (the loop guides velocities, flows guides predictions, an
# exact identity); a few steps on O(1) samples stay within 1e-5.
ATOL = 1e-5
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIGS = {
    "cond-linear": ModelConfig(
        name="cond",
        architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2, "num_classes": 3}),
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=3,
        default_solver="heun",
        default_num_steps=4,
    ),
    "mlp-vp-noise": ModelConfig(
        name="mlpvp",
        architecture=NetSpec("time_mlp", {"dim": 3, "hidden": 16, "depth": 2, "num_classes": 2}),
        sample_shape=(3,),
        parameterization="noise",
        path={"kind": "vp"},
        num_classes=2,
        default_solver="heun",
        default_num_steps=4,
    ),
    "unet-vp-noise": ModelConfig(
        name="unet",
        architecture=NetSpec("conv_unet8", {"channels": 1, "width": 8, "num_classes": 2}),
        sample_shape=(1, 8, 8),
        parameterization="noise",
        path={"kind": "vp"},
        num_classes=2,
        default_solver="heun",
        default_num_steps=4,
    ),
}


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _model(tmp_path: Path, key: str) -> LoadedModel:
    config = CONFIGS[key]
    torch.manual_seed(0)
    write_model_dir(tmp_path / key, config, build_net(config).state_dict())
    return load_model_dir(tmp_path / key)


def _reference(
    model: LoadedModel, x_0: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, solver: str
) -> torch.Tensor:
    config = model.config
    velocity_fn = velocity_field(
        model.net,
        config.gaussian_path,
        config.parameterization,
        class_labels=labels,
        guidance_scale=scale,
        null_label=config.num_classes,
    )
    return sample(velocity_fn, x_0, config.default_num_steps, solver)


# The U-Net runs on the GPU only: oneDNN's first calls per shape cost seconds on a CPU.
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("key", ["cond-linear", "mlp-vp-noise"])
def test_step_loop_matches_flows(tmp_path: Path, key: str, solver: str) -> None:
    model = _model(tmp_path, key)
    config = model.config
    generator = torch.Generator().manual_seed(1)
    x_0 = torch.randn((5, *config.sample_shape), generator=generator)
    labels = torch.tensor([0, 1, config.num_classes, 1, 0])
    scale = torch.tensor([1.0, 2.0, 0.0, 3.5, 1.0])
    loop = StepLoop.for_model(model, config.default_num_steps, solver, TORCH_OPS)
    actual = loop.run(x_0, labels, scale)
    expected = _reference(model, x_0, labels, scale, solver)
    # fp32 error is relative: random noise-prediction weights on the VP path give large samples.
    bound = ATOL * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=bound, rtol=0)


def test_step_loop_rejects_other_solvers(tmp_path: Path) -> None:
    model = _model(tmp_path, "cond-linear")
    with pytest.raises(ValueError, match="solver must be one of"):
        StepLoop.for_model(model, 4, "rk4")
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        StepLoop.for_model(model, 0, "euler")


def test_sampler_refuses_to_start_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the refusal path cannot be reached")
    model = _model(tmp_path, "cond-linear")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CudaGraphSampler(model, (2,), batch_size=8, num_steps=4, solver="euler")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("key", ["cond-linear", "unet-vp-noise"])
def test_cuda_graph_replays_match_flows(tmp_path: Path, key: str, solver: str) -> None:
    model = _model(tmp_path, key)
    config = model.config
    sampler = CudaGraphSampler(
        model, config.sample_shape, batch_size=8, num_steps=config.default_num_steps, solver=solver
    )
    generator = torch.Generator().manual_seed(2)
    # Two replays with different inputs and row counts (3 of 8 and a full bucket): the static
    # buffers must carry each call's inputs, and padding rows must not leak into real rows.
    for batch in (3, 8):
        x_0 = torch.randn((batch, *config.sample_shape), generator=generator)
        labels = torch.randint(0, config.num_classes + 1, (batch,), generator=generator)
        scale = 3.0 * torch.rand(batch, generator=generator)
        actual = sampler(x_0.cuda(), labels.cuda(), scale.cuda())
        expected = _reference(model, x_0.cuda(), labels.cuda(), scale.cuda(), solver)
        # Triton's fused updates and cuDNN convolutions against ATen: relative fp32 rounding.
        bound = 1e-4 * max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(actual, expected, atol=bound, rtol=0)
