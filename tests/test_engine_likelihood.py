"""The likelihood lane against flows.likelihood.log_likelihood and the closed-form Gaussian density.

Rows of many likelihood jobs share network calls (and chunks of calls); each job must still get
what log_likelihood gives it alone, with its own seed's Hutchinson probes.
"""

from __future__ import annotations

import math

import pytest
import torch

from flows.likelihood import log_likelihood
from flows.reference import gaussian_linear_velocity, gaussian_log_prob
from server.engine import EngineConfig, LikelihoodJob, LikelihoodResult, SampleJob
from tests.test_engine_support import (
    WAIT_SECONDS,
    FunctionBackend,
    make_model,
    running_engine,
    with_backend,
)

# Same arithmetic on differently composed batches: float32 rounding of O(1..10) log-densities
# accumulated over tens of stages (~100 ulps).
LOGP_TOL = 1e-4


def _data(seed: int, rows: int, dim: int = 2) -> torch.Tensor:
    return torch.randn((rows, dim), generator=torch.Generator().manual_seed(seed))


def test_exact_and_hutchinson_jobs_batched_together_equal_log_likelihood() -> None:
    model, loaded = make_model(parameterization="noise", path={"kind": "vp"})
    jobs = [
        LikelihoodJob(model, _data(0, 3), 2, "rk4", "exact"),
        LikelihoodJob(model, _data(1, 2), 2, "heun", "exact"),
        LikelihoodJob(model, _data(2, 4), 5, "heun", "hutchinson", num_probes=3, seed=7),
        LikelihoodJob(model, _data(3, 1), 5, "heun", "hutchinson", num_probes=3, seed=8),
        LikelihoodJob(model, _data(4, 2), 3, "midpoint", "hutchinson", num_probes=2, seed=9),
    ]
    # 4 rows per call: the jobs' rows are split across calls and share them.
    config = EngineConfig(max_rows_per_call=4, batch_buckets=(1, 2, 4))
    with running_engine(config, start=False) as engine:
        handles = [engine.submit(job) for job in jobs]
        engine.start()
        results: list[LikelihoodResult] = [h.future.result(WAIT_SECONDS) for h in handles]
    for job, result in zip(jobs, results, strict=True):
        generator = None if job.seed is None else torch.Generator().manual_seed(job.seed)
        expected = log_likelihood(
            loaded.velocity_fn(),
            job.data,
            job.num_steps,
            job.solver,
            job.estimator,
            job.num_probes,
            generator,
        )
        torch.testing.assert_close(result.log_prob, expected.log_prob, atol=LOGP_TOL, rtol=0)
        torch.testing.assert_close(result.std_error, expected.std_error, atol=LOGP_TOL, rtol=0)
        torch.testing.assert_close(
            result.bits_per_dim, expected.bits_per_dim, atol=LOGP_TOL, rtol=0
        )
        stages = {"rk4": 4, "heun": 2, "midpoint": 2}[job.solver]
        assert result.network_evaluations == job.data.shape[0] * job.num_steps * stages
        assert result.seed == job.seed or job.estimator == "exact"


def test_exact_likelihood_with_per_row_labels() -> None:
    # Rows with different labels share the job; each label's rows equal log_likelihood run with
    # that label alone (exact divergences evaluate rows one at a time under vmap).
    model, loaded = make_model(num_classes=3)
    data = _data(5, 5)
    labels = torch.tensor([2, 0, 2, 0, 0])
    with running_engine() as engine:
        job = LikelihoodJob(model, data, 2, "midpoint", "exact", class_labels=labels)
        result = engine.submit(job).future.result(WAIT_SECONDS)
    for label in (0, 2):
        rows = (labels == label).nonzero().squeeze(1)
        # Exact divergences call the field on single rows, so one label of shape (1,) serves.
        velocity_fn = loaded.velocity_fn(torch.tensor([label]))
        expected = log_likelihood(velocity_fn, data[rows], 2, "midpoint")
        torch.testing.assert_close(result.log_prob[rows], expected.log_prob, atol=LOGP_TOL, rtol=0)


def test_gaussian_flow_log_prob_matches_the_closed_form() -> None:
    # The analytic velocity transports N(0, I) to N(mu, cov) exactly, so log p_1 is the Gaussian
    # density. rk4's error falls as h^4: 1.2e-4 at 8 steps, 2.2e-5 at 12, so 1e-4 at 12 steps
    # leaves a 4x margin and still catches any wrong stage weight or sign (errors >= 1e-2).
    mu = torch.tensor([0.5, -1.0])
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]])
    velocity = gaussian_linear_velocity(mu, cov)
    model, _ = make_model()
    analytic = with_backend(model, FunctionBackend(lambda x, t, _labels: velocity(x, t)))
    data = _data(6, 6)
    with running_engine() as engine:
        exact = engine.submit(LikelihoodJob(analytic, data, 12, "rk4", "exact"))
        result = exact.future.result(WAIT_SECONDS)
    expected = gaussian_log_prob(data, mu, cov)
    torch.testing.assert_close(result.log_prob, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        result.bits_per_dim, -expected / (2 * math.log(2.0)), atol=1e-4, rtol=0
    )
    assert torch.equal(result.std_error, torch.zeros(6))


def test_probes_follow_the_seed_whatever_shares_the_batch() -> None:
    model, _ = make_model()
    job = LikelihoodJob(model, _data(7, 3), 4, "heun", "hutchinson", num_probes=4, seed=21)
    with running_engine() as engine:
        alone = engine.submit(job).future.result(WAIT_SECONDS)
        again = engine.submit(job).future.result(WAIT_SECONDS)
    assert torch.equal(alone.log_prob, again.log_prob)
    others = [
        LikelihoodJob(model, _data(10 + i, 1 + i % 3), 4, "heun", "hutchinson", num_probes=4)
        for i in range(8)
    ]
    config = EngineConfig(max_rows_per_call=5, batch_buckets=(1, 2, 4, 8))
    with running_engine(config, start=False) as engine:
        handles = [engine.submit(j) for j in others[:4]]
        mine = engine.submit(job)
        handles += [engine.submit(j) for j in others[4:]]
        # Sampling rows of the same model run in their own lane in the same iterations.
        handles.append(engine.submit(SampleJob(model, 3, 6, "heun")))
        engine.start()
        amid = mine.future.result(WAIT_SECONDS)
        seeds = {h.future.result(WAIT_SECONDS).seed for h in handles}
    torch.testing.assert_close(amid.log_prob, alone.log_prob, atol=LOGP_TOL, rtol=0)
    torch.testing.assert_close(amid.std_error, alone.std_error, atol=LOGP_TOL, rtol=0)
    assert len(seeds) == len(handles)  # engine-chosen seeds are distinct


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"solver": "euler_maruyama"}, "solver"),
        ({"estimator": "stochastic"}, "estimator"),
        ({"num_probes": 0}, "num_probes"),
        ({"data": torch.zeros(3, 4)}, "data"),
        ({"data": torch.full((2, 2), math.nan)}, "data"),
    ],
)
def test_impossible_likelihood_jobs_raise_value_error(
    change: dict[str, object], message: str
) -> None:
    model, _ = make_model()
    fields: dict[str, object] = {
        "model": model,
        "data": torch.zeros(2, 2),
        "num_steps": 3,
        "solver": "rk4",
        "estimator": "hutchinson",
    }
    fields.update(change)
    with running_engine(start=False) as engine, pytest.raises(ValueError, match=message):
        engine.submit(LikelihoodJob(**fields))  # type: ignore[arg-type]
