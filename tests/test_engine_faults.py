"""Limits and faults: queue caps, cancellation, deadlines, backend failures, shutdown, crashes.

Every future must resolve, every freed row must leave stats(), and the loop must go on. Timing
is controlled with RecordingBackend's gate (calls block until the test opens it), never with
bare sleeps; every wait is bounded by WAIT_SECONDS.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

import pytest
import torch

from flows.solvers import sample
from server.engine import (
    BackendFailed,
    EngineClosed,
    EngineConfig,
    EngineError,
    EngineStats,
    JobCancelled,
    JobDeadlineExceeded,
    QueueFull,
    SampleJob,
)
from tests.test_engine_support import (
    WAIT_SECONDS,
    RecordingBackend,
    make_model,
    running_engine,
    seeded_noise,
    wait_until,
    with_backend,
)

IDLE = EngineStats(queued_rows=0, running_rows=0, pending_network_evaluations=0)
# Same arithmetic, different batch blocking: float32 rounding only.
BATCH_TOL = 1e-5


def test_stats_count_queued_rows_and_owed_evaluations() -> None:
    model, _ = make_model(num_classes=3)
    with running_engine(start=False) as engine:
        engine.submit(SampleJob(model, 3, 5, "heun"))
        engine.submit(
            SampleJob(model, 2, 4, "rk4", class_labels=torch.tensor([0, 1]), guidance_scale=2.0)
        )
        # heun: 3 rows * 5 steps * 2 stages; guided rk4: 2 rows * 2 (cfg) * 4 steps * 4 stages.
        assert engine.stats() == EngineStats(5, 0, 3 * 5 * 2 + 2 * 2 * 4 * 4)
        engine.start()
        assert wait_until(lambda: engine.stats() == IDLE)


def test_queue_full_is_raised_at_once_and_shutdown_fails_the_queued() -> None:
    model, _ = make_model()
    with running_engine(EngineConfig(max_rows_queued=10), start=False) as engine:
        first = engine.submit(SampleJob(model, 6, 3, "euler"))
        with pytest.raises(QueueFull, match="max_rows_queued"):
            engine.submit(SampleJob(model, 5, 3, "euler"))
        second = engine.submit(SampleJob(model, 4, 3, "euler"))  # exactly at the cap
        engine.shutdown()
        for handle in (first, second):
            with pytest.raises(EngineClosed):
                handle.future.result(WAIT_SECONDS)
        with pytest.raises(EngineClosed):
            engine.submit(SampleJob(model, 1, 3, "euler"))


def test_in_flight_cap_admits_in_arrival_order() -> None:
    model, _ = make_model()
    recording = RecordingBackend(model.backend)
    gated = with_backend(model, recording)
    recording.gate.clear()
    with running_engine(EngineConfig(max_rows_in_flight=4, fill_wait_seconds=0.0)) as engine:
        a = engine.submit(SampleJob(gated, 3, 2, "euler", seed=0))
        assert recording.entered.wait(WAIT_SECONDS)
        b = engine.submit(SampleJob(gated, 2, 2, "euler", seed=1))  # 3 + 2 > 4: waits
        c = engine.submit(SampleJob(gated, 1, 2, "euler", seed=2))  # would fit, but after b
        assert wait_until(lambda: engine.stats().queued_rows == 3)
        assert engine.stats().running_rows == 3
        recording.gate.set()
        for handle in (a, b, c):
            handle.future.result(WAIT_SECONDS)
    # a alone (bucket 4) for its 2 steps, then b and c together (3 rows -> bucket 4).
    assert recording.batch_sizes == [4, 4, 4, 4]


def test_cancel_frees_rows_at_the_next_iteration() -> None:
    model, _ = make_model()
    recording = RecordingBackend(model.backend)
    gated = with_backend(model, recording)
    with running_engine() as engine:
        recording.gate.clear()
        victim = engine.submit(SampleJob(gated, 4, 50, "heun", seed=1))
        survivor = engine.submit(SampleJob(gated, 2, 3, "heun", seed=2))
        assert recording.entered.wait(WAIT_SECONDS)
        victim.cancel()
        with pytest.raises(JobCancelled):
            victim.future.result(WAIT_SECONDS)  # resolves at once, before the loop moves on
        recording.gate.set()
        survivor_result = survivor.future.result(WAIT_SECONDS)
        assert wait_until(lambda: engine.stats() == IDLE)
        victim.cancel()  # cancelling twice (or after the end) does nothing
    model_ref = make_model()[1]
    expected = sample(model_ref.velocity_fn(), seeded_noise(2, 2, 2), 3, "heun")
    torch.testing.assert_close(survivor_result.samples, expected, atol=BATCH_TOL, rtol=0)


def test_cancelling_the_future_itself_also_frees_the_rows() -> None:
    model, _ = make_model()
    recording = RecordingBackend(model.backend)
    gated = with_backend(model, recording)
    with running_engine() as engine:
        recording.gate.clear()
        handle = engine.submit(SampleJob(gated, 3, 50, "euler"))
        assert recording.entered.wait(WAIT_SECONDS)
        assert handle.future.cancel()  # never marked running, so the future can be cancelled
        recording.gate.set()
        assert wait_until(lambda: engine.stats() == IDLE)
        assert recording.calls == 1  # the cancel was queued before the first call returned


def test_cancel_of_a_queued_job_removes_it_from_the_queue() -> None:
    model, _ = make_model()
    with running_engine(start=False) as engine:
        handle = engine.submit(SampleJob(model, 7, 3, "euler"))
        handle.cancel()
        engine.start()
        assert wait_until(lambda: engine.stats() == IDLE)
        with pytest.raises(JobCancelled):
            handle.future.result(WAIT_SECONDS)


def test_deadline_in_the_past_and_during_the_run() -> None:
    model, _ = make_model()
    slow = with_backend(model, RecordingBackend(model.backend, delay=0.002))
    with running_engine() as engine:
        late = engine.submit(SampleJob(model, 2, 3, "euler", deadline=time.monotonic() - 1.0))
        with pytest.raises(JobDeadlineExceeded):
            late.future.result(WAIT_SECONDS)
        # 1000 steps of >= 2 ms each cannot finish within 50 ms.
        running = engine.submit(SampleJob(slow, 2, 1000, "euler", deadline=time.monotonic() + 0.05))
        with pytest.raises(JobDeadlineExceeded):
            running.future.result(WAIT_SECONDS)
        assert wait_until(lambda: engine.stats() == IDLE)
        ok = engine.submit(SampleJob(model, 1, 2, "euler", deadline=time.monotonic() + 60))
        ok.future.result(WAIT_SECONDS)


def test_backend_fault_fails_exactly_the_jobs_in_that_call() -> None:
    model, loaded = make_model()
    other_model, other_loaded = make_model(name="other", seed=1)
    faulty = RecordingBackend(model.backend, fail_on=(1,))
    flaky = with_backend(model, faulty)
    # 4 rows per call: a (2 rows) and b (2 rows) fill the first call, c waits for the second.
    config = EngineConfig(max_rows_per_call=4, batch_buckets=(1, 2, 4))
    with running_engine(config, start=False) as engine:
        a = engine.submit(SampleJob(flaky, 2, 3, "euler", seed=1))
        b = engine.submit(SampleJob(flaky, 2, 3, "euler", seed=2))
        c = engine.submit(SampleJob(flaky, 2, 3, "euler", seed=3))
        d = engine.submit(SampleJob(other_model, 2, 3, "euler", seed=4))  # its own lane
        engine.start()
        for handle in (a, b):
            with pytest.raises(BackendFailed) as failure:
                handle.future.result(WAIT_SECONDS)
            assert isinstance(failure.value.__cause__, RuntimeError)
            assert "injected fault" in str(failure.value)
        c_result = c.future.result(WAIT_SECONDS)
        d_result = d.future.result(WAIT_SECONDS)
        assert wait_until(lambda: engine.stats() == IDLE)
        after = engine.submit(SampleJob(flaky, 1, 2, "euler", seed=5))  # the loop goes on
        after.future.result(WAIT_SECONDS)
    expected_c = sample(loaded.velocity_fn(), seeded_noise(3, 2, 2), 3, "euler")
    expected_d = sample(other_loaded.velocity_fn(), seeded_noise(4, 2, 2), 3, "euler")
    torch.testing.assert_close(c_result.samples, expected_c, atol=BATCH_TOL, rtol=0)
    torch.testing.assert_close(d_result.samples, expected_d, atol=BATCH_TOL, rtol=0)


def test_fault_in_the_last_chunk_of_a_stage_lets_the_rest_of_the_group_go_on() -> None:
    # a, b and c form one group of 6 rows served 4 per call: call 1 evaluates a and b, call 2
    # evaluates c and fails. a and b already hold their stage result, so the stage must complete
    # without c (no call is left to complete it) and they finish as if alone.
    model, loaded = make_model()
    faulty = with_backend(model, RecordingBackend(model.backend, fail_on=(2,)))
    config = EngineConfig(max_rows_per_call=4, batch_buckets=(1, 2, 4))
    with running_engine(config, start=False) as engine:
        handles = [engine.submit(SampleJob(faulty, 2, 3, "heun", seed=i)) for i in range(3)]
        engine.start()
        with pytest.raises(BackendFailed):
            handles[2].future.result(WAIT_SECONDS)
        for seed in (0, 1):
            got = handles[seed].future.result(WAIT_SECONDS).samples
            expected = sample(loaded.velocity_fn(), seeded_noise(seed, 2, 2), 3, "heun")
            torch.testing.assert_close(got, expected, atol=BATCH_TOL, rtol=0)
        assert wait_until(lambda: engine.stats() == IDLE)
        assert engine.drain(WAIT_SECONDS)


def test_backend_returning_a_wrong_shape_fails_the_batch() -> None:
    model, _ = make_model()
    broken = with_backend(model, RecordingBackend(lambda x, t, labels: x[:, :1]))
    with running_engine() as engine:
        handle = engine.submit(SampleJob(broken, 2, 3, "euler"))
        with pytest.raises(BackendFailed, match="returned"):
            handle.future.result(WAIT_SECONDS)


def test_shutdown_with_pending_jobs_resolves_every_future() -> None:
    model, _ = make_model()
    recording = RecordingBackend(model.backend)
    gated = with_backend(model, recording)
    engine_config = EngineConfig(max_rows_in_flight=2)
    with running_engine(engine_config) as engine:
        recording.gate.clear()
        handles = [engine.submit(SampleJob(gated, 2, 20, "heun", seed=i)) for i in range(5)]
        assert recording.entered.wait(WAIT_SECONDS)
        stopper = threading.Thread(target=engine.shutdown)
        stopper.start()
        recording.gate.set()  # the call in progress finishes; nothing else runs
        stopper.join(WAIT_SECONDS)
        assert not stopper.is_alive()
        _done, not_done = concurrent.futures.wait([h.future for h in handles], WAIT_SECONDS)
        assert not not_done
        for handle in handles:
            with pytest.raises(EngineClosed):
                handle.future.result(0)


def test_shutdown_grace_lets_running_jobs_finish() -> None:
    model, _ = make_model()
    with running_engine() as engine:
        handle = engine.submit(SampleJob(model, 2, 30, "heun", seed=1))
        engine.shutdown(grace_seconds=WAIT_SECONDS)
        assert handle.future.result(0).samples.shape == (2, 2)


def test_drain_stops_admission_and_waits_for_in_flight_jobs() -> None:
    model, _ = make_model()
    recording = RecordingBackend(model.backend)
    gated = with_backend(model, recording)
    with running_engine() as engine:
        recording.gate.clear()
        handle = engine.submit(SampleJob(gated, 1, 5, "euler"))
        assert recording.entered.wait(WAIT_SECONDS)
        assert engine.drain(timeout=0.01) is False  # the gate holds the job
        with pytest.raises(EngineClosed):
            engine.submit(SampleJob(model, 1, 5, "euler"))
        recording.gate.set()
        assert engine.drain(timeout=WAIT_SECONDS) is True
        assert handle.future.done()


def test_unexpected_loop_error_fails_pending_jobs_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = make_model()
    with running_engine(start=False) as engine:
        original = engine._start_groups
        calls = {"n": 0}

        def explode_once(admitted):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("engine bug")
            original(admitted)

        monkeypatch.setattr(engine, "_start_groups", explode_once)
        pending = [engine.submit(SampleJob(model, 2, 3, "euler")) for _ in range(3)]
        with caplog.at_level(logging.ERROR, logger="server.engine.engine"):
            engine.start()
            for handle in pending:
                with pytest.raises(EngineError, match="engine bug"):
                    handle.future.result(WAIT_SECONDS)
        assert any("engine loop failed" in r.message for r in caplog.records)
        assert engine.stats() == IDLE
        later = engine.submit(SampleJob(model, 1, 2, "euler"))
        later.future.result(WAIT_SECONDS)


def test_progress_callback_that_raises_fails_only_its_job() -> None:
    model, _ = make_model()

    def broken(_progress: object) -> None:
        raise OSError("client went away")

    with running_engine(start=False) as engine:
        bad = engine.submit(SampleJob(model, 1, 5, "euler", seed=1), on_progress=broken)
        good = engine.submit(SampleJob(model, 1, 5, "euler", seed=2))
        engine.start()
        with pytest.raises(EngineError, match="on_progress") as failure:
            bad.future.result(WAIT_SECONDS)
        assert isinstance(failure.value.__cause__, OSError)
        good.future.result(WAIT_SECONDS)
        assert wait_until(lambda: engine.stats() == IDLE)


def test_observer_sees_calls_and_finished_jobs() -> None:
    model, _ = make_model()
    events: list[tuple[object, ...]] = []

    class Observer:
        def on_network_call(self, model: str, rows: int, padded_rows: int, seconds: float) -> None:
            events.append(("call", model, rows, padded_rows, seconds >= 0))

        def on_job_done(self, model: str, kind: str, samples: int, evaluations: int) -> None:
            events.append(("done", model, kind, samples, evaluations))

    with running_engine(start=False) as engine:
        engine._observer = Observer()
        handle = engine.submit(SampleJob(model, 3, 2, "heun"))
        engine.start()
        handle.future.result(WAIT_SECONDS)
        assert wait_until(lambda: len(events) == 5)
    assert events[:4] == [("call", "mlp", 3, 4, True)] * 4  # 2 steps x 2 stages, bucket 4
    assert events[4] == ("done", "mlp", "sample", 3, 12)


@pytest.mark.parametrize("policy", ["step", "request"])
def test_request_policy_holds_answers_until_its_batch_is_done(policy: str) -> None:
    model, _ = make_model()
    # The short job (2 Euler steps) is done after call 2; call 3 and later block on the gate.
    recording = RecordingBackend(model.backend, hold_from=3)
    recording.gate.clear()
    gated = with_backend(model, recording)
    with running_engine(EngineConfig(policy=policy), start=False) as engine:
        short = engine.submit(SampleJob(gated, 1, 2, "euler"))
        long = engine.submit(SampleJob(gated, 1, 6, "euler"))
        engine.start()
        assert recording.blocked.wait(WAIT_SECONDS)
        if policy == "step":
            short.future.result(WAIT_SECONDS)  # answered while the long job still runs
        else:
            assert not short.future.done()  # held until the whole batch is done
        assert not long.future.done()
        recording.gate.set()
        short.future.result(WAIT_SECONDS)
        long.future.result(WAIT_SECONDS)
    assert recording.calls == 6  # the short job's row leaves the calls either way
