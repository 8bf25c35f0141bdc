"""The whole fixed-step sampling loop for one batch bucket, captured once in a CUDA graph.

`StepLoop` is the loop itself: per step, one network call (conditional and null rows in one
batch when guided), the exact conversion to velocity (`flows.paths.convert_unchecked`), and the
solver update through `StepOps`: the fused Triton kernels of `export.triton_kernels` on a GPU,
or their torch references from `export.step_reference` anywhere (the CPU path the tests run).

`CudaGraphSampler` runs the loop on static buffers: it warms it up on a side stream (Triton
compiles, cuBLAS allocates its workspace), captures every step of it in one CUDA graph, and
then serves each call with three copies in, one `replay()`, and one copy out, so a whole
sampling call costs one graph launch instead of `num_steps * (kernels per step)` launches.
Rows beyond the request are padding (zeros, null label, scale 1) and are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from export import step_reference
from flows.paths import GaussianPath, convert_unchecked
from flowserve.modeldir import LoadedModel

LOOP_SOLVERS: tuple[str, ...] = ("euler", "heun")


@dataclass(frozen=True)
class StepOps:
    """The three fused updates the loop needs (signatures of `export.step_reference`).

    Attributes:
        euler_update: `(x_t, v, dt) -> x_t + dt * v`.
        heun_correct: `(x_t, v_t, v_pred, dt) -> x_t + dt / 2 * (v_t + v_pred)`.
        guided_euler_update: `(x_t, v_cond, v_uncond, w, dt) -> x_t + dt * guided velocity`.
    """

    euler_update: Callable[[Tensor, Tensor, Tensor], Tensor]
    heun_correct: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    guided_euler_update: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


TORCH_OPS = StepOps(
    euler_update=step_reference.euler_update,
    heun_correct=step_reference.heun_correct,
    guided_euler_update=step_reference.guided_euler_update,
)


def triton_ops() -> StepOps:
    """The fused Triton kernels (imports triton now, not when this module is imported)."""
    from export import triton_kernels

    return StepOps(
        euler_update=triton_kernels.euler_update,
        heun_correct=triton_kernels.heun_correct,
        guided_euler_update=triton_kernels.guided_euler_update,
    )


class StepLoop:
    """Fixed-step Euler or Heun from t=0 to t=1 with per-row labels and guidance.

    Args:
        net: `forward(x, t, class_labels) -> prediction`, on the loop's device.
        path: The model's path.
        parameterization: `velocity`, `score` or `noise`.
        num_classes: Real classes (0 = unconditional; label `num_classes` is null).
        num_steps: Steps, >= 1.
        solver: `euler` or `heun`.
        ops: The update kernels.
    """

    def __init__(
        self,
        net: nn.Module,
        path: GaussianPath,
        parameterization: str,
        num_classes: int,
        num_steps: int,
        solver: str,
        ops: StepOps = TORCH_OPS,
    ) -> None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if solver not in LOOP_SOLVERS:
            raise ValueError(f"solver must be one of {LOOP_SOLVERS}, got {solver!r}")
        self.net = net
        self.path = path
        self.parameterization = parameterization
        self.num_classes = num_classes
        self.num_steps = num_steps
        self.solver = solver
        self.ops = ops

    @classmethod
    def for_model(
        cls, model: LoadedModel, num_steps: int, solver: str, ops: StepOps = TORCH_OPS
    ) -> StepLoop:
        """The loop of a loaded model directory."""
        config = model.config
        return cls(
            model.net,
            config.gaussian_path,
            config.parameterization,
            config.num_classes,
            num_steps,
            solver,
            ops,
        )

    def _velocities(
        self, x: Tensor, t: Tensor, class_labels: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """(v_cond, v_uncond) at (x, t); v_uncond is None for an unconditional net."""
        if self.num_classes == 0:
            prediction = self.net(x, t, class_labels)
            return self._to_velocity(prediction, x, t), None
        null = torch.full_like(class_labels, self.num_classes)
        # Conditional and null rows in one call: (2 * batch, *sample_shape).
        x_both, t_both = torch.cat([x, x]), torch.cat([t, t])
        prediction = self.net(x_both, t_both, torch.cat([class_labels, null]))
        v_both = self._to_velocity(prediction, x_both, t_both)
        batch = x.shape[0]
        return v_both[:batch], v_both[batch:]

    def _to_velocity(self, prediction: Tensor, x: Tensor, t: Tensor) -> Tensor:
        return convert_unchecked(
            prediction, x, self.path.schedule(t), self.parameterization, "velocity"
        )

    def _velocity(
        self,
        x: Tensor,
        t: Tensor,
        class_labels: Tensor,
        guidance_scale: Tensor,
        zeros: Tensor,
        ones: Tensor,
    ) -> Tensor:
        v_cond, v_uncond = self._velocities(x, t, class_labels)
        if v_uncond is None:
            return v_cond
        # The guided combine alone is the fused update from 0 with dt = 1 (exact: 0 + 1 * v).
        return self.ops.guided_euler_update(zeros, v_cond, v_uncond, guidance_scale, ones)

    def run(self, x_0: Tensor, class_labels: Tensor, guidance_scale: Tensor) -> Tensor:
        """Integrate from noise to data.

        Args:
            x_0: float32 `(batch, *sample_shape)`, the noise at t=0.
            class_labels: int64 `(batch,)` (ignored when unconditional).
            guidance_scale: float32 `(batch,)` (ignored when unconditional).

        Returns:
            x_1, `(batch, *sample_shape)`.
        """
        batch = x_0.shape[0]
        dt_value = 1.0 / self.num_steps
        dt = torch.full((batch,), dt_value, dtype=x_0.dtype, device=x_0.device)
        ones = torch.ones_like(dt)
        zeros = torch.zeros_like(x_0)
        x_t = x_0
        with torch.no_grad():
            for i in range(self.num_steps):
                # Step i runs at t = i * dt, as flows.solvers.sample does.
                t = torch.full_like(dt, i * dt_value)
                if self.solver == "euler":
                    v_cond, v_uncond = self._velocities(x_t, t, class_labels)
                    if v_uncond is None:
                        x_t = self.ops.euler_update(x_t, v_cond, dt)
                    else:  # guidance fused with the update
                        x_t = self.ops.guided_euler_update(
                            x_t, v_cond, v_uncond, guidance_scale, dt
                        )
                    continue
                v_t = self._velocity(x_t, t, class_labels, guidance_scale, zeros, ones)
                x_pred = self.ops.euler_update(x_t, v_t, dt)  # Heun predictor
                v_pred = self._velocity(x_pred, t + dt, class_labels, guidance_scale, zeros, ones)
                x_t = self.ops.heun_correct(x_t, v_t, v_pred, dt)  # trapezoidal corrector
        return x_t


class CudaGraphSampler:
    """A `StepLoop` for one batch bucket, captured in a CUDA graph and replayed per call.

    Args:
        model: The loaded model; its net is moved to `device`.
        sample_shape: Shape of one sample.
        batch_size: The bucket: every call pads to this many rows.
        num_steps: Steps (fixed at capture).
        solver: `euler` or `heun` (fixed at capture).
        device: A CUDA device.
        ops: The update kernels (default: the fused Triton kernels).
        warmup_runs: Eager runs on a side stream before capture.

    Raises:
        RuntimeError: CUDA is not available.
    """

    def __init__(
        self,
        model: LoadedModel,
        sample_shape: Sequence[int],
        batch_size: int,
        num_steps: int,
        solver: str,
        device: str | torch.device = "cuda",
        ops: StepOps | None = None,
        warmup_runs: int = 2,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CudaGraphSampler needs a CUDA device")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {self.device}")
        self.batch_size = batch_size
        self.sample_shape = tuple(sample_shape)
        self.num_classes = model.config.num_classes
        model.net.to(self.device)
        self.loop = StepLoop.for_model(model, num_steps, solver, ops or triton_ops())
        # Static buffers: the graph reads and writes these addresses on every replay.
        self.static_x_0 = torch.zeros((batch_size, *self.sample_shape), device=self.device)
        self.static_labels = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.static_scale = torch.ones(batch_size, device=self.device)
        self.static_x_1 = torch.empty_like(self.static_x_0)
        self.graph = self._capture(warmup_runs)

    def _step_all(self) -> None:
        self.static_x_1.copy_(self.loop.run(self.static_x_0, self.static_labels, self.static_scale))

    def _capture(self, warmup_runs: int) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                self._step_all()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_all()
        return graph

    def __call__(
        self,
        x_0: Tensor,
        class_labels: Tensor | None = None,
        guidance_scale: Tensor | float = 1.0,
    ) -> Tensor:
        """Sample up to `batch_size` rows with one graph replay.

        Args:
            x_0: float32 `(batch, *sample_shape)`, batch <= batch_size.
            class_labels: int64 `(batch,)`, or None (the null class when conditional).
            guidance_scale: A float or float32 `(batch,)`.

        Returns:
            x_1, `(batch, *sample_shape)`, on the sampler's device.
        """
        batch = x_0.shape[0]
        if x_0.dtype != torch.float32 or tuple(x_0.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"x_0 must be float32 (batch, {', '.join(map(str, self.sample_shape))}), "
                f"got {x_0.dtype} {tuple(x_0.shape)}"
            )
        if not 1 <= batch <= self.batch_size:
            raise ValueError(f"x_0 must have 1 to {self.batch_size} rows, got {batch}")
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.int64)
        if class_labels.shape != (batch,) or class_labels.dtype != torch.int64:
            raise ValueError(f"class_labels must be int64 of shape ({batch},)")
        scale = torch.as_tensor(guidance_scale, dtype=torch.float32)
        if scale.shape not in ((), (batch,)):
            raise ValueError(f"guidance_scale must be a float or have shape ({batch},)")
        scale = scale.expand(batch)
        # Padding rows: zeros, the null label, no guidance; their results are dropped.
        self.static_x_0.zero_()
        self.static_labels.fill_(self.num_classes)
        self.static_scale.fill_(1.0)
        self.static_x_0[:batch].copy_(x_0)
        self.static_labels[:batch].copy_(class_labels)
        self.static_scale[:batch].copy_(scale)
        self.graph.replay()
        return self.static_x_1[:batch].clone()
