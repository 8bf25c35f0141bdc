"""The engine's solo fast path: a lone small request runs the exported whole-loop sampler.

The truth is `flows.solvers.sample` on the eager network, the reference export's own parity
check uses: the sampler must match it within export's SAMPLER_TOLERANCE (1e-4 at O(1) samples,
scaled by the samples' magnitude), because the ONNX loop accumulates one rounding difference
per step from onnxruntime's own matmul kernels. Which path ran is observed, not assumed: the
step backend records every network call and the sampler wrapper counts its calls.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from export.model_export import SAMPLER_TOLERANCE
from export.onnx_sampler import export_sampler_onnx
from flows.solvers import TABLEAUS, sample
from flowserve.modeldir import LoadedModel
from server.engine import (
    BackendFailed,
    Engine,
    EngineClosed,
    EngineConfig,
    EngineStats,
    JobHandle,
    SampleJob,
    ServedModel,
    load_whole_loop_sampler,
)
from server.engine.api import WholeLoopSampler
from server.store import ModelEntry
from server.warmup import WarmupFailed, warm_up
from tests.test_engine_support import (
    WAIT_SECONDS,
    RecordingBackend,
    make_model,
    running_engine,
    wait_until,
)


class CountingSampler:
    """Wraps a whole-loop sampler; counts calls and can fail on cue."""

    def __init__(self, inner: WholeLoopSampler, fail: bool = False) -> None:
        self.inner = inner
        self.solvers = inner.solvers
        self.calls = 0
        self.fail = fail

    def __call__(
        self, x0: Tensor, num_steps: int, solver: str, labels: Tensor, guidance: Tensor
    ) -> Tensor:
        self.calls += 1
        if self.fail:
            raise RuntimeError("injected sampler fault")
        return self.inner(x0, num_steps, solver, labels, guidance)


Served = tuple[ServedModel, LoadedModel, WholeLoopSampler]


def _exported(tmp: Path, num_classes: int) -> Served:
    model, loaded = make_model(num_classes=num_classes)
    config = loaded.config
    proto = export_sampler_onnx(
        loaded.net,
        config.gaussian_path,
        config.parameterization,
        config.num_classes,
        config.sample_shape,
    )
    (tmp / "sampler.onnx").write_bytes(proto.SerializeToString())
    return model, loaded, load_whole_loop_sampler(tmp)


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return _exported(tmp_path_factory.mktemp("solo-uncond"), num_classes=0)


@pytest.fixture(scope="module")
def conditional(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return _exported(tmp_path_factory.mktemp("solo-cond"), num_classes=3)


def _served(
    served: Served, fail: bool = False, hold_from: int = 1
) -> tuple[ServedModel, RecordingBackend, CountingSampler]:
    model, _, sampler = served
    steps = RecordingBackend(model.backend, hold_from=hold_from)
    counting = CountingSampler(sampler, fail=fail)
    wired = ServedModel(model.name, model.version, model.config, steps, steps, counting)  # type: ignore[arg-type]
    return wired, steps, counting


def _assert_matches(actual: Tensor, expected: Tensor) -> None:
    tolerance = SAMPLER_TOLERANCE * max(1.0, float(expected.abs().max()))
    error = float((actual - expected).abs().max())
    assert error <= tolerance, f"max |solo - reference| = {error:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_lone_request_runs_one_whole_loop_call(unconditional: Served, solver: str) -> None:
    model, steps, sampler = _served(unconditional)
    _, loaded, _ = unconditional
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    with running_engine() as engine:
        job = SampleJob(model, 4, num_steps=16, solver=solver, initial_noise=x0)
        result = engine.submit(job).future.result(WAIT_SECONDS)
        assert engine.stats().running_rows == engine.stats().pending_network_evaluations == 0
    assert (sampler.calls, steps.calls) == (1, 0)
    _assert_matches(result.samples, sample(loaded.velocity_fn(), x0, 16, solver))
    assert result.network_evaluations == 4 * 16 * len(TABLEAUS[solver].b)
    assert result.trajectory == ()


def test_guided_lone_request_matches_the_guided_reference(conditional: Served) -> None:
    model, steps, sampler = _served(conditional)
    _, loaded, _ = conditional
    labels = torch.tensor([0, 2])
    with running_engine() as engine:
        job = SampleJob(
            model, 2, num_steps=12, solver="heun", seed=7, class_labels=labels, guidance_scale=2.5
        )
        result = engine.submit(job).future.result(WAIT_SECONDS)
    assert (sampler.calls, steps.calls) == (1, 0)
    # The engine's seeded noise, as records.py documents it.
    x0 = torch.randn(2, 2, generator=torch.Generator("cpu").manual_seed(7))
    expected = sample(loaded.velocity_fn(labels, 2.5), x0, 12, "heun")
    _assert_matches(result.samples, expected)


def _ineligible_jobs(model: ServedModel) -> Iterator[tuple[str, SampleJob, bool]]:
    """(why, job, with a progress callback) for jobs that must go step by step."""
    yield "progress", SampleJob(model, 2, 8, "euler", seed=0), True
    yield "trajectory", SampleJob(model, 2, 8, "euler", seed=0, trajectory_every=4), False
    yield "solver the sampler lacks", SampleJob(model, 2, 8, "midpoint", seed=0), False
    # 9 rows x 16 steps x 2 stages = 288 > 256 evaluations.
    yield "too costly", SampleJob(model, 9, 16, "heun", seed=0), False


def test_jobs_the_sampler_cannot_serve_alone_go_step_by_step(unconditional: Served) -> None:
    _, loaded, _ = unconditional
    model, steps, sampler = _served(unconditional)
    with running_engine() as engine:
        for why, job, with_progress in _ineligible_jobs(model):
            calls_before = steps.calls
            on_progress = (lambda progress: None) if with_progress else None
            result = engine.submit(job, on_progress).future.result(WAIT_SECONDS)
            assert steps.calls > calls_before, why
            x0 = torch.randn(job.num_samples, 2, generator=torch.Generator().manual_seed(0))
            expected = sample(loaded.velocity_fn(), x0, job.num_steps, job.solver)
            torch.testing.assert_close(result.samples, expected, rtol=1e-5, atol=1e-5)
    assert sampler.calls == 0


def test_zero_solo_budget_turns_the_fast_path_off(unconditional: Served) -> None:
    model, steps, sampler = _served(unconditional)
    with running_engine(EngineConfig(solo_max_evaluations=0)) as engine:
        engine.submit(SampleJob(model, 1, 4, "euler", seed=0)).future.result(WAIT_SECONDS)
    assert (sampler.calls, steps.calls) == (0, 4)


def test_a_request_arriving_while_others_run_joins_their_steps(unconditional: Served) -> None:
    """Too costly for the fast path, the first job holds the loop inside its first call; the
    small second job then finds rows running and must batch with them."""
    _, loaded, _ = unconditional
    model, steps, sampler = _served(unconditional)
    steps.gate.clear()
    with running_engine() as engine:
        big = engine.submit(SampleJob(model, 64, 8, "euler", seed=1))
        assert steps.blocked.wait(WAIT_SECONDS)
        small = engine.submit(SampleJob(model, 1, 8, "euler", seed=2))
        steps.gate.set()
        small_result = small.future.result(WAIT_SECONDS)
        big.future.result(WAIT_SECONDS)
    assert sampler.calls == 0
    assert max(steps.batch_sizes) >= 65  # the small job's row shared calls with the big job's
    x0 = torch.randn(1, 2, generator=torch.Generator().manual_seed(2))
    expected = sample(loaded.velocity_fn(), x0, 8, "euler")
    torch.testing.assert_close(small_result.samples, expected, rtol=1e-5, atol=1e-5)


def test_a_failing_sampler_fails_only_its_job(unconditional: Served) -> None:
    model, steps, sampler = _served(unconditional, fail=True)
    with running_engine() as engine:
        failed = engine.submit(SampleJob(model, 1, 4, "euler", seed=0))
        with pytest.raises(BackendFailed, match="injected sampler fault"):
            failed.future.result(WAIT_SECONDS)
        assert engine.stats().running_rows == engine.stats().pending_network_evaluations == 0
        # The engine carries on: the next costly job is served step by step.
        result = engine.submit(SampleJob(model, 300, 1, "euler", seed=0)).future.result(
            WAIT_SECONDS
        )
    assert (sampler.calls, steps.calls) == (1, 1) and result.samples.shape == (300, 2)


class GatedSampler(CountingSampler):
    """Blocks inside the call until `release` is set."""

    def __init__(self, inner: WholeLoopSampler) -> None:
        super().__init__(inner)
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, *args: object) -> Tensor:
        self.entered.set()
        assert self.release.wait(WAIT_SECONDS)
        return super().__call__(*args)  # type: ignore[arg-type]


def _submit_in_thread(engine: Engine, job: SampleJob) -> tuple[threading.Thread, list[JobHandle]]:
    """Submit from another thread (a solo job runs inside submit); the handle lands in the list."""
    handles: list[JobHandle] = []
    thread = threading.Thread(target=lambda: handles.append(engine.submit(job)), daemon=True)
    thread.start()
    return thread, handles


def test_a_job_arriving_during_a_solo_call_waits_for_it_then_batches(
    unconditional: Served,
) -> None:
    model, _, sampler = unconditional
    steps = RecordingBackend(model.backend)
    gated = GatedSampler(sampler)
    wired = ServedModel(model.name, 1, model.config, steps, steps, gated)  # type: ignore[arg-type]
    with running_engine() as engine:
        thread, handles = _submit_in_thread(engine, SampleJob(wired, 1, 4, "euler", seed=0))
        assert gated.entered.wait(WAIT_SECONDS)
        # The engine is not idle any more: this one is queued for the loop...
        waiting = engine.submit(SampleJob(wired, 1, 4, "euler", seed=1))
        assert engine.stats().queued_rows == 1
        # ...which admits nothing while the solo call holds the device (checked for 50 ms).
        assert not wait_until(lambda: steps.calls > 0, timeout=0.05)
        gated.release.set()
        thread.join(WAIT_SECONDS)
        solo_result = handles[0].future.result(WAIT_SECONDS)
        waited_result = waiting.future.result(WAIT_SECONDS)
        assert engine.stats() == EngineStats(0, 0, 0)
    assert (gated.calls, steps.calls) == (1, 4)
    assert solo_result.samples.shape == waited_result.samples.shape == (1, 2)


def test_shutdown_during_a_solo_call_fails_it_cleanly(unconditional: Served) -> None:
    model, _, sampler = unconditional
    gated = GatedSampler(sampler)
    wired = ServedModel(model.name, 1, model.config, model.backend, model.eager, gated)
    engine = Engine(EngineConfig())
    engine.start()
    thread, handles = _submit_in_thread(engine, SampleJob(wired, 1, 4, "euler", seed=0))
    assert gated.entered.wait(WAIT_SECONDS)
    engine.shutdown()
    gated.release.set()
    thread.join(WAIT_SECONDS)
    with pytest.raises(EngineClosed):
        handles[0].future.result(WAIT_SECONDS)
    assert engine.stats() == EngineStats(0, 0, 0)


def test_warm_up_runs_the_whole_loop_and_the_per_step_network(unconditional: Served) -> None:
    """A model with a whole-loop sampler is warmed on both paths: a broken per-step network
    fails the warm-up although the solo path works."""
    model, _, sampler = unconditional
    steps = RecordingBackend(model.backend)
    counting = CountingSampler(sampler)
    wired = ServedModel(model.name, 1, model.config, steps, model.eager, counting)  # type: ignore[arg-type]
    entry = ModelEntry(wired, Path("."), (1,), False, ("eager", "onnxruntime"))
    with running_engine() as engine:
        warm_up(entry, engine, exact_max_dimension=8)
        assert counting.calls == 1 and steps.calls == 4  # 2 warm-up steps x 2 Heun stages
        broken = RecordingBackend(model.backend, fail_on=(1,))
        wired = ServedModel(model.name, 1, model.config, broken, model.eager, counting)  # type: ignore[arg-type]
        entry = ModelEntry(wired, Path("."), (1,), False, ("eager", "onnxruntime"))
        with pytest.raises(WarmupFailed, match="injected fault"):
            warm_up(entry, engine, exact_max_dimension=8)
