"""training/: loss targets against closed forms, EMA, determinism, and a real moons fit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from flows.field import velocity_field
from flows.metrics import sliced_wasserstein
from flows.nets import NetSpec, build_net
from flows.paths import GaussianPath, LinearPath, VPPath, path_from_dict
from flows.solvers import sample
from training.datasets import make_dataset
from training.defaults import default_config
from training.ema import EMA
from training.losses import regression_loss
from training.trainer import TrainConfig, train

TINY = NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2})


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny_config(**changes: object) -> TrainConfig:
    base = TrainConfig(
        dataset="moons", net=TINY, name="tiny", steps=40, batch_size=32, num_train=200
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# ---- losses: with point-mass data the exact minimiser is known in closed form ----------------

POINT = torch.tensor([0.7, -1.3])


def _oracle(
    path: GaussianPath, parameterization: str
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The exact regression function when the data are the single point POINT."""

    def net(x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        c = path.coefficients(t)
        alpha_t, sigma_t = c.alpha_t.unsqueeze(1), c.sigma_t.unsqueeze(1)
        x_0 = (x_t - alpha_t * POINT) / sigma_t  # x_t determines the noise exactly
        if parameterization == "velocity":
            return c.d_alpha_t.unsqueeze(1) * POINT + c.d_sigma_t.unsqueeze(1) * x_0
        if parameterization == "noise":
            return x_0
        return -x_0 / sigma_t  # score of N(alpha_t * POINT, sigma_t^2 I)

    return net


CASES = [
    (LinearPath(), "velocity"),
    (VPPath(), "velocity"),
    (VPPath(), "noise"),
    (VPPath(), "score"),
]


def _batch(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(n, 2, generator=generator)
    x_1 = POINT.expand(n, 2).clone()
    # Keep clear of t=1 on the linear path, where sigma_t = 0 makes the oracle divide by 0.
    t = 0.98 * torch.rand(n, generator=generator)
    return x_0, x_1, t


@pytest.mark.parametrize(("path", "parameterization"), CASES)
def test_exact_minimiser_has_zero_loss(path: GaussianPath, parameterization: str) -> None:
    x_0, x_1, t = _batch(4096, seed=0)
    labels = torch.zeros(4096, dtype=torch.int64)
    loss = regression_loss(
        _oracle(path, parameterization), path, parameterization, x_0, x_1, t, labels
    )
    # Only float32 rounding remains: the noise is recovered from x_t to ~1e-6 relative, and
    # the largest coefficients (1/sigma_t ~ 50, d_sigma_t ~ 10 near the ends) scale that up.
    assert float(loss) < 1e-6


@pytest.mark.parametrize(("path", "parameterization"), CASES)
def test_zero_net_loss_matches_its_expectation(path: GaussianPath, parameterization: str) -> None:
    n = 20000
    x_0, x_1, t = _batch(n, seed=1)
    labels = torch.zeros(n, dtype=torch.int64)
    zero = lambda x, t, labels: torch.zeros_like(x)  # noqa: E731
    loss = float(regression_loss(zero, path, parameterization, x_0, x_1, t, labels))
    c = path.coefficients(t)
    if parameterization == "velocity":
        # E|d_alpha c + d_sigma x_0|^2 / 2 = d_alpha^2 |c|^2 / 2 + d_sigma^2, averaged over t.
        per_t = c.d_alpha_t**2 * POINT.square().mean() + c.d_sigma_t**2
        expected = float(per_t.mean())
    else:
        # noise: E x_0^2 = 1; score: E |sigma_t * 0 + x_0|^2 = 1 (the sigma_t^2 weighting).
        expected = 1.0
    # The sample mean of 40000 terms has relative standard error <~ 1% for these
    # light-tailed terms (the velocity one has t-dependent weights); 5% is ~5 standard errors.
    assert loss == pytest.approx(expected, rel=0.05)


def test_loss_rejects_an_unknown_parameterization() -> None:
    x_0, x_1, t = _batch(4, seed=0)
    with pytest.raises(ValueError, match="parameterization"):
        regression_loss(
            _oracle(LinearPath(), "velocity"), LinearPath(), "data", x_0, x_1, t, t.long()
        )


# ---- EMA ---------------------------------------------------------------------------------------


def test_ema_follows_the_warmed_up_recursion() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    decay = 0.9
    ema = EMA(net, decay)
    shadow = float(net.weight.detach())
    for step, value in enumerate([1.0, -2.0, 3.5, 0.25, 8.0, -1.0, 2.0, 0.0, 5.0, 1.0, 4.0, 3.0]):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
        d = min(decay, (1 + step) / (10 + step))  # the documented warm-up
        shadow = d * shadow + (1 - d) * value
    # float32 EMA against a float64 recursion over 12 steps: ~1e-6 relative rounding.
    assert float(ema.state_dict()["weight"]) == pytest.approx(shadow, rel=1e-5)


@pytest.mark.parametrize("decay", [-0.1, 1.0, float("nan")])
def test_ema_rejects_bad_decay(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        EMA(torch.nn.Linear(1, 1), decay)


# ---- determinism --------------------------------------------------------------------------------


def test_same_seed_gives_bit_equal_weights_and_keeps_global_rng() -> None:
    config = _tiny_config(
        net=NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2, "num_classes": 2}),
        conditional=True,
        label_dropout=0.3,
    )
    rng_before = torch.get_rng_state()
    first = train(config, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run used only its own RNGs
    second = train(config, progress=False)
    assert first.losses == second.losses
    for name, value in first.state_dict.items():
        assert torch.equal(value, second.state_dict[name]), name
    other = train(replace(config, seed=1), progress=False)
    assert not torch.equal(
        other.state_dict["input_layer.weight"], first.state_dict["input_layer.weight"]
    )


def test_provenance_is_recorded() -> None:
    result = train(_tiny_config(steps=5), progress=False)
    training = result.model_config.training
    assert training["seed"] == 0
    assert training["steps"] == 5
    assert len(result.losses) == 5
    assert training["final_loss"] == pytest.approx(sum(result.losses) / 5, abs=1e-6)


# ---- a real fit ---------------------------------------------------------------------------------


def test_trained_moons_model_beats_a_gaussian_fit_threefold() -> None:
    config = replace(
        default_config("moons"),
        net=NetSpec("time_mlp", {"dim": 2, "hidden": 128, "depth": 4}),
        steps=3000,
        batch_size=256,
        lr=5e-3,  # a high rate with cosine decay fits moons in few steps
        ema_decay=0.99,
        # A large training set, so that what is measured is the fit, not the sampling noise
        # of a small training set (2,000 points are themselves ~0.03 from fresh moons).
        num_train=20000,
    )
    result = train(config, progress=False)
    net = build_net(config.net)
    net.load_state_dict(result.state_dict)
    velocity_fn = velocity_field(net.eval(), path_from_dict(config.path), "velocity")

    generator = torch.Generator().manual_seed(123)
    n = 10000
    samples = sample(velocity_fn, torch.randn(n, 2, generator=generator), 20, solver="heun")
    fresh = make_dataset("moons", n, generator)
    fit_source = make_dataset("moons", n, generator)
    mean, cov = fit_source.mean(0), torch.cov(fit_source.T)
    gaussian = mean + torch.randn(n, 2, generator=generator) @ torch.linalg.cholesky(cov).T

    def distance(points: Tensor) -> float:
        return float(sliced_wasserstein(points, fresh, 200, torch.Generator().manual_seed(7)))

    model_distance, gaussian_distance = distance(samples), distance(gaussian)
    # A Gaussian fit is ~0.17 away from moons; two independent 10,000-point moons samples are
    # ~0.012 apart (the finite-sample floor). This recipe with seeds 0-2 landed at
    # 0.019-0.026, so the 3x bar (~0.055) holds with a 2x margin yet fails a blurred fit.
    assert model_distance * 3 < gaussian_distance, (model_distance, gaussian_distance)


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"dataset": "mnist"}, "dataset"),
        ({"steps": 0}, "steps"),
        ({"batch_size": -1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"seed": -1}, "seed"),
        ({"num_train": 0}, "num_train"),
        ({"label_dropout": 1.0}, "label_dropout"),
        ({"parameterization": "data"}, "parameterization"),
        ({"parameterization": "noise"}, "parameterization"),  # singular on the linear path
        ({"path": {"kind": "cosine"}}, "path"),
        ({"conditional": True}, "num_classes"),
        ({"net": NetSpec("time_mlp", {"dim": 3})}, "sample shape"),
        ({"default_solver": "rk45"}, "default_solver"),
        ({"default_num_steps": 0}, "default_num_steps"),
        ({"name": "a b"}, "name"),
    ],
)
def test_bad_train_config_names_the_field(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        _tiny_config(**changes)


def test_digits_train_set_cannot_exceed_the_data() -> None:
    with pytest.raises(ValueError, match="num_train"):
        replace(default_config("digits"), num_train=1798)


@pytest.mark.parametrize(("dataset", "path"), [("mnist", "linear"), ("moons", "cosine")])
def test_default_config_rejects_unknown_names(dataset: str, path: str) -> None:
    with pytest.raises(ValueError, match="dataset" if dataset == "mnist" else "path"):
        default_config(dataset, path)
