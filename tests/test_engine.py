"""The engine's sampling lane against flows.solvers, run alone, batched, chunked and guided.

The independent truths are flows.solvers.sample / sample_gaussian_sde on the model's own
velocity function (flowserve.modeldir.LoadedModel.velocity_fn) and the closed-form Gaussian flow
of flows.reference. Batch composition changes float32 matmul blocking, so "same result" means
within 1e-5 at O(1) sample values (~100 ulps after tens of steps); "alone twice" is bit for bit.
"""

from __future__ import annotations

import threading

import pytest
import torch

from flows.paths import VPPath
from flows.reference import gaussian_linear_velocity
from flows.solvers import ODE_SOLVERS, sample, sample_gaussian_sde
from server.engine import Engine, EngineConfig, JobHandle, Progress, SampleJob, SampleResult
from tests.test_engine_support import (
    WAIT_SECONDS,
    FunctionBackend,
    RecordingBackend,
    make_model,
    running_engine,
    seeded_noise,
    wait_until,
    with_backend,
)

# Same arithmetic on differently blocked batches: float32 rounding only (see module docstring).
BATCH_TOL = 1e-5


def _run_alone(job: SampleJob, config: EngineConfig | None = None) -> SampleResult:
    with running_engine(config) as engine:
        result: SampleResult = engine.submit(job).future.result(WAIT_SECONDS)
    return result


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_alone_equals_flows_sample(solver: str) -> None:
    model, loaded = make_model()
    job = SampleJob(model, num_samples=5, num_steps=7, solver=solver, seed=11)
    result = _run_alone(job)
    expected = sample(loaded.velocity_fn(), seeded_noise(11, 5, 2), 7, solver)
    # Same stage arithmetic (flows' tableau helpers); batch 5 padded to 8 may block the matmul
    # differently, hence float32 rounding only.
    torch.testing.assert_close(result.samples, expected, atol=BATCH_TOL, rtol=0)
    stages = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[solver]
    assert result.network_evaluations == 5 * 7 * stages
    assert (result.seed, result.num_steps, result.model, result.version) == (11, 7, "mlp", 1)


def test_euler_maruyama_equals_flows_sde_sampler() -> None:
    # A noise-predicting model on the VP path: the engine converts to velocity through
    # flows.paths and uses flows.solvers' default diffusion, as sample_gaussian_sde does.
    model, loaded = make_model(parameterization="noise", path={"kind": "vp"})
    job = SampleJob(model, num_samples=4, num_steps=12, solver="euler_maruyama", seed=5)
    result = _run_alone(job)
    generator = torch.Generator("cpu").manual_seed(5)
    x_0 = torch.randn((4, 2), generator=generator)  # documented: noise first, then SDE draws
    expected = sample_gaussian_sde(loaded.velocity_fn(), x_0, 12, VPPath(), generator)
    torch.testing.assert_close(result.samples, expected, atol=BATCH_TOL, rtol=0)
    assert result.network_evaluations == 4 * 12


def test_score_model_is_converted_to_velocity() -> None:
    model, loaded = make_model(parameterization="score", path={"kind": "vp"})
    result = _run_alone(SampleJob(model, 3, 6, "rk4", seed=2))
    expected = sample(loaded.velocity_fn(), seeded_noise(2, 3, 2), 6, "rk4")
    torch.testing.assert_close(result.samples, expected, atol=BATCH_TOL, rtol=0)


def test_analytic_gaussian_flow_reaches_its_closed_form_map() -> None:
    # For N(0, I) -> N(mu, diag(lam)) on the linear path the exact flow map is
    # x_1 = mu + sqrt(lam) * x_0; rk4 with 40 steps has error ~ (1/40)^4 * C, far below 1e-4.
    mu, lam = torch.tensor([1.0, -2.0]), torch.tensor([0.25, 4.0])
    velocity = gaussian_linear_velocity(mu, torch.diag(lam))
    model, _ = make_model()
    analytic = with_backend(model, FunctionBackend(lambda x, t, _labels: velocity(x, t)))
    result = _run_alone(SampleJob(analytic, 6, 40, "rk4", seed=3))
    expected = mu + lam.sqrt() * seeded_noise(3, 6, 2)
    torch.testing.assert_close(result.samples, expected, atol=1e-4, rtol=0)


def test_given_initial_noise_is_used() -> None:
    model, loaded = make_model()
    x_0 = torch.linspace(-2.0, 2.0, 8).reshape(4, 2)
    result = _run_alone(SampleJob(model, 4, 5, "heun", seed=1, initial_noise=x_0))
    expected = sample(loaded.velocity_fn(), x_0, 5, "heun")
    torch.testing.assert_close(result.samples, expected, atol=BATCH_TOL, rtol=0)


def test_guided_rows_equal_flows_guided_field_and_share_one_call() -> None:
    model, loaded = make_model(num_classes=3)
    recording = RecordingBackend(model.backend)
    guided = with_backend(model, recording)
    labels = torch.tensor([0, 2, 1])
    job = SampleJob(guided, 3, 4, "euler", seed=9, class_labels=labels, guidance_scale=2.5)
    result = _run_alone(job)
    expected = sample(loaded.velocity_fn(labels, 2.5), seeded_noise(9, 3, 2), 4, "euler")
    torch.testing.assert_close(result.samples, expected, atol=BATCH_TOL, rtol=0)
    # One call per Euler step holding the 3 conditional and 3 unconditional rows (bucket 8).
    assert recording.calls == 4 and set(recording.batch_sizes) == {8}
    assert result.network_evaluations == 3 * 4 * 2


def _mixed_jobs(model, count: int) -> list[SampleJob]:  # type: ignore[no-untyped-def]
    solvers = ("euler", "midpoint", "heun", "rk4")
    jobs = []
    for i in range(count):
        rows = 1 + i % 3
        jobs.append(
            SampleJob(
                model,
                num_samples=rows,
                num_steps=3 + (5 * i) % 11,
                solver=solvers[i % 4],
                seed=100 + i,
                class_labels=torch.tensor([(i + r) % 4 for r in range(rows)]),
                guidance_scale=(1.0, 2.0, 0.5)[i % 3],
            )
        )
    return jobs


def test_mixed_batch_equals_each_request_alone() -> None:
    model, loaded = make_model(num_classes=3)
    jobs = _mixed_jobs(model, 12)
    # Not started: every job is admitted in the same iteration, so they share calls from the
    # first step (merged groups and different groups at once); 5 rows per call forces chunks.
    config = EngineConfig(max_rows_per_call=5, batch_buckets=(1, 2, 4, 8))
    with running_engine(config, start=False) as engine:
        handles = [engine.submit(job) for job in jobs]
        engine.start()
        batched = [h.future.result(WAIT_SECONDS) for h in handles]
    for job, got in zip(jobs, batched, strict=True):
        assert job.class_labels is not None
        velocity_fn = loaded.velocity_fn(job.class_labels, job.guidance_scale)
        x_0 = seeded_noise(job.seed or 0, job.num_samples, 2)
        expected = sample(velocity_fn, x_0, job.num_steps, job.solver)
        torch.testing.assert_close(got.samples, expected, atol=BATCH_TOL, rtol=0)
        alone = _run_alone(job)
        torch.testing.assert_close(got.samples, alone.samples, atol=BATCH_TOL, rtol=0)


@pytest.mark.parametrize("solver", ["heun", "euler_maruyama"])
def test_seed_fixes_samples_whatever_shares_the_batch(solver: str) -> None:
    model, _ = make_model(num_classes=3, parameterization="velocity")
    job = SampleJob(model, 3, 10, solver, seed=42, class_labels=torch.tensor([0, 1, 2]))
    first = _run_alone(job).samples
    second = _run_alone(job).samples
    assert torch.equal(first, second)  # alone twice: bit for bit
    others = [
        SampleJob(model, 1 + i % 4, 5 + i % 9, solver, seed=i, class_labels=None) for i in range(63)
    ]
    # 16 rows per call: the job's rows are split across calls and mixed with the others'.
    config = EngineConfig(max_rows_per_call=16, batch_buckets=(1, 2, 4, 8, 16))
    with running_engine(config, start=False) as engine:
        handles = [engine.submit(j) for j in others[:30]]
        mine = engine.submit(job)
        handles += [engine.submit(j) for j in others[30:]]
        engine.start()
        amid = mine.future.result(WAIT_SECONDS).samples
        for handle in handles:
            handle.future.result(WAIT_SECONDS)
    torch.testing.assert_close(amid, first, atol=BATCH_TOL, rtol=0)


def test_engine_picks_and_reports_a_seed_that_reproduces_the_result() -> None:
    model, _ = make_model()
    with running_engine() as engine:
        a = engine.submit(SampleJob(model, 2, 4, "euler_maruyama")).future.result(WAIT_SECONDS)
        b = engine.submit(SampleJob(model, 2, 4, "euler_maruyama")).future.result(WAIT_SECONDS)
        again = engine.submit(SampleJob(model, 2, 4, "euler_maruyama", seed=a.seed))
        replay = again.future.result(WAIT_SECONDS)
    assert a.seed != b.seed  # drawn from secrets: a collision has probability 2**-63
    assert torch.equal(replay.samples, a.samples)


def test_different_step_counts_in_one_group_match_their_references() -> None:
    # Jobs admitted together with one solver share a group with one dt per row; each leaves
    # when its own last step is done.
    model, loaded = make_model()
    steps = (2, 9, 5, 9, 1)
    jobs = [SampleJob(model, 2, n, "midpoint", seed=i) for i, n in enumerate(steps)]
    with running_engine(start=False) as engine:
        handles = [engine.submit(job) for job in jobs]
        engine.start()
        results = [h.future.result(WAIT_SECONDS) for h in handles]
    for i, (n, result) in enumerate(zip(steps, results, strict=True)):
        expected = sample(loaded.velocity_fn(), seeded_noise(i, 2, 2), n, "midpoint")
        torch.testing.assert_close(result.samples, expected, atol=BATCH_TOL, rtol=0)


def test_rows_are_padded_to_buckets_and_split_by_the_call_limit() -> None:
    model, _ = make_model()
    recording = RecordingBackend(model.backend)
    config = EngineConfig(max_rows_per_call=8, batch_buckets=(2, 4, 8))
    _run_alone(SampleJob(with_backend(model, recording), 11, 2, "euler", seed=0), config)
    # 11 rows at most 8 per call: 8, then the remaining 3 padded to the bucket 4; per step.
    assert recording.batch_sizes == [8, 4, 8, 4]


def test_trajectory_snapshots_and_progress_callbacks() -> None:
    model, loaded = make_model()
    reports: list[Progress] = []
    engine_threads: set[str] = set()

    def on_progress(progress: Progress) -> None:
        reports.append(progress)
        engine_threads.add(threading.current_thread().name)

    job = SampleJob(model, 2, 10, "heun", seed=4, trajectory_every=3)
    with running_engine() as engine:
        result = engine.submit(job, on_progress).future.result(WAIT_SECONDS)
    assert [p.steps_done for p in reports] == list(range(1, 11))
    assert all(p.num_steps == 10 for p in reports)
    assert [p.t for p in reports] == pytest.approx([k / 10 for k in range(1, 11)], abs=1e-12)
    snapshot_steps = [p.steps_done for p in reports if p.snapshot is not None]
    assert snapshot_steps == [3, 6, 9]
    assert len(result.trajectory) == 3
    assert engine_threads == {"flowserve-engine"}
    x_0 = seeded_noise(4, 2, 2)
    for k, snapshot in zip((3, 6, 9), result.trajectory, strict=True):
        # x after k of 10 steps is k steps of size 1/10 from t=0.
        expected = sample(loaded.velocity_fn(), x_0, k, "heun", t0=0.0, t1=k / 10)
        torch.testing.assert_close(snapshot, expected, atol=BATCH_TOL, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"initial_noise": torch.zeros(3, 5)}, "initial_noise"),
        ({"initial_noise": torch.zeros(2, 2)}, "initial_noise"),
        ({"solver": "leapfrog"}, "solver"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_samples": 0}, "num_samples"),
        ({"class_labels": torch.tensor([0, 1, 0])}, "class_labels"),
        ({"guidance_scale": 3.0}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"trajectory_every": -2}, "trajectory_every"),
    ],
)
def test_impossible_jobs_raise_value_error_naming_the_argument(
    change: dict[str, object], message: str
) -> None:
    model, _ = make_model()  # unconditional: labels and guidance are impossible
    fields: dict[str, object] = {
        "model": model,
        "num_samples": 3,
        "num_steps": 4,
        "solver": "heun",
    }
    fields.update(change)
    with running_engine(start=False) as engine, pytest.raises(ValueError, match=message):
        engine.submit(SampleJob(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", "euler_maruyama"])
def test_jobs_arriving_mid_run_join_the_running_group_and_match_their_references(
    solver: str,
) -> None:
    # Requests arriving one by one (the serving pattern) must not each form a group of their
    # own: at a step boundary they join the running group, their rows starting their own step
    # 0 there. Arrivals are submitted from inside network calls 2, 3 and 7: for Euler that is
    # always a step boundary; multi-stage solvers may be mid-step, and then the arrivals wait
    # for a boundary or found a group of their own. Every result must be its flows reference.
    model, loaded = make_model(num_classes=3)
    engines: list[Engine] = []
    groups_seen: list[int] = []
    handles: list[JobHandle] = []

    def backend(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        engine = engines[0]
        lanes = engine._sample_lanes.values()  # white-box: how many groups share the lane
        groups_seen.append(sum(len(lane.groups) for lane in lanes))
        for job in arrivals.get(len(groups_seen), []):
            handles.append(engine.submit(job))
        return model.backend(x, t, labels)

    watched = with_backend(model, FunctionBackend(backend))
    founder = SampleJob(watched, 2, 12, solver, seed=0)
    arrivals = {
        2: [SampleJob(watched, 1, 5, solver, seed=1, class_labels=torch.tensor([2]))],
        3: [SampleJob(watched, 3, 12, solver, seed=2), SampleJob(watched, 1, 1, solver, seed=3)],
        7: [SampleJob(watched, 2, 9, solver, seed=4, trajectory_every=4)],
    }
    jobs = [founder, *(job for batch in arrivals.values() for job in batch)]
    with running_engine() as engine:
        engines.append(engine)
        handles.append(engine.submit(founder))
        assert wait_until(lambda: len(handles) == len(jobs))
        results = [h.future.result(WAIT_SECONDS) for h in handles]
    for job, result in zip(jobs, results, strict=True):
        velocity_fn = loaded.velocity_fn(job.class_labels)
        generator = torch.Generator("cpu").manual_seed(job.seed or 0)
        x_0 = torch.randn((job.num_samples, 2), generator=generator)
        if solver == "euler_maruyama":
            path = model.config.gaussian_path
            expected = sample_gaussian_sde(velocity_fn, x_0, job.num_steps, path, generator)
        else:
            expected = sample(velocity_fn, x_0, job.num_steps, solver)
        torch.testing.assert_close(result.samples, expected, atol=BATCH_TOL, rtol=0)
    assert len(results[-1].trajectory) == 2  # after steps 4 and 8 of 9
    if solver == "euler":
        # One stage a step: every call ends at a step boundary, so every arrival joins.
        assert max(groups_seen) == 1
