"""Shared pieces of the engine tests: small models, wrapping backends, bounded waits.

No tests live here. Models are tiny random-weight nets from flows.nets (the engine's arithmetic
does not depend on the weights) and the analytic Gaussian velocity of flows.reference, whose
flow and density are known in closed form.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from flows.nets import NetSpec, build_net
from flowserve.modeldir import LoadedModel, ModelConfig
from server.engine import Engine, EngineConfig, ServedModel
from server.engine.backends import EagerBackend

# Every wait in the engine tests is bounded by this.
WAIT_SECONDS = 30.0


def make_model(
    name: str = "mlp",
    dim: int = 2,
    num_classes: int = 0,
    parameterization: str = "velocity",
    path: dict[str, object] | None = None,
    hidden: int = 32,
    seed: int = 0,
) -> tuple[ServedModel, LoadedModel]:
    """A small random TimeMLP served by the eager backend, and the same net as a LoadedModel."""
    kwargs = {"dim": dim, "hidden": hidden, "depth": 2}
    if num_classes:
        kwargs["num_classes"] = num_classes
    config = ModelConfig(
        name=name,
        architecture=NetSpec("time_mlp", kwargs),
        sample_shape=(dim,),
        parameterization=parameterization,
        path=path or {"kind": "linear"},
        num_classes=num_classes,
        default_solver="heun",
        default_num_steps=8,
    )
    torch.manual_seed(seed)
    net = build_net(config.architecture).eval().requires_grad_(False)
    backend = EagerBackend(net)
    return ServedModel(name, 1, config, backend, backend), LoadedModel(config, net)


class FunctionBackend:
    """A backend around any `(x, t, class_labels) -> prediction` function."""

    supports_autograd = True

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor], Tensor], name: str = "fn") -> None:
        self.fn = fn
        self.name = name

    def __call__(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        return self.fn(x, t, class_labels)


class RecordingBackend:
    """Wraps a backend; counts calls, records batch sizes, can block or fail on cue.

    Attributes:
        calls: Calls made so far.
        batch_sizes: The (padded) batch size of every call.
        gate: Cleared to make calls number `hold_from` and later block until it is set again.
        entered: Set whenever a call starts.
        blocked: Set when a call waits on the closed gate.
        fail_on: Call numbers (1-based) that raise RuntimeError("injected fault").
        delay: Seconds each call sleeps (to let deadlines pass).
    """

    def __init__(
        self,
        inner: object,
        fail_on: tuple[int, ...] = (),
        delay: float = 0.0,
        hold_from: int = 1,
    ) -> None:
        self.inner = inner
        self.name = "recording"
        self.supports_autograd = True
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.blocked = threading.Event()
        self.hold_from = hold_from
        self.fail_on = fail_on
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        with self._lock:
            self.calls += 1
            number = self.calls
            self.batch_sizes.append(x.shape[0])
        self.entered.set()
        if number >= self.hold_from and not self.gate.is_set():
            self.blocked.set()
        if number >= self.hold_from and not self.gate.wait(WAIT_SECONDS):
            raise TimeoutError("test gate was never opened")
        if self.delay:
            time.sleep(self.delay)
        if number in self.fail_on:
            raise RuntimeError("injected fault")
        return self.inner(x, t, class_labels)  # type: ignore[operator]


def with_backend(model: ServedModel, backend: object) -> ServedModel:
    """The same model served through another backend (sampling and likelihood)."""
    return ServedModel(model.name, model.version, model.config, backend, backend)  # type: ignore[arg-type]


@contextmanager
def running_engine(config: EngineConfig | None = None, start: bool = True) -> Iterator[Engine]:
    """An engine that is always shut down, even when the test fails."""
    engine = Engine(config or EngineConfig())
    if start:
        engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    """Poll `predicate` every millisecond until it holds or `timeout` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.001)
    return predicate()


def seeded_noise(seed: int, rows: int, dim: int) -> Tensor:
    """The engine's documented initial noise for a seed (records.py)."""
    return torch.randn((rows, dim), generator=torch.Generator("cpu").manual_seed(seed))
