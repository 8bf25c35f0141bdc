"""The fused step-loop kernels against their torch references, under the Triton interpreter.

TRITON_INTERPRET must be set before `export.triton_kernels` (and so triton's `@jit`) is imported:
the decorator picks interpreted or compiled mode when it runs. Sizes are few and awkward: a single
row, rows that straddle blocks, a row longer than a block, an image-shaped sample.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from export import step_reference

kernels = pytest.importorskip("export.triton_kernels", reason="triton is not installed")

# (batch, *sample_shape): one row; 2-D rows whose total (37 * 2 = 74) is not a block multiple;
# rows that cross block boundaries (3 * 700 with BLOCK 1024); an image batch (3, 1, 8, 8).
SHAPES = [(1, 2), (37, 2), (3, 700), (3, 1, 8, 8)]
# The interpreter is slow per program, so most tests use one large block.
BLOCK = 1024
# The kernels and references do the same fp32 operations in the same order, so they agree to
# rounding; values are O(1), where one fp32 ulp is ~1e-7, and 1e-6 leaves room for an FMA.
ATOL = 1e-6


def _state(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _per_row(batch: int, seed: int, low: float, high: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(batch, generator=generator)


@pytest.mark.parametrize("shape", SHAPES)
def test_euler_update_matches_reference(shape: tuple[int, ...]) -> None:
    x_t, v = _state(shape, 0), _state(shape, 1)
    dt = _per_row(shape[0], 2, -0.5, 0.5)  # negative steps integrate backwards, also supported
    got = kernels.euler_update(x_t, v, dt, block=BLOCK)
    torch.testing.assert_close(got, step_reference.euler_update(x_t, v, dt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_heun_predict_and_correct_match_reference(shape: tuple[int, ...]) -> None:
    x_t, v_t, v_pred = _state(shape, 3), _state(shape, 4), _state(shape, 5)
    dt = _per_row(shape[0], 6, 0.01, 0.5)
    predicted = kernels.heun_predict(x_t, v_t, dt, block=BLOCK)
    torch.testing.assert_close(
        predicted, step_reference.euler_update(x_t, v_t, dt), atol=ATOL, rtol=0
    )
    corrected = kernels.heun_correct(x_t, v_t, v_pred, dt, block=BLOCK)
    expected = step_reference.heun_correct(x_t, v_t, v_pred, dt)
    torch.testing.assert_close(corrected, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_guided_euler_update_matches_reference(shape: tuple[int, ...]) -> None:
    x_t, v_cond, v_uncond = _state(shape, 7), _state(shape, 8), _state(shape, 9)
    scale = _per_row(shape[0], 10, 0.0, 4.0)
    dt = _per_row(shape[0], 11, 0.01, 0.5)
    got = kernels.guided_euler_update(x_t, v_cond, v_uncond, scale, dt, block=BLOCK)
    expected = step_reference.guided_euler_update(x_t, v_cond, v_uncond, scale, dt)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_euler_maruyama_update_matches_reference(shape: tuple[int, ...]) -> None:
    x_t, drift, noise = _state(shape, 12), _state(shape, 13), _state(shape, 14)
    dt = _per_row(shape[0], 15, 0.0, 0.5)  # includes dt near 0, where sqrt(dt) is steepest
    g_t = _per_row(shape[0], 16, 0.0, 3.0)
    got = kernels.euler_maruyama_update(x_t, drift, dt, g_t, noise, block=BLOCK)
    expected = step_reference.euler_maruyama_update(x_t, drift, dt, g_t, noise)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_guidance_scale_one_is_the_conditional_euler_update() -> None:
    """An independent truth for the fused combine: w = 1 must ignore v_uncond entirely."""
    shape = (5, 3)
    x_t, v_cond, v_uncond = _state(shape, 17), _state(shape, 18), _state(shape, 19)
    got = kernels.guided_euler_update(x_t, v_cond, v_uncond, 1.0, 0.25, block=BLOCK)
    # x + 0.25 * (u + 1 * (c - u)) rounds differently from x + 0.25 * c by a few ulps at most.
    torch.testing.assert_close(got, x_t + 0.25 * v_cond, atol=ATOL, rtol=0)


def test_out_may_alias_the_state() -> None:
    shape = (4, 300)
    x_t, v = _state(shape, 20), _state(shape, 21)
    expected = step_reference.euler_update(x_t, v, torch.full((4,), 0.1))
    buffer = x_t.clone()
    result = kernels.euler_update(buffer, v, 0.1, out=buffer, block=BLOCK)
    assert result.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, expected, atol=ATOL, rtol=0)  # same ops as above


def test_small_block_spans_rows() -> None:
    """A block smaller than a row: each row is split across several programs."""
    shape = (2, 1, 8, 8)
    x_t, v = _state(shape, 22), _state(shape, 23)
    dt = _per_row(2, 24, 0.1, 0.2)
    got = kernels.euler_update(x_t, v, dt, block=16)
    torch.testing.assert_close(got, step_reference.euler_update(x_t, v, dt), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"v": torch.zeros(3, 3)}, "v must have shape"),
        ({"v": torch.zeros(3, 2, dtype=torch.float64)}, "v must be float32"),
        ({"dt": torch.zeros(2)}, r"dt must have shape \(3,\)"),
        ({"dt": "0.1"}, "dt must be a float or a torch.Tensor"),
        ({"x_t": torch.zeros(3, 2, dtype=torch.int64)}, "x_t must be float32"),
        ({"block": 100}, "block must be a power of two"),
    ],
)
def test_bad_operands_raise_value_error(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"x_t": torch.zeros(3, 2), "v": torch.zeros(3, 2), "dt": 0.1}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kernels.euler_update(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_step_loop_with_the_kernels_matches_the_torch_ops(solver: str) -> None:
    """The CUDA-graph loop's exact kernel sequence, interpreted on CPU tensors.

    A conditional net with per-row guidance exercises all three loop kernels; the torch ops
    run the same fp32 operations in the same order, so the whole loop agrees to rounding.
    """
    from export.cuda_graph import TORCH_OPS, StepLoop, triton_ops
    from flows.nets import TimeMLP
    from flows.paths import LinearPath

    torch.manual_seed(0)
    net = TimeMLP(dim=3, hidden=16, depth=2, num_classes=2).eval()
    x_0 = _state((37, 3), 25)
    labels = torch.tensor([0, 1, 2] * 12 + [1])
    scale = _per_row(37, 26, 0.0, 3.0)
    loops = [
        StepLoop(net, LinearPath(), "velocity", 2, 3, solver, ops)
        for ops in (triton_ops(), TORCH_OPS)
    ]
    fused, reference = (loop.run(x_0, labels, scale) for loop in loops)
    torch.testing.assert_close(fused, reference, atol=ATOL, rtol=0)
