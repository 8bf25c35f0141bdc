"""The engine: one loop thread that owns the device and serves every job's rows step by step.

Each iteration of the loop:

1. takes cancellations and expired deadlines, and frees those jobs' rows;
2. admits queued jobs as the batching policy allows, in arrival order; jobs admitted together
   on the same model with the same solver form one row group (one state tensor);
3. makes one network call per model lane: the sampling lane gathers pending rows from any
   groups (any t, step count, solver, guidance scale), the likelihood lane likewise with
   divergences; a call that raises fails exactly the jobs with rows in it;
4. hands out progress and trajectory snapshots, and finishes jobs whose last step is done.

The solo fast path (`solo.py`): a small sample job submitted to an idle engine runs on the
submitting thread as one call of its model's whole-loop sampler; the loop admits nothing until
that call returns, so the device still has one user at a time.

A loop that falls idle after work, and stays idle for IDLE_TRIM_SECONDS, hands the C heap's free
pages back to the OS (`release_free_memory`), so that memory returns after a burst.

Threads: `submit`, `cancel`, `stats`, `drain` and `shutdown` may be called from any thread; they
touch only the queue and the counters under one lock (and `submit` may run a solo job). Everything
else belongs to the loop.
Every future resolves: with a result, or with an EngineError when the job is cancelled, expires,
fails in a network call, is shut down, or when the loop itself hits a bug (then every pending job
fails and the loop carries on with a clean state).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from flows.solvers import TABLEAUS
from server.engine.api import (
    EngineConfig,
    EngineObserver,
    EngineStats,
    LikelihoodJob,
    LikelihoodResult,
    Progress,
    SampleJob,
    SampleResult,
)
from server.engine.errors import (
    BackendFailed,
    EngineClosed,
    EngineError,
    JobDeadlineExceeded,
    QueueFull,
)
from server.engine.groups import STEP_DONE, RowGroup, SampleGroup
from server.engine.handle import JobHandle, resolve
from server.engine.lanes import Lane, LikelihoodLane, SampleLane, Segment
from server.engine.likelihood_groups import LikelihoodGroup
from server.engine.policy import make_policy
from server.engine.records import JobRecord, prepare_record
from server.engine.solo import solo_cost, whole_loop_samples
from server.engine.updaters import StateUpdater, TorchUpdater

logger = logging.getLogger(__name__)

_QUEUED, _RUNNING, _HELD, _DONE = "queued", "running", "held", "done"
# The deadline heap is rebuilt when it holds this many times more entries than live jobs.
_DEADLINE_SLACK = 4
# After work, how long the loop must stay idle before it hands freed heap memory back to the OS
# (see `release_free_memory`): long enough that steady traffic never pays for it.
IDLE_TRIM_SECONDS = 1.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only; musl and macOS have none
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's malloc_trim; elsewhere nothing).

    A burst leaves many small freed blocks (trajectory snapshots, step states, encoded
    responses) scattered through glibc's per-thread arenas, and glibc gives back only the free
    space at an arena's top: without this the server's RSS stayed 38 MB above its level before
    the Sample burst of tests/test_overload.py (70-110 MB after repeated bursts) although
    nothing was referenced any more. A trim after a large burst takes up to ~0.2 s (nothing
    after a quiet period), which only a request arriving at that moment waits for.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Engine:
    """Step-level continuous batching of sampling and likelihood jobs on one loop thread.

    Args:
        config: Limits, buckets, timing, policy and device.
        observer: Receives per-call and per-job events (metrics), or None.
    """

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None) -> None:
        if not isinstance(config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.config = config
        self._observer = observer
        self._policy = make_policy(config)
        try:
            self._device = torch.device(config.device)
        except RuntimeError as error:
            raise ValueError(f"device must be a torch device, got {config.device!r}") from error
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} needs CUDA, which is not available")
        self._ids = itertools.count(1)
        # Shared state, guarded by _lock.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[JobRecord] = deque()
        self._live: dict[int, JobRecord] = {}
        self._cancels: list[int] = []
        self._deadlines: list[tuple[float, int]] = []
        self._queued_rows = 0
        self._running_rows = 0
        self._pending_evaluations = 0
        self._closed = False
        self._stopping = False
        # A solo job is running on its submitting thread; the loop admits nothing meanwhile.
        self._solo_running = False
        # Work was admitted since the loop last released free memory (see _take_work).
        self._trim_due = False
        self._thread: threading.Thread | None = None
        # Loop-owned state.
        self._sample_lanes: dict[tuple[object, ...], SampleLane] = {}
        self._likelihood_lanes: dict[tuple[object, ...], LikelihoodLane] = {}
        self._held: list[tuple[JobRecord, SampleResult | LikelihoodResult]] = []

    # ----------------------------------------------------------------- public API

    def start(self) -> None:
        """Start the loop thread (once; later calls do nothing)."""
        with self._lock:
            if self._thread is not None:
                return
            if self._stopping:
                raise EngineClosed("the engine was shut down and cannot be restarted")
            self._thread = threading.Thread(target=self._run, name="flowserve-engine", daemon=True)
            self._thread.start()

    def submit(
        self, job: SampleJob | LikelihoodJob, on_progress: Callable[[Progress], None] | None = None
    ) -> JobHandle:
        """Queue a job, or run it at once when it qualifies for the solo fast path.

        A sample job that finds the engine idle (started, no job live) and costs its model's
        whole-loop sampler at most `solo_max_evaluations` evaluations runs here, on the calling
        thread, and the returned handle's future is already resolved.

        Args:
            job: A SampleJob or LikelihoodJob.
            on_progress: Called on the engine thread after every completed step with a Progress
                (and its trajectory snapshot when one is due); must be cheap and must not block.

        Returns:
            The job's handle; its future resolves to the result or an EngineError.

        Raises:
            ValueError: The job is impossible (shapes, solver, labels); see records.py.
            QueueFull: Its rows would exceed `max_rows_queued`.
            EngineClosed: The engine is draining or shut down.
        """
        if on_progress is not None and not callable(on_progress):
            raise ValueError("on_progress must be callable or None")
        job_id = next(self._ids)
        record = prepare_record(job_id, job, on_progress)
        cost = solo_cost(record)
        solo = cost is not None and cost <= self.config.solo_max_evaluations
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is draining or shut down")
            claimed = solo and self._claim_solo(record)
            if not claimed:
                self._enqueue(record)
        if claimed:
            self._run_solo(record)
        # A caller may cancel the future itself rather than the handle; free the rows then too.
        record.future.add_done_callback(self._on_future_done(job_id))
        return JobHandle(job_id, record.future, self._request_cancel)

    def _enqueue(self, record: JobRecord) -> None:
        """Lock held: queue `record` for the loop."""
        if self._queued_rows + record.rows > self.config.max_rows_queued:
            raise QueueFull(
                f"queue full: {self._queued_rows} rows queued, the job has {record.rows}, "
                f"max_rows_queued is {self.config.max_rows_queued}"
            )
        record.state = _QUEUED
        self._queue.append(record)
        self._live[record.job_id] = record
        self._queued_rows += record.rows
        self._pending_evaluations += record.evaluations
        if record.deadline is not None:
            heapq.heappush(self._deadlines, (record.deadline, record.job_id))
        self._wake.notify_all()

    def _claim_solo(self, record: JobRecord) -> bool:
        """Lock held: take the device for `record` if the engine is idle (and the job's deadline
        has not passed: the loop answers that one)."""
        now = time.monotonic()
        if self._thread is None or self._live or self._solo_running:
            return False
        if record.deadline is not None and record.deadline <= now:
            return False
        self._solo_running = True
        record.state = _RUNNING
        record.admitted = now
        self._live[record.job_id] = record
        self._running_rows += record.rows
        self._pending_evaluations += record.evaluations
        return True

    def _run_solo(self, record: JobRecord) -> None:
        """Run a claimed solo job on this thread, then hand the device back to the loop."""
        try:
            samples: Tensor | None = whole_loop_samples(record)
            error: EngineError | None = None
        except Exception as raised:
            logger.warning("whole-loop sampler of model %s failed: %r", record.model.name, raised)
            samples = None
            error = BackendFailed(
                f"whole-loop sampler of model {record.model.name!r} failed: {raised!r}"
            )
            error.__cause__ = raised
        with self._lock:
            self._solo_running = False
            # A shutdown may have failed the job meanwhile and reset the counters.
            if self._live.get(record.job_id) is record:
                self._running_rows -= record.rows
                self._pending_evaluations -= record.evaluations
            self._wake.notify_all()
        if samples is None:
            resolve(record.future, error=error)
            self._finish(record)
        else:
            self._answer(record, _sample_result(record, samples, time.monotonic()))

    def stats(self) -> EngineStats:
        """A consistent snapshot of queued rows, running rows and owed network evaluations."""
        with self._lock:
            return EngineStats(
                queued_rows=self._queued_rows,
                running_rows=self._running_rows,
                pending_network_evaluations=self._pending_evaluations,
            )

    def drain(self, timeout: float) -> bool:
        """Stop admitting (submit raises EngineClosed) and wait for every job to finish.

        Args:
            timeout: Seconds to wait at most.

        Returns:
            True when no job is left, False when the timeout came first.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            self._closed = True
            while self._live:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
            return True

    def shutdown(self, grace_seconds: float = 0.0) -> None:
        """Finish or fail every pending job and stop the loop thread.

        Jobs still pending after `grace_seconds` fail with EngineClosed. Safe to call twice.

        Args:
            grace_seconds: Time jobs are given to finish first.
        """
        if grace_seconds > 0:
            self.drain(grace_seconds)
        with self._lock:
            self._closed = True
            self._stopping = True
            thread = self._thread
            self._wake.notify_all()
        if thread is None:
            self._fail_all(EngineClosed("the engine was shut down before the job started"))
        elif thread is not threading.current_thread():
            thread.join()

    # ------------------------------------------------------------- cancellation

    def _on_future_done(self, job_id: int) -> Callable[[concurrent.futures.Future[Any]], None]:
        def callback(future: concurrent.futures.Future[Any]) -> None:
            if future.cancelled():
                self._request_cancel(job_id)

        return callback

    def _request_cancel(self, job_id: int) -> None:
        # Called by JobHandle.cancel() (any thread) after it resolved the future.
        with self._lock:
            self._cancels.append(job_id)
            self._wake.notify_all()

    # --------------------------------------------------------------------- loop

    def _run(self) -> None:
        # torch.set_num_threads reaches OpenMP only in the thread that called it; a new thread
        # starts with OpenMP's default team (every core), whose spinning workers made each call
        # ~20x slower on a busy 2-core machine. Re-apply the process setting here.
        torch.set_num_threads(torch.get_num_threads())
        while True:
            try:
                with torch.no_grad():
                    if not self._iterate():
                        break
            except Exception as error:  # a bug in the engine: no job may be left hanging
                logger.exception("engine loop failed; failing every pending job")
                self._fail_all(EngineError(f"internal engine error: {error!r}"))
        self._fail_all(EngineClosed("the engine was shut down before the job finished"))

    def _iterate(self) -> bool:
        """One loop iteration; returns False when the loop should stop."""
        admitted, cancelled, expired = self._take_work()
        if admitted is None:
            return False
        for record in cancelled:
            self._discard(record)
        for record in expired:
            self._fail(record, JobDeadlineExceeded(f"job {record.job_id} passed its deadline"))
        self._start_groups(admitted)
        stepped: list[RowGroup] = []
        for lane in self._lanes():
            stepped.extend(self._call(lane))
        self._advance(stepped)
        self._deliver()
        return True

    def _take_work(
        self,
    ) -> tuple[list[JobRecord] | None, list[JobRecord], list[JobRecord]]:
        """Wait for work, then take cancellations, expiries and admissions (under the lock).

        An idle loop that has done work since its last trim waits IDLE_TRIM_SECONDS for more;
        if none comes it releases free memory (outside the lock, so submit() never waits for
        it) and returns nothing to do.
        """
        with self._lock:
            if self._wait_for_work():
                return self._take_work_locked()
        release_free_memory()
        return [], [], []

    def _wait_for_work(self) -> bool:
        """Lock held: wait until there is work (True), or until it is time to trim (False).

        While a solo job holds the device there is nothing the loop may do.
        """
        while not self._stopping and (
            self._solo_running or not (self._running_rows or self._queue or self._cancels)
        ):
            if not self._trim_due or self._solo_running:
                self._wake.wait()
            elif not self._wake.wait(IDLE_TRIM_SECONDS):
                self._trim_due = False
                return False
        return True

    def _take_work_locked(
        self,
    ) -> tuple[list[JobRecord] | None, list[JobRecord], list[JobRecord]]:
        """Lock held, work present: take cancellations, expiries and admissions."""
        if self._stopping:
            return None, [], []
        if self._running_rows == 0 and self._queue and self.config.fill_wait_seconds > 0:
            # Idle loop: give concurrent arrivals a moment to share the first call.
            fill_until = self._queue[0].submitted + self.config.fill_wait_seconds
            while (left := fill_until - time.monotonic()) > 0 and not self._stopping:
                self._wake.wait(left)
            if self._stopping:
                return None, [], []
        cancelled = [self._live[i] for i in self._cancels if i in self._live]
        self._cancels.clear()
        expired: list[JobRecord] = []
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self._deadlines)
            record = self._live.get(job_id)
            if record is not None:
                expired.append(record)
        gone = {r.job_id for r in cancelled} | {r.job_id for r in expired}
        if gone:
            self._unqueue(gone)
        count = self._policy.admit(self._queue_view(), self._running_rows)
        admitted = [self._queue.popleft() for _ in range(count)]
        if admitted:
            self._trim_due = True
        for record in admitted:
            record.state = _RUNNING
            record.admitted = now
            self._queued_rows -= record.rows
            self._running_rows += record.rows
        return admitted, cancelled, expired

    def _queue_view(self) -> Iterator[tuple[int, int]]:
        return ((r.rows, r.width) for r in self._queue)

    def _unqueue(self, job_ids: set[int]) -> None:
        # Lock held. Removing from the middle of the queue is O(queue) but only on cancel/expiry.
        kept: deque[JobRecord] = deque()
        for record in self._queue:
            if record.job_id in job_ids:
                self._queued_rows -= record.rows
                self._pending_evaluations -= record.evaluations
                record.state = _DONE
                self._live.pop(record.job_id, None)
            else:
                kept.append(record)
        self._queue = kept
        if not self._live:
            self._wake.notify_all()

    def _lanes(self) -> Iterable[Lane]:
        yield from list(self._sample_lanes.values())
        yield from list(self._likelihood_lanes.values())

    # ------------------------------------------------------------ admission

    def _start_groups(self, admitted: list[JobRecord]) -> None:
        """Put admitted jobs into row groups: one per (lane, solver, width, estimator)."""
        batches: dict[tuple[object, ...], list[JobRecord]] = {}
        for record in admitted:
            if record.state != _RUNNING:
                continue
            job = record.job
            if isinstance(job, SampleJob):
                key: tuple[object, ...] = ("sample", _lane_key(record), job.solver, record.width)
            else:
                assert isinstance(job, LikelihoodJob)
                key = ("likelihood", _lane_key(record), job.solver, job.estimator, job.num_probes)
            batches.setdefault(key, []).append(record)
        for key, records in batches.items():
            first = records[0]
            updater = _updater(first)
            if key[0] == "sample":
                solver = first.job.solver
                tableau = TABLEAUS.get(solver)
                sample_lane = self._sample_lane(first)
                joinable = self._joinable(sample_lane, solver, first.width)
                if joinable is not None:
                    joinable.join(records)
                    continue
                sample_lane.add(
                    SampleGroup(
                        records,
                        tableau,
                        updater,
                        self._device,
                        first.math.path,
                        first.math.null_label,
                    )
                )
            else:
                likelihood_lane = self._likelihood_lane(first)
                likelihood_lane.add(
                    LikelihoodGroup(
                        records, TABLEAUS[first.job.solver], updater, self._device, first.math
                    )
                )

    def _joinable(self, lane: SampleLane, solver: str, width: int) -> SampleGroup | None:
        """A running group of `lane` that new jobs with this solver and width may join.

        Only under step-level batching: request-level batching must keep whole requests apart.
        """
        if self.config.policy != "step":
            return None
        for group in lane.groups:
            if (
                isinstance(group, SampleGroup)
                and group.can_join()
                and group.width == width
                and group.records[0].job.solver == solver
            ):
                return group
        return None

    def _sample_lane(self, record: JobRecord) -> SampleLane:
        key = _lane_key(record)
        if key not in self._sample_lanes:
            self._sample_lanes[key] = SampleLane(
                record.model, record.math, self.config.batch_buckets, self._device
            )
        return self._sample_lanes[key]

    def _likelihood_lane(self, record: JobRecord) -> LikelihoodLane:
        job = record.job
        assert isinstance(job, LikelihoodJob)
        # One lane per estimator and probe count: their divergences cannot share a call.
        key = (*_lane_key(record), job.estimator, job.num_probes)
        if key not in self._likelihood_lanes:
            self._likelihood_lanes[key] = LikelihoodLane(record.model, record.math, self._device)
        return self._likelihood_lanes[key]

    # ----------------------------------------------------------- network calls

    def _call(self, lane: Lane) -> list[RowGroup]:
        """One network call on `lane`; returns the groups that completed a step."""
        segments = lane.gather(self.config.max_rows_per_call)
        if not segments:
            return []
        started = time.perf_counter()
        try:
            outputs, network_rows, padded = lane.evaluate(segments)
        except Exception as error:
            self._fail_segments(lane, segments, error)
            return []
        seconds = time.perf_counter() - started
        stepped = lane.scatter(segments, outputs)
        with self._lock:
            self._pending_evaluations -= network_rows
        if self._observer is not None:
            try:
                self._observer.on_network_call(lane.model.name, network_rows, padded, seconds)
            except Exception:
                logger.exception("engine observer raised in on_network_call; the event is dropped")
        return stepped

    def _fail_segments(
        self, lane: Lane, segments: list[Segment[RowGroup]], error: Exception
    ) -> None:
        logger.warning("network call on model %s failed: %r", lane.model.name, error)
        failed: list[JobRecord] = []
        for s in segments:
            stop = s.start + s.count
            failed.extend(r for r in s.group.records if r.start < stop and r.stop > s.start)
        for record in failed:
            failure = BackendFailed(f"network call on model {lane.model.name!r} failed: {error!r}")
            failure.__cause__ = error
            self._fail(record, failure)

    # ------------------------------------------------------- steps and results

    def _advance(self, stepped: list[RowGroup]) -> None:
        """Progress callbacks, trajectory snapshots and finished jobs of groups that stepped."""
        for group in stepped:
            for record in list(group.watchers):
                self._report_progress(group, record)
            finished = [r for r in group.due() if r.state == _RUNNING]
            if not finished:
                continue
            now = time.monotonic()
            for record in finished:
                self._held.append((record, self._result(group, record, now)))
                record.state = _HELD
            rows = sum(r.rows for r in finished)
            group.remove(set(finished))
            with self._lock:
                self._running_rows -= rows
        self._prune_lanes()

    def _prune_lanes(self) -> None:
        """Drop empty groups, and lanes with no groups (they hold their model alive)."""
        for key, sample_lane in list(self._sample_lanes.items()):
            sample_lane.prune()
            if not sample_lane.groups:
                del self._sample_lanes[key]
        for key, likelihood_lane in list(self._likelihood_lanes.items()):
            likelihood_lane.prune()
            if not likelihood_lane.groups:
                del self._likelihood_lanes[key]

    def _report_progress(self, group: RowGroup, record: JobRecord) -> None:
        steps_done = group.steps_done(record)
        if record.state != _RUNNING or steps_done > record.num_steps:
            return
        every = int(getattr(record.job, "trajectory_every", 0))
        snapshot = None
        if every and steps_done % every == 0:
            assert isinstance(group, SampleGroup)
            snapshot = group.result(record)
            record.trajectory.append(snapshot)
        if record.on_progress is None:
            return
        fraction = steps_done / record.num_steps
        t = fraction if record.kind == "sample" else 1.0 - fraction
        try:
            record.on_progress(Progress(steps_done, record.num_steps, t, snapshot))
        except Exception as error:
            logger.warning("on_progress of job %d raised %r; failing it", record.job_id, error)
            failure = EngineError(f"on_progress callback raised {error!r}")
            failure.__cause__ = error
            self._fail(record, failure)

    def _result(
        self, group: RowGroup, record: JobRecord, now: float
    ) -> SampleResult | LikelihoodResult:
        if isinstance(group, SampleGroup):
            return _sample_result(record, group.result(record), now)
        assert isinstance(group, LikelihoodGroup)
        estimate = group.result(record)
        model = record.model
        return LikelihoodResult(
            log_prob=estimate.log_prob,
            std_error=estimate.std_error,
            bits_per_dim=estimate.bits_per_dim,
            model=model.name,
            version=model.version,
            network_evaluations=record.evaluations,
            seed=record.seed,
            queue_seconds=record.admitted - record.submitted,
            compute_seconds=now - record.admitted,
        )

    def _deliver(self) -> None:
        if not self._held:
            return
        with self._lock:
            running_rows = self._running_rows
        records = [r for r, _ in self._held]
        release = {r.job_id for r in self._policy.deliver(records, running_rows)}
        if not release:
            return
        keep: list[tuple[JobRecord, SampleResult | LikelihoodResult]] = []
        for record, result in self._held:
            if record.job_id not in release:
                keep.append((record, result))
            elif record.state == _HELD:
                self._answer(record, result)
        self._held = keep

    def _answer(self, record: JobRecord, result: SampleResult | LikelihoodResult) -> None:
        self._finish(record)
        if not resolve(record.future, result):
            return  # cancelled at the last moment: the caller already has JobCancelled
        if isinstance(result, SampleResult):
            samples = result.samples.shape[0]
        else:
            samples = result.log_prob.shape[0]
        if self._observer is not None:
            try:
                self._observer.on_job_done(
                    record.model.name, record.kind, samples, record.evaluations
                )
            except Exception:
                logger.exception("engine observer raised in on_job_done; the event is dropped")

    # ----------------------------------------------------------------- failures

    def _finish(self, record: JobRecord) -> None:
        record.state = _DONE
        with self._lock:
            self._live.pop(record.job_id, None)
            if not self._live:
                self._wake.notify_all()
            if len(self._deadlines) > _DEADLINE_SLACK * (len(self._live) + 1):
                # Finished jobs leave stale deadline entries; rebuild so the heap tracks the
                # live jobs, not the history (amortised O(1) per job).
                self._deadlines = [
                    (r.deadline, r.job_id) for r in self._live.values() if r.deadline is not None
                ]
                heapq.heapify(self._deadlines)

    def _fail(self, record: JobRecord, error: EngineError) -> None:
        """Fail one job wherever it is and free its rows."""
        resolve(record.future, error=error)
        self._discard(record)

    def _discard(self, record: JobRecord) -> None:
        """Free a job's rows (its future is already resolved)."""
        if record.state == _QUEUED:
            with self._lock:
                self._unqueue({record.job_id})
            return
        if record.state == _RUNNING and isinstance(record.group, RowGroup):
            group = record.group
            owed = group.remaining_evaluations(record)
            group.remove({record})
            with self._lock:
                self._running_rows -= record.rows
                self._pending_evaluations -= owed
            self._finish(record)
            # The rows that left may have been the last ones the current stage waited for.
            if group.rows and group.pending == 0 and group.complete_stage() == STEP_DONE:
                self._advance([group])
            self._prune_lanes()
            return
        if record.state == _HELD:
            self._held = [(r, res) for r, res in self._held if r is not record]
        if record.state != _DONE:
            self._finish(record)

    def _fail_all(self, error: EngineError) -> None:
        """Fail every pending job and reset to a clean, empty state."""
        with self._lock:
            records = list(self._live.values())
            self._queue.clear()
            self._live.clear()
            self._cancels.clear()
            self._deadlines.clear()
            self._queued_rows = self._running_rows = self._pending_evaluations = 0
            self._wake.notify_all()
        for record in records:
            record.state = _DONE
            record.group = None
            resolve(record.future, error=error)
        self._sample_lanes.clear()
        self._likelihood_lanes.clear()
        self._held.clear()


def _sample_result(record: JobRecord, samples: Tensor, now: float) -> SampleResult:
    """The result of a finished sample job, timed from its record."""
    model = record.model
    return SampleResult(
        samples=samples,
        model=model.name,
        version=model.version,
        num_steps=record.num_steps,
        network_evaluations=record.evaluations,
        seed=record.seed,
        queue_seconds=record.admitted - record.submitted,
        compute_seconds=now - record.admitted,
        trajectory=tuple(record.trajectory),
    )


def _lane_key(record: JobRecord) -> tuple[object, ...]:
    # Jobs on the same model object batch together; the backend's identity separates versions
    # served by different backends.
    model = record.model
    return (id(model.backend), model.name, model.version)


def _updater(record: JobRecord) -> StateUpdater:
    updater = getattr(record.model.backend, "updater", None)
    return updater if updater is not None else TorchUpdater()
