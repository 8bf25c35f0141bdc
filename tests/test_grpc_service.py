"""Every Generator RPC through a real channel to a real server process.

Truth is computed independently in this process: the same model directory loaded with
`flowserve.modeldir.load_model_dir` and integrated with `flows.solvers` / `flows.likelihood`
from the same initial noise (or the engine's documented seed contract).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from flows.likelihood import log_likelihood
from flows.solvers import network_evaluations, sample, sample_gaussian_sde
from flowserve.modeldir import LoadedModel, load_model_dir
from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess

TIMEOUT = 30.0  # every call is bounded
# Same float32 network and tableau, different batch composition and operation order: the
# server and flows agree to float32 rounding accumulated over <= 16 steps (|x| ~ 1).
ATOL = 1e-5
RTOL = 1e-5
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def channel(shared_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shared_server.target) as open_channel:
        grpc.channel_ready_future(open_channel).result(timeout=TIMEOUT)
        yield open_channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GeneratorStub:
    return pb_grpc.GeneratorStub(channel)


@pytest.fixture(scope="module")
def models(tiny_store: Path) -> dict[str, LoadedModel]:
    """The serving versions, loaded independently of the server."""
    return {
        "toy2d": load_model_dir(tiny_store / "toy2d" / "2"),
        "toycond": load_model_dir(tiny_store / "toycond" / "1"),
        "toyvp": load_model_dir(tiny_store / "toyvp" / "1"),
    }


def tensor(x: torch.Tensor) -> pb.Tensor:
    return pb.Tensor(shape=list(x.shape), data=x.numpy().astype("<f4").tobytes())


def array(message: pb.Tensor) -> torch.Tensor:
    values = np.frombuffer(message.data, dtype="<f4").reshape(tuple(message.shape))
    return torch.from_numpy(values.astype(np.float32))


def noise(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def seeded_noise(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Generator]:
    """x_0 as the engine draws it from a seed, and the generator after that draw."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator), generator


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def ode_truth(
    model: LoadedModel, x0: torch.Tensor, steps: int, solver: str, **field: object
) -> torch.Tensor:
    return sample(model.velocity_fn(**field), x0, steps, solver=solver)  # type: ignore[arg-type]


# ---------------------------------------------------------------- ListModels / GetModel


def test_list_models(stub: pb_grpc.GeneratorStub) -> None:
    response = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
    by_name = {info.name: info for info in response.models}
    assert list(by_name) == ["toy2d", "toycond", "toyvp"]
    toy2d = by_name["toy2d"]
    assert (toy2d.version, toy2d.serving_version, list(toy2d.versions)) == (2, 2, [1, 2])
    assert list(toy2d.sample_shape) == [2] and toy2d.num_classes == 0
    assert (toy2d.parameterization, toy2d.path, toy2d.architecture) == (
        "velocity",
        "linear",
        "time_mlp",
    )
    assert (toy2d.default_solver, toy2d.default_num_steps) == (pb.HEUN, 8)
    assert toy2d.backend == "eager" and list(toy2d.available_backends) == ["eager"]
    toyvp = by_name["toyvp"]
    assert (toyvp.path, toyvp.parameterization) == ("vp", "noise")
    assert set(toyvp.path_parameters) == {"beta_min", "beta_max", "eps"}
    assert by_name["toycond"].num_classes == 3


def test_get_model(stub: pb_grpc.GeneratorStub) -> None:
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models}
    for version in (0, 2):
        info = stub.GetModel(pb.GetModelRequest(model="toy2d", version=version), timeout=TIMEOUT)
        assert info == listed["toy2d"]


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (pb.GetModelRequest(model="nope"), Code.NOT_FOUND, "'nope' is not served"),
        (pb.GetModelRequest(model="toy2d", version=1), Code.NOT_FOUND, "version 1 exists"),
        (pb.GetModelRequest(model="toy2d", version=3), Code.NOT_FOUND, "version 3 does not"),
        (pb.GetModelRequest(model="toy2d", version=-1), Code.INVALID_ARGUMENT, "version: must"),
        (pb.GetModelRequest(), Code.INVALID_ARGUMENT, "model: is required"),
    ],
)
def test_get_model_errors(
    stub: pb_grpc.GeneratorStub, request_: pb.GetModelRequest, code: Code, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModel(request_, timeout=TIMEOUT)
    assert error.value.code() == code
    assert fragment in error.value.details()


# ---------------------------------------------------------------- Sample


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4"])
def test_sample_from_initial_noise_equals_flows_sampler(
    stub: pb_grpc.GeneratorStub, models: dict[str, LoadedModel], solver: str
) -> None:
    x0 = noise(7, 2, seed=11)
    request = pb.SampleRequest(
        model="toy2d", initial_noise=tensor(x0), num_steps=5, solver=getattr(pb, solver.upper())
    )
    response = stub.Sample(request, timeout=TIMEOUT)
    assert_close(array(response.samples), ode_truth(models["toy2d"], x0, 5, solver))
    assert (response.model, response.version, response.num_steps) == ("toy2d", 2, 5)
    assert response.network_evaluations == 7 * network_evaluations(solver, 5)
    assert response.queue_seconds >= 0 and response.compute_seconds > 0


def test_seed_draws_the_documented_noise_and_defaults_apply(
    stub: pb_grpc.GeneratorStub, models: dict[str, LoadedModel]
) -> None:
    response = stub.Sample(
        pb.SampleRequest(model="toy2d", num_samples=6, seed=2**64 - 1), timeout=TIMEOUT
    )
    assert response.seed == 2**64 - 1
    x0, _ = seeded_noise(2**64 - 1, (6, 2))
    # Model defaults: heun, 8 steps.
    assert response.num_steps == 8
    assert_close(array(response.samples), ode_truth(models["toy2d"], x0, 8, "heun"))


def test_the_chosen_seed_is_reported_and_reproduces(
    stub: pb_grpc.GeneratorStub, models: dict[str, LoadedModel]
) -> None:
    first = stub.Sample(pb.SampleRequest(model="toy2d", num_samples=4), timeout=TIMEOUT)
    second = stub.Sample(pb.SampleRequest(model="toy2d", num_samples=4), timeout=TIMEOUT)
    assert first.seed != second.seed  # the server picks a fresh seed each time
    x0, _ = seeded_noise(first.seed, (4, 2))
    assert_close(array(first.samples), ode_truth(models["toy2d"], x0, 8, "heun"))
    again = stub.Sample(
        pb.SampleRequest(model="toy2d", num_samples=4, seed=first.seed), timeout=TIMEOUT
    )
    assert again.samples == first.samples  # same seed, bit-identical samples


def test_euler_maruyama_follows_the_seed(
    stub: pb_grpc.GeneratorStub, models: dict[str, LoadedModel]
) -> None:
    model = models["toyvp"]
    response = stub.Sample(
        pb.SampleRequest(model="toyvp", num_samples=3, seed=5, solver=pb.EULER_MARUYAMA),
        timeout=TIMEOUT,
    )
    x0, generator = seeded_noise(5, (3, 70))
    with torch.no_grad():
        expected = sample_gaussian_sde(
            model.velocity_fn(), x0, 6, model.config.gaussian_path, generator
        )
    assert_close(array(response.samples), expected)
    # With initial noise and no seed, the reported seed drives the SDE noise.
    x0 = noise(3, 70, seed=9)
    first = stub.Sample(
        pb.SampleRequest(model="toyvp", initial_noise=tensor(x0), solver=pb.EULER_MARUYAMA),
        timeout=TIMEOUT,
    )
    with torch.no_grad():
        expected = sample_gaussian_sde(
            model.velocity_fn(),
            x0,
            6,
            model.config.gaussian_path,
            torch.Generator("cpu").manual_seed(first.seed),
        )
    assert_close(array(first.samples), expected)


def test_guided_sampling_equals_flows_with_the_same_labels(
    stub: pb_grpc.GeneratorStub, models: dict[str, LoadedModel]
) -> None:
    x0 = noise(4, 2, seed=3)
    labels = [0, 1, 2, 1]
    response = stub.Sample(
        pb.SampleRequest(
            model="toycond", initial_noise=tensor(x0), class_labels=labels, guidance_scale=2.5
        ),
        timeout=TIMEOUT,
    )
    expected = ode_truth(
        models["toycond"],
        x0,
        6,
        "euler",
        class_labels=torch.tensor(labels),
        guidance_scale=2.5,
    )
    assert_close(array(response.samples), expected)
    # Guidance doubles the evaluations: conditional and unconditional per sample.
    assert response.network_evaluations == 2 * 4 * network_evaluations("euler", 6)


def test_one_label_is_broadcast_and_no_label_is_the_null_class(
    stub: pb_grpc.GeneratorStub, models: dict[str, LoadedModel]
) -> None:
    x0 = noise(3, 2, seed=4)
    one = stub.Sample(
        pb.SampleRequest(model="toycond", initial_noise=tensor(x0), class_labels=[2]),
        timeout=TIMEOUT,
    )
    expected = ode_truth(models["toycond"], x0, 6, "euler", class_labels=torch.tensor([2, 2, 2]))
    assert_close(array(one.samples), expected)
    none = stub.Sample(pb.SampleRequest(model="toycond", initial_noise=tensor(x0)), timeout=TIMEOUT)
    assert_close(array(none.samples), ode_truth(models["toycond"], x0, 6, "euler"))


def test_trajectory_snapshots_are_the_flow_at_intermediate_times(
    stub: pb_grpc.GeneratorStub, models: dict[str, LoadedModel]
) -> None:
    x0 = noise(3, 2, seed=8)
    response = stub.Sample(
        pb.SampleRequest(model="toy2d", initial_noise=tensor(x0), num_steps=8, trajectory_every=3),
        timeout=TIMEOUT,
    )
    assert len(response.trajectory) == 2  # after steps 3 and 6
    velocity = models["toy2d"].velocity_fn()
    for index, snapshot in enumerate(response.trajectory):
        steps = 3 * (index + 1)
        # The first k steps of the uniform 8-step grid are a k-step grid on [0, k/8].
        with torch.no_grad():
            expected = sample(velocity, x0, steps, solver="heun", t1=steps / 8)
        assert_close(array(snapshot), expected)


# ---------------------------------------------------------------- SampleStream


def test_stream_sends_progress_snapshots_then_the_response(
    stub: pb_grpc.GeneratorStub,
) -> None:
    request = pb.SampleRequest(model="toy2d", num_samples=5, seed=21, trajectory_every=2)
    events = list(stub.SampleStream(request, timeout=TIMEOUT))
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[-1] == "response" and kinds.count("response") == 1
    progress = [e.progress for e in events if e.HasField("progress")]
    steps_done = [p.steps_done for p in progress]
    assert steps_done == sorted(steps_done) and steps_done[-1] == 8
    assert all(p.num_steps == 8 and math.isclose(p.t, p.steps_done / 8) for p in progress)
    snapshots = [e.snapshot for e in events if e.HasField("snapshot")]
    assert [s.steps_done for s in snapshots] == [2, 4, 6, 8]
    unary = stub.Sample(request, timeout=TIMEOUT)
    final = events[-1].response
    assert final.samples == unary.samples  # same seed and grid: bit-identical
    assert len(final.trajectory) == 0  # already streamed
    assert [s.x for s in snapshots] == list(unary.trajectory)
    assert snapshots[-1].x == final.samples


def test_stream_reports_errors_as_statuses(stub: pb_grpc.GeneratorStub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        list(stub.SampleStream(pb.SampleRequest(model="toy2d"), timeout=TIMEOUT))
    assert error.value.code() == Code.INVALID_ARGUMENT
    assert "num_samples" in error.value.details()


# ---------------------------------------------------------------- LogLikelihood


def test_exact_log_likelihood_equals_flows(
    stub: pb_grpc.GeneratorStub, models: dict[str, LoadedModel]
) -> None:
    data = noise(5, 2, seed=1)
    response = stub.LogLikelihood(
        pb.LogLikelihoodRequest(model="toy2d", data=tensor(data), num_steps=4), timeout=TIMEOUT
    )
    expected = log_likelihood(models["toy2d"].velocity_fn(), data, 4, solver="rk4")
    # float32 integration of the same ODE and Jacobian trace; log p ~ O(1) nats.
    np.testing.assert_allclose(response.log_prob, expected.log_prob.numpy(), atol=1e-4, rtol=1e-5)
    assert list(response.std_error) == [0.0] * 5
    # bits/dim = -log p / (D ln 2), D = 2; the engine divides in float32 (rtol ~ 8 ulps).
    np.testing.assert_allclose(
        response.bits_per_dim, -np.asarray(response.log_prob) / (2 * math.log(2)), rtol=1e-6
    )
    assert (response.model, response.version) == ("toy2d", 2)


def test_high_dimensional_default_is_hutchinson_with_8_probes(
    stub: pb_grpc.GeneratorStub, models: dict[str, LoadedModel]
) -> None:
    data = noise(3, 70, seed=2)
    response = stub.LogLikelihood(
        pb.LogLikelihoodRequest(model="toyvp", data=tensor(data), seed=17), timeout=TIMEOUT
    )
    assert response.seed == 17
    # The engine's contract: probes drawn as flows draws them from Generator(seed).
    expected = log_likelihood(
        models["toyvp"].velocity_fn(),
        data,
        6,
        solver="rk4",
        estimator="hutchinson",
        num_probes=8,
        generator=torch.Generator("cpu").manual_seed(17),
    )
    np.testing.assert_allclose(response.log_prob, expected.log_prob.numpy(), atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(response.std_error, expected.std_error.numpy(), atol=1e-3, rtol=1e-4)
    assert all(se > 0 for se in response.std_error)


# ---------------------------------------------------------------- bad input


def _noise_message(shape: list[int], data: bytes | None = None) -> pb.Tensor:
    return pb.Tensor(shape=shape, data=bytes(4 * math.prod(shape)) if data is None else data)


NAN_ROW = np.array([[0.0, 0.0], [np.nan, 1.0]], dtype="<f4").tobytes()
BAD_SAMPLES: list[tuple[str, dict[str, object], Code, str]] = [
    ("no model", {"num_samples": 1}, Code.INVALID_ARGUMENT, "model"),
    ("unknown model", {"model": "nope", "num_samples": 1}, Code.NOT_FOUND, "nope"),
    ("old version", {"model": "toy2d", "version": 1, "num_samples": 1}, Code.NOT_FOUND, "version"),
    ("no samples", {"model": "toy2d"}, Code.INVALID_ARGUMENT, "num_samples"),
    ("too many", {"model": "toy2d", "num_samples": 16385}, Code.INVALID_ARGUMENT, "[1, 16384]"),
    ("too big", {"model": "toyvp", "num_samples": 1000}, Code.INVALID_ARGUMENT, "at most 936"),
    ("steps", {"model": "toy2d", "num_samples": 1, "num_steps": 1001}, Code.INVALID_ARGUMENT,
     "num_steps: must be in [1, 1000]"),
    ("solver", {"model": "toy2d", "num_samples": 1, "solver": 42}, Code.INVALID_ARGUMENT,
     "solver"),
    ("labels uncond", {"model": "toy2d", "num_samples": 1, "class_labels": [0]},
     Code.INVALID_ARGUMENT, "class_labels"),
    ("labels count", {"model": "toycond", "num_samples": 3, "class_labels": [0, 1]},
     Code.INVALID_ARGUMENT, "class_labels: must hold 0, 1 or 3"),
    ("labels range", {"model": "toycond", "num_samples": 1, "class_labels": [-1]},
     Code.INVALID_ARGUMENT, "class_labels: must be in [0, 2]"),
    ("guidance uncond", {"model": "toy2d", "num_samples": 1, "guidance_scale": 2.0},
     Code.INVALID_ARGUMENT, "guidance_scale"),
    ("guidance nan", {"model": "toycond", "num_samples": 1, "class_labels": [1],
                      "guidance_scale": float("nan")}, Code.INVALID_ARGUMENT, "guidance_scale"),
    ("noise shape", {"model": "toy2d", "initial_noise": _noise_message([2, 3])},
     Code.INVALID_ARGUMENT, "initial_noise: shape must be (n, 2)"),
    ("noise bytes", {"model": "toy2d", "initial_noise": _noise_message([2, 2], bytes(15))},
     Code.INVALID_ARGUMENT, "initial_noise: data holds 15 bytes"),
    ("noise nan", {"model": "toy2d", "initial_noise": _noise_message([2, 2], NAN_ROW)},
     Code.INVALID_ARGUMENT, "initial_noise: contains NaN"),
    ("noise count", {"model": "toy2d", "num_samples": 3, "initial_noise": _noise_message([2, 2])},
     Code.INVALID_ARGUMENT, "num_samples: must be 0 or equal"),
    ("noise limit", {"model": "toy2d", "initial_noise": _noise_message([40000, 2], b"")},
     Code.INVALID_ARGUMENT, "initial_noise: first dimension must be in [1, 16384]"),
    ("noise bytes limit", {"model": "toyvp", "initial_noise": _noise_message([1000, 70], b"")},
     Code.INVALID_ARGUMENT, "tensors are limited to 262144 bytes"),
    ("trajectory", {"model": "toy2d", "num_samples": 1, "trajectory_every": 9},
     Code.INVALID_ARGUMENT, "trajectory_every: must be in [0, num_steps=8]"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [case[1:] for case in BAD_SAMPLES],
    ids=[case[0] for case in BAD_SAMPLES],
)
def test_bad_sample_requests(
    stub: pb_grpc.GeneratorStub, fields: dict[str, object], code: Code, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Sample(pb.SampleRequest(**fields), timeout=TIMEOUT)  # type: ignore[arg-type]
    assert error.value.code() == code
    assert fragment in error.value.details()


DATA = _noise_message([2, 2])
BAD_LIKELIHOODS: list[tuple[str, dict[str, object], Code, str]] = [
    ("no data", {"model": "toy2d"}, Code.INVALID_ARGUMENT, "data: is required"),
    ("data shape", {"model": "toy2d", "data": _noise_message([2, 70])}, Code.INVALID_ARGUMENT,
     "data: shape must be (n, 2)"),
    ("data nan", {"model": "toy2d", "data": _noise_message([2, 2], NAN_ROW)},
     Code.INVALID_ARGUMENT, "data: contains NaN"),
    ("sde", {"model": "toy2d", "data": DATA, "solver": pb.EULER_MARUYAMA}, Code.INVALID_ARGUMENT,
     "solver: LogLikelihood needs an ODE solver"),
    ("estimator", {"model": "toy2d", "data": DATA, "estimator": 5}, Code.INVALID_ARGUMENT,
     "estimator"),
    ("probes", {"model": "toy2d", "data": DATA, "estimator": pb.HUTCHINSON, "num_probes": 65},
     Code.INVALID_ARGUMENT, "num_probes: must be in [1, 64]"),
    ("probes exact", {"model": "toy2d", "data": DATA, "num_probes": 2}, Code.INVALID_ARGUMENT,
     "num_probes"),
    ("steps", {"model": "toy2d", "data": DATA, "num_steps": 5000}, Code.INVALID_ARGUMENT,
     "num_steps"),
    ("labels", {"model": "toycond", "data": DATA, "class_labels": [3, 4]}, Code.INVALID_ARGUMENT,
     "class_labels"),
    ("unknown", {"model": "nope", "data": DATA}, Code.NOT_FOUND, "nope"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [case[1:] for case in BAD_LIKELIHOODS],
    ids=[case[0] for case in BAD_LIKELIHOODS],
)
def test_bad_likelihood_requests(
    stub: pb_grpc.GeneratorStub, fields: dict[str, object], code: Code, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.LogLikelihood(pb.LogLikelihoodRequest(**fields), timeout=TIMEOUT)  # type: ignore[arg-type]
    assert error.value.code() == code
    assert fragment in error.value.details()


def test_model_admin_is_refused_without_an_admin_token(channel: grpc.Channel) -> None:
    # This server was started without an admin token: the admin service is off.
    admin = pb_grpc.ModelAdminStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        admin.SetServingVersion(
            pb.SetServingVersionRequest(model="toy2d"),
            metadata=(("authorization", "Bearer guess-guess-guess-guess"),),
            timeout=TIMEOUT,
        )
    assert error.value.code() == Code.PERMISSION_DENIED
    assert "admin service is disabled" in error.value.details()


# ---------------------------------------------------------------- operations


def test_request_id_is_echoed_or_made_up(stub: pb_grpc.GeneratorStub) -> None:
    _, call = stub.ListModels.with_call(
        pb.ListModelsRequest(), metadata=(("x-request-id", "trace-42"),), timeout=TIMEOUT
    )
    assert ("x-request-id", "trace-42") in call.initial_metadata()
    _, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=TIMEOUT)
    ids = [value for key, value in call.initial_metadata() if key == "x-request-id"]
    assert len(ids) == 1 and ids[0]


def test_health_answers_for_the_server_and_each_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    services = (
        "",
        "flowserve.v1.Generator",
        "flowserve.v1.ModelAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    )
    for service in services:
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=TIMEOUT)
    assert error.value.code() == Code.NOT_FOUND


def test_reflection_lists_every_service(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    assert set(database.get_services()) == {
        "flowserve.v1.Generator",
        "flowserve.v1.ModelAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "inference.GRPCInferenceService",
    }
    # A reflection client can rebuild the request types from the server alone.
    generator = database.FindFileContainingSymbol("flowserve.v1.Generator")
    assert "SampleRequest" in {message.name for message in generator.message_type}


def _delta(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    after: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_agree_with_the_requests_made(
    shared_server: ServerProcess, stub: pb_grpc.GeneratorStub
) -> None:
    before = shared_server.metrics()
    evaluations = 0
    for count in (3, 5):
        response = stub.Sample(pb.SampleRequest(model="toy2d", num_samples=count), timeout=TIMEOUT)
        evaluations += response.network_evaluations
    likelihood = stub.LogLikelihood(
        pb.LogLikelihoodRequest(model="toy2d", data=DATA, num_steps=2), timeout=TIMEOUT
    )
    evaluations += likelihood.network_evaluations
    bad: list[Callable[[], object]] = [
        lambda: stub.Sample(pb.SampleRequest(model="toy2d"), timeout=TIMEOUT),
        lambda: stub.Sample(pb.SampleRequest(model="nope", num_samples=1), timeout=TIMEOUT),
    ]
    for call in bad:
        with pytest.raises(grpc.RpcError):
            call()
    after = shared_server.metrics()

    def delta(name: str, **labels: str) -> float:
        return _delta(before, after, name, **labels)

    assert delta("flowserve_requests_total", method="Sample", model="toy2d", code="OK") == 2
    assert delta("flowserve_requests_total", method="LogLikelihood", model="toy2d", code="OK") == 1
    assert (
        delta("flowserve_requests_total", method="Sample", model="toy2d", code="INVALID_ARGUMENT")
        == 1
    )
    # Client-chosen unknown names share one label value.
    assert (
        delta("flowserve_requests_total", method="Sample", model="_unknown", code="NOT_FOUND") == 1
    )
    assert delta("flowserve_request_duration_seconds_count", method="Sample", model="toy2d") == 3
    assert delta("flowserve_samples_total", model="toy2d") == 8
    assert delta("flowserve_network_evaluations_total", model="toy2d") == evaluations
    assert delta("flowserve_batch_rows_count") >= 1
    assert after[("flowserve_queue_rows", frozenset())] == 0
    assert after[("flowserve_pending_network_evaluations", frozenset())] == 0
    info = frozenset({"model": "toy2d", "version": "2", "backend": "eager"}.items())
    assert after[("flowserve_model_info", info)] == 1
    names = {name for name, _ in after}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
