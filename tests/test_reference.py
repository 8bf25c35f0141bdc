"""Closed-form fields against dense Gaussian conditioning, the continuity equation and loops."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flows.metrics import memorization_ratio, nearest_train_distances
from flows.paths import GaussianPath, LinearPath, VPPath
from flows.reference import (
    empirical_velocity,
    gaussian_linear_log_prob,
    gaussian_linear_velocity,
    gaussian_log_prob,
    gaussian_path_log_prob,
    gaussian_path_velocity,
)
from flows.solvers import sample
from tests.test_paths import GaussianPathTruth, random_gaussian

torch.set_num_threads(1)
F64 = torch.float64


@pytest.mark.parametrize("path", [LinearPath(), VPPath()], ids=["linear", "vp"])
def test_gaussian_path_velocity_and_density_match_dense_conditioning(path: GaussianPath) -> None:
    mu, cov = random_gaussian(4, seed=0)
    truth = GaussianPathTruth(path, mu, cov)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=g, dtype=F64)
    t = torch.linspace(0.0, 1.0, 10, dtype=F64)
    # Eigenbasis formula vs dense solves in float64: round-off, ~1e-13.
    torch.testing.assert_close(
        gaussian_path_velocity(path, mu, cov)(x, t),
        truth.predictions(x, t)["velocity"],
        rtol=1e-9,
        atol=1e-9,
    )
    torch.testing.assert_close(
        gaussian_path_log_prob(x, t, path, mu, cov), truth.log_prob(x, t), rtol=1e-10, atol=1e-10
    )


def test_linear_log_prob_is_the_stated_gaussian() -> None:
    mu, cov = random_gaussian(3, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=F64)
    eye = torch.eye(3, dtype=F64)
    cov_t = (1 - t)[:, None, None] ** 2 * eye + t[:, None, None] ** 2 * cov
    truth = torch.distributions.MultivariateNormal(t[:, None] * mu, cov_t).log_prob(x)
    # Eigen-decomposition vs Cholesky, float64.
    torch.testing.assert_close(
        gaussian_linear_log_prob(x, t, mu, cov), truth, rtol=1e-10, atol=1e-10
    )
    full = torch.distributions.MultivariateNormal(mu, cov).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, mu, cov), full, rtol=1e-10, atol=1e-10)


def test_velocity_and_density_satisfy_the_continuity_equation() -> None:
    # d/dt log p_t(x) = -div v - v . grad log p_t, checked with autograd at fixed x.
    mu, cov = random_gaussian(3, seed=4)
    v_fn = gaussian_linear_velocity(mu, cov)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, generator=g, dtype=F64).requires_grad_()
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=F64).requires_grad_()
    log_p = gaussian_linear_log_prob(x, t, mu, cov)
    d_t, score = torch.autograd.grad(log_p.sum(), (t, x), create_graph=False)
    v = v_fn(x, t)
    div = torch.stack(
        [
            torch.autograd.grad(v[:, j].sum(), x, retain_graph=True)[0][:, j]
            for j in range(x.shape[1])
        ]
    ).sum(0)
    residual = d_t + div + (v * score).sum(1)
    # Exact identity; autograd in float64 leaves round-off only.
    torch.testing.assert_close(residual.detach(), torch.zeros(5, dtype=F64), rtol=0, atol=1e-10)


def naive_empirical_velocity(train: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """The posterior-weighted pull, one row at a time with explicit distances and logsumexp."""
    out = []
    for i in range(x.shape[0]):
        sigma = 1 - t[i]
        log_w = -((x[i] - t[i] * train) ** 2).sum(1) / (2 * sigma**2)
        w = torch.exp(log_w - torch.logsumexp(log_w, 0))
        out.append(((w[:, None] * train).sum(0) - x[i]) / sigma)
    return torch.stack(out)


def test_empirical_velocity_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(6)
    train = torch.randn(20, 3, generator=g, dtype=F64)
    x = torch.randn(8, 3, generator=g, dtype=F64)
    t = torch.linspace(0.0, 0.97, 8, dtype=F64)
    # Expanded vs direct squared distances: the logits agree to ~1e-12 relative in float64.
    torch.testing.assert_close(
        empirical_velocity(train)(x, t), naive_empirical_velocity(train, x, t), rtol=1e-8, atol=1e-8
    )


def test_empirical_velocity_only_reproduces_training_points() -> None:
    g = torch.Generator().manual_seed(7)
    train = torch.randn(50, 2, generator=g) * 2.0
    noise = torch.randn(1000, 2, generator=g)
    x_1 = sample(empirical_velocity(train), noise, 100, "euler")
    nearest = nearest_train_distances(x_1, train)[:, 0]
    # The criterion: at least 95% of samples within 1e-2 of a training point.
    assert (nearest < 1e-2).float().mean().item() >= 0.95
    assert (memorization_ratio(x_1, train) < 1 / 3).float().mean().item() >= 0.95


def test_empirical_velocity_on_image_shapes() -> None:
    g = torch.Generator().manual_seed(8)
    train = torch.randn(10, 1, 2, 2, generator=g)
    x_1 = sample(empirical_velocity(train), torch.randn(20, 1, 2, 2, generator=g), 100, "euler")
    assert x_1.shape == (20, 1, 2, 2)
    # Float32 with the same 1e-2 criterion as the flat case.
    assert (nearest_train_distances(x_1, train)[:, 0] < 1e-2).float().mean().item() >= 0.95


def test_bad_input_raises_naming_argument() -> None:
    mu, cov = torch.zeros(2), torch.eye(2)
    with pytest.raises(ValueError, match="cov must be symmetric"):
        gaussian_linear_velocity(mu, torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_linear_velocity(mu, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="mu"):
        gaussian_linear_velocity(torch.zeros(2, 1), cov)
    with pytest.raises(ValueError, match=r"cov must have shape \(2, 2\)"):
        gaussian_linear_velocity(mu, torch.eye(3))
    with pytest.raises(ValueError, match="path"):
        gaussian_path_velocity("vp", mu, cov)  # type: ignore[arg-type]
    v = gaussian_linear_velocity(mu, cov)
    with pytest.raises(ValueError, match="x must"):
        v(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="t must"):
        v(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="t must"):
        gaussian_linear_log_prob(torch.zeros(4, 2), torch.zeros(4, 1), mu, cov)
    with pytest.raises(ValueError, match="min_sigma"):
        empirical_velocity(torch.zeros(3, 2), min_sigma=0.0)
    with pytest.raises(ValueError, match="train_points"):
        empirical_velocity(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="x must"):
        empirical_velocity(torch.zeros(3, 2))(torch.zeros(4, 3), torch.zeros(4))
