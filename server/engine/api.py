"""The engine's public value types: configuration, jobs, results, progress and statistics.

Everything here is a frozen dataclass or a Protocol so that the gRPC layer can build jobs and read
results without importing the loop. Shapes follow the project convention `(batch, *sample_shape)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from flowserve.modeldir import ModelConfig

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
POLICIES: tuple[str, ...] = ("step", "request")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and timing of the engine loop.

    Attributes:
        max_rows_per_call: Rows in one network call, counted after classifier-free-guidance
            doubling (a guided row takes two).
        batch_buckets: Network calls are padded to the smallest of these sizes that fits, so that
            a GPU graph can be captured once per bucket. The largest must be at least
            `max_rows_per_call`.
        fill_wait_seconds: How long an idle loop waits after the first arrival for more requests
            before it makes its first call. 0 by default: under step-level batching a request
            that arrives later joins the running rows at the next step, so waiting would only
            add latency. Request-level batching wants a few milliseconds here, as a dynamic
            batcher's queue delay.
        max_rows_in_flight: Admitted rows being integrated at once; the rest wait in the queue.
        max_rows_queued: Rows waiting for admission; a submit() beyond it raises QueueFull at once.
        policy: "step" (step-level continuous batching: requests join and leave between network
            calls) or "request" (whole requests are batched together and a new batch starts only
            when the last one is finished, as a request-level dynamic batcher does).
        device: Torch device of the loop's tensors.
        solo_max_evaluations: A sample job submitted to an idle engine runs on the submitting
            thread as one call of its model's whole-loop sampler (`ServedModel.whole_loop`)
            when it costs at most this many network evaluations (rows x steps x solver stages,
            twice for a conditional net), its solver is one the sampler has, and it asks for no
            progress or trajectory. At batch 1 the loop's own work per step, and the hand-over
            to the loop thread and back, cost more than the network; a job arriving meanwhile
            waits for that one call, then batches as usual. 0 turns the fast path off.
    """

    max_rows_per_call: int = 4096
    batch_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    fill_wait_seconds: float = 0.0
    max_rows_in_flight: int = 65536
    max_rows_queued: int = 262144
    policy: str = "step"
    device: str = "cpu"
    solo_max_evaluations: int = 256

    def __post_init__(self) -> None:
        if self.max_rows_per_call < 2:
            # A guided row needs two slots in one call.
            raise ValueError(f"max_rows_per_call must be >= 2, got {self.max_rows_per_call}")
        if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets must be positive sizes, got {self.batch_buckets}")
        if list(self.batch_buckets) != sorted(set(self.batch_buckets)):
            raise ValueError(f"batch_buckets must be strictly increasing, got {self.batch_buckets}")
        if self.batch_buckets[-1] < self.max_rows_per_call:
            raise ValueError(
                f"the largest of batch_buckets ({self.batch_buckets[-1]}) must be >= "
                f"max_rows_per_call ({self.max_rows_per_call})"
            )
        if self.fill_wait_seconds < 0:
            raise ValueError(f"fill_wait_seconds must be >= 0, got {self.fill_wait_seconds}")
        if self.max_rows_in_flight < 1:
            raise ValueError(f"max_rows_in_flight must be >= 1, got {self.max_rows_in_flight}")
        if self.max_rows_queued < 0:
            raise ValueError(f"max_rows_queued must be >= 0, got {self.max_rows_queued}")
        if self.solo_max_evaluations < 0:
            raise ValueError(f"solo_max_evaluations must be >= 0, got {self.solo_max_evaluations}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")


class Backend(Protocol):
    """A network behind one calling convention: `(x, t, class_labels) -> prediction`.

    Attributes:
        name: "eager" | "torchscript" | "onnxruntime" | "triton-fused".
        supports_autograd: Whether gradients flow through the call (exact divergence needs it).
    """

    name: str
    supports_autograd: bool

    def __call__(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        """Evaluate the network.

        Args:
            x: `(batch, *sample_shape)` float32.
            t: `(batch,)` float32.
            class_labels: `(batch,)` int64; the null class is `num_classes`.

        Returns:
            The raw prediction, `(batch, *sample_shape)`, in the model's parameterization.
        """
        ...


class WholeLoopSampler(Protocol):
    """A model's whole fixed-step sampling loop in one call (export's `sampler.onnx`).

    It integrates the guided velocity on the uniform grid as `flows.solvers.sample` does.

    Attributes:
        solvers: The solvers it runs (names of flows.solvers.TABLEAUS).
    """

    solvers: frozenset[str]

    def __call__(
        self,
        x0: Tensor,
        num_steps: int,
        solver: str,
        class_labels: Tensor,
        guidance_scale: Tensor,
    ) -> Tensor:
        """Integrate from t=0 to t=1.

        Args:
            x0: `(batch, *sample_shape)` float32 noise on the CPU.
            num_steps: Steps, >= 1.
            solver: One of `solvers`.
            class_labels: `(batch,)` int64; the null class is `num_classes`.
            guidance_scale: `(batch,)` float32.

        Returns:
            A fresh `(batch, *sample_shape)` float32 CPU tensor: the samples at t=1.
        """
        ...


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version as the engine serves it.

    Attributes:
        name: Model name.
        version: Model version (positive integer).
        config: The model directory's configuration (sample shape, path, parameterization,
            classes).
        backend: The backend used for sampling.
        eager: An autograd-capable backend used by the likelihood lane.
        whole_loop: The exported whole sampling loop, used for lone small requests (see
            `EngineConfig.solo_max_evaluations`), or None.
    """

    name: str
    version: int
    config: ModelConfig
    backend: Backend
    eager: Backend
    whole_loop: WholeLoopSampler | None = None


@dataclass(frozen=True)
class SampleJob:
    """Draw `num_samples` samples by integrating from t=0 (noise) to t=1 (data).

    When `initial_noise` is None the engine draws it as
    `torch.randn((num_samples, *sample_shape), generator=torch.Generator("cpu").manual_seed(seed))`
    on the CPU, then moves it to the device; clients rely on this to reproduce a sample.

    Attributes:
        model: The model to sample.
        num_samples: Rows of the result.
        num_steps: Solver steps on the uniform time grid of [0, 1].
        solver: One of flows.solvers.SOLVERS.
        seed: Seed of the initial noise, SDE noise; None lets the engine pick one and report it.
        class_labels: `(num_samples,)` int64, already broadcast; None for unconditional models.
        guidance_scale: Classifier-free guidance scale; 1.0 is plain conditional sampling.
        initial_noise: `(num_samples, *sample_shape)` float32 x_0; None draws it from the seed.
        trajectory_every: Keep x every k steps in the result (0 = none).
        deadline: `time.monotonic()` time after which the job fails with JobDeadlineExceeded.
    """

    model: ServedModel
    num_samples: int
    num_steps: int
    solver: str
    seed: int | None = None
    class_labels: Tensor | None = None
    guidance_scale: float = 1.0
    initial_noise: Tensor | None = None
    trajectory_every: int = 0
    deadline: float | None = None


@dataclass(frozen=True)
class LikelihoodJob:
    """Compute log p_1(data) through the augmented ODE integrated from t=1 back to t=0.

    Attributes:
        model: The model whose flow defines the density.
        data: `(n, *sample_shape)` float32 points x_1.
        num_steps: Solver steps on the uniform time grid.
        solver: One of flows.solvers.ODE_SOLVERS.
        estimator: "exact" (autograd divergence) or "hutchinson" (trace estimator).
        num_probes: Hutchinson probes per point.
        seed: Seed of the Hutchinson probes; None lets the engine pick one and report it.
        class_labels: `(n,)` int64 or None.
        deadline: `time.monotonic()` deadline.
    """

    model: ServedModel
    data: Tensor
    num_steps: int
    solver: str
    estimator: str
    num_probes: int = 1
    seed: int | None = None
    class_labels: Tensor | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class SampleResult:
    """The outcome of a SampleJob.

    Attributes:
        samples: `(num_samples, *sample_shape)` float32 on the CPU.
        model: Model name.
        version: Model version.
        num_steps: Solver steps taken.
        network_evaluations: Network evaluations per row, summed over rows (a guided row counts
            its conditional and unconditional evaluations).
        seed: The seed used (chosen by the engine when the job gave none).
        queue_seconds: Time from submit() to admission.
        compute_seconds: Time from admission to completion.
        trajectory: Snapshots of x, each `(num_samples, *sample_shape)`, every
            `trajectory_every` steps.
    """

    samples: Tensor
    model: str
    version: int
    num_steps: int
    network_evaluations: int
    seed: int
    queue_seconds: float
    compute_seconds: float
    trajectory: tuple[Tensor, ...]


@dataclass(frozen=True)
class LikelihoodResult:
    """The outcome of a LikelihoodJob; tensors are `(n,)` float32 on the CPU.

    Attributes:
        log_prob: log p_1(x_1) in nats (Hutchinson: the mean over probes).
        std_error: Standard error over probes (zeros for "exact", nan for one probe).
        bits_per_dim: -log_prob / (D ln 2).
        model: Model name.
        version: Model version.
        network_evaluations: Network evaluations summed over rows.
        seed: The seed used for the probes.
        queue_seconds: Time from submit() to admission.
        compute_seconds: Time from admission to completion.
    """

    log_prob: Tensor
    std_error: Tensor
    bits_per_dim: Tensor
    model: str
    version: int
    network_evaluations: int
    seed: int
    queue_seconds: float
    compute_seconds: float


@dataclass(frozen=True)
class Progress:
    """A progress report, passed to `on_progress` from the engine thread (keep the callback cheap).

    Attributes:
        steps_done: Completed solver steps.
        num_steps: Total solver steps.
        t: Current time of the rows.
        snapshot: `(num_samples, *sample_shape)` copy of x when `trajectory_every` divides
            `steps_done`, else None.
    """

    steps_done: int
    num_steps: int
    t: float
    snapshot: Tensor | None


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot for metrics gauges.

    Attributes:
        queued_rows: Rows submitted but not yet admitted.
        running_rows: Admitted rows being integrated.
        pending_network_evaluations: Network evaluations still owed to queued and running jobs.
    """

    queued_rows: int
    running_rows: int
    pending_network_evaluations: int


class EngineObserver(Protocol):
    """Receives engine events; the server wires Prometheus to it. Called from the loop thread,
    and from the submitting thread for a solo job (see `EngineConfig.solo_max_evaluations`)."""

    def on_network_call(self, model: str, rows: int, padded_rows: int, seconds: float) -> None:
        """One network call of `rows` real rows padded to `padded_rows`, taking `seconds`."""
        ...

    def on_job_done(self, model: str, kind: str, samples: int, network_evaluations: int) -> None:
        """A job of `kind` ("sample" | "likelihood") finished successfully."""
        ...
