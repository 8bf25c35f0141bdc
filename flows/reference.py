"""Closed-form velocity fields: exact answers for tests, benchmarks and memorization studies.

Noise x_0 ~ N(0, I) at t = 0, data x_1 at t = 1:

- Gaussian data N(mu, Sigma) on the linear path x_t = (1 - t) x_0 + t x_1: x_t ~ N(t mu, C_t)
  with C_t = (1-t)^2 I + t^2 Sigma, and the marginal velocity v(x, t) = E[x_1 - x_0 | x_t = x].
  Since (x_1 - x_0, x_t) is jointly Gaussian with Cov(x_1 - x_0, x_t) = t Sigma - (1 - t) I,
  v(x, t) = mu + (t Sigma - (1 - t) I) C_t^{-1} (x - t mu). With Sigma = Q diag(lambda) Q^T
  every matrix above is diagonal in the basis Q. `gaussian_path_velocity` does the same for
  any Gaussian path (e.g. VP).
- Empirical data (1/n) sum_i delta(y_i) on the linear path: p(y_i | x_t) is a softmax of
  -|x_t - t y_i|^2 / (2 (1-t)^2), and v(x, t) = (E[y | x_t] - x) / (1 - t). This is the optimal
  flow-matching velocity for the training set itself, so its flow only reproduces training points.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flows._checks import check_batch, check_tensor
from flows.paths import GaussianPath, LinearPath
from flows.solvers import VelocityFn


def _check_gaussian(mu: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (mu, cov) and return (mu, eigenvalues, eigenvectors) of the covariance."""
    check_tensor("mu", mu)
    check_tensor("cov", cov, min_dim=2)
    if mu.dim() != 1:
        raise ValueError(f"mu must have shape (d,), got {tuple(mu.shape)}")
    d = mu.shape[0]
    if tuple(cov.shape) != (d, d):
        raise ValueError(f"cov must have shape ({d}, {d}), got {tuple(cov.shape)}")
    if not torch.allclose(cov, cov.mT, rtol=1e-5, atol=1e-8):
        raise ValueError("cov must be symmetric")
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    if bool((eigenvalues <= 0).any()):
        raise ValueError("cov must be positive definite")
    return mu, eigenvalues, eigenvectors


def _flatten(x: Tensor, d: int, name: str = "x") -> Tensor:
    """View `(batch, *sample_shape)` as `(batch, d)`, with prod(sample_shape) == d."""
    if x.dim() < 2 or x[0].numel() != d:
        raise ValueError(f"{name} must have shape (batch, *sample_shape) with {d} values per row")
    return x.reshape(x.shape[0], d)


def _check_t(t: Tensor, batch: int) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape) != (batch,):
        raise ValueError(f"t must be a tensor of shape ({batch},)")


def gaussian_path_velocity(path: GaussianPath, mu: Tensor, cov: Tensor) -> VelocityFn:
    """Exact marginal velocity of a Gaussian path whose data are N(mu, cov).

    x_t ~ N(alpha_t mu, C_t) with C_t = alpha_t^2 cov + sigma_t^2 I; conditioning the jointly
    Gaussian (x_1, x_0, x_t) gives x1_hat = mu + alpha_t cov C_t^{-1} (x - alpha_t mu) and
    x0_hat = sigma_t C_t^{-1} (x - alpha_t mu), and v = d_alpha_t x1_hat + d_sigma_t x0_hat. In
    cov's eigenbasis (eigenvalues lambda) the gain on x - alpha_t mu is
    (d_alpha_t alpha_t lambda + d_sigma_t sigma_t) / (alpha_t^2 lambda + sigma_t^2).

    Args:
        path: The Gaussian path.
        mu: Mean of the data, `(d,)`.
        cov: Symmetric positive definite covariance of the data, `(d, d)`.

    Returns:
        `(x (batch, *sample_shape), t (batch,)) -> v` with prod(sample_shape) = d; computed in
        x's dtype (pass float64 mu/cov and x for float64 accuracy).
    """
    if not isinstance(path, GaussianPath):
        raise ValueError(f"path must be a GaussianPath, got {type(path).__name__}")
    mu, eigenvalues, q = _check_gaussian(mu, cov)
    d = mu.shape[0]

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        x_flat = _flatten(x, d)
        _check_t(t, x.shape[0])
        mu_x, lam, q_x = (z.to(x_flat) for z in (mu, eigenvalues, q))
        c = path.schedule(t.to(x_flat))
        alpha, sigma = c.alpha_t[:, None], c.sigma_t[:, None]
        d_alpha, d_sigma = c.d_alpha_t[:, None], c.d_sigma_t[:, None]
        # Eigen-coordinates of x - alpha_t mu: (batch, d).
        y = (x_flat - alpha * mu_x) @ q_x
        gain = (d_alpha * alpha * lam + d_sigma * sigma) / (alpha**2 * lam + sigma**2)
        return (d_alpha * mu_x + (gain * y) @ q_x.mT).reshape(x.shape)

    return velocity_fn


def gaussian_path_log_prob(
    x: Tensor, t: Tensor, path: GaussianPath, mu: Tensor, cov: Tensor
) -> Tensor:
    """Log-density of x_t ~ N(alpha_t mu, alpha_t^2 cov + sigma_t^2 I) on a Gaussian path.

    Args:
        x: Points, `(batch, *sample_shape)` with prod(sample_shape) = d.
        t: Times in [0, 1], `(batch,)`.
        path: The Gaussian path.
        mu: Mean of the data, `(d,)`.
        cov: Covariance of the data, `(d, d)`, positive definite.

    Returns:
        log p_t(x) in nats, `(batch,)`, differentiable in x.
    """
    if not isinstance(path, GaussianPath):
        raise ValueError(f"path must be a GaussianPath, got {type(path).__name__}")
    mu, eigenvalues, q = _check_gaussian(mu, cov)
    d = mu.shape[0]
    x_flat = _flatten(x, d)
    _check_t(t, x.shape[0])
    mu_x, lam, q_x = (z.to(x_flat) for z in (mu, eigenvalues, q))
    c = path.schedule(t.to(x_flat))
    alpha, sigma = c.alpha_t[:, None], c.sigma_t[:, None]
    y = (x_flat - alpha * mu_x) @ q_x
    c_t = alpha**2 * lam + sigma**2
    return -0.5 * (d * math.log(2.0 * math.pi) + torch.log(c_t).sum(1) + (y * y / c_t).sum(1))


def gaussian_linear_velocity(mu: Tensor, cov: Tensor) -> VelocityFn:
    """Exact marginal velocity of the linear path from N(0, I) to N(mu, cov).

    v(x, t) = E[x_1 - x_0 | x_t = x] = mu + (t cov - (1 - t) I) C_t^{-1} (x - t mu) with
    C_t = (1-t)^2 I + t^2 cov (`gaussian_path_velocity` with alpha_t = t, sigma_t = 1 - t).

    Args:
        mu: Mean, `(d,)`.
        cov: Symmetric positive definite covariance, `(d, d)`.

    Returns:
        `(x (batch, *sample_shape), t (batch,)) -> v` with prod(sample_shape) = d.
    """
    return gaussian_path_velocity(LinearPath(), mu, cov)


def gaussian_linear_log_prob(x: Tensor, t: Tensor, mu: Tensor, cov: Tensor) -> Tensor:
    """Log-density of x_t on the linear path from N(0, I) to N(mu, cov): N(x; t mu, C_t).

    Args:
        x: Points, `(batch, *sample_shape)` with prod(sample_shape) = d.
        t: Times in [0, 1], `(batch,)`.
        mu: Mean of the data, `(d,)`.
        cov: Covariance of the data, `(d, d)`, positive definite.

    Returns:
        log p_t(x) in nats, `(batch,)`, differentiable in x.
    """
    return gaussian_path_log_prob(x, t, LinearPath(), mu, cov)


def gaussian_log_prob(x: Tensor, mu: Tensor, cov: Tensor) -> Tensor:
    """Log-density of N(mu, cov) at x.

    Args:
        x: Points, `(batch, *sample_shape)` with prod(sample_shape) = d.
        mu: Mean, `(d,)`.
        cov: Covariance, `(d, d)`, positive definite.

    Returns:
        Log-density in nats, `(batch,)`.
    """
    check_batch("x", x)
    t = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    return gaussian_linear_log_prob(x, t, mu, cov)


def empirical_velocity(train_points: Tensor, min_sigma: float = 1e-4) -> VelocityFn:
    """Optimal linear-path velocity for the empirical distribution of `train_points`.

    v(x, t) = (E[y | x_t = x] - x) / (1 - t), the posterior mean a softmax over training points
    of -|x - t y_i|^2 / (2 (1 - t)^2) (computed with a max-shifted, logsumexp-stable softmax).
    The field is singular at t = 1, where 1 - t is floored at `min_sigma`; Euler steps land on
    the straight line to the chosen training point, so sample it with "euler".

    Args:
        train_points: Training set, `(num_train, *sample_shape)`.
        min_sigma: Floor on 1 - t, > 0.

    Returns:
        `(x (batch, *sample_shape), t (batch,)) -> v`.
    """
    check_batch("train_points", train_points)
    if not isinstance(min_sigma, float) or not 0.0 < min_sigma < 1.0:
        raise ValueError(f"min_sigma must be a float in (0, 1), got {min_sigma!r}")
    sample_shape = tuple(train_points.shape[1:])
    y = train_points.reshape(train_points.shape[0], -1)  # (num_train, d)
    y_sq = (y * y).sum(1)  # (num_train,)

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != sample_shape:
            raise ValueError(f"x must have shape (batch, *{sample_shape}), got {tuple(x.shape)}")
        _check_t(t, x.shape[0])
        x_flat = x.reshape(x.shape[0], -1)
        y_x, y_sq_x = y.to(x_flat), y_sq.to(x_flat)
        t_col = t.to(x_flat).unsqueeze(1)
        sigma = (1.0 - t_col).clamp_min(min_sigma)
        # -|x - t y|^2 / (2 sigma^2) up to the per-row constant -|x|^2 / (2 sigma^2), which the
        # softmax ignores: (batch, num_train).
        logits = (2.0 * t_col * (x_flat @ y_x.mT) - t_col**2 * y_sq_x) / (2.0 * sigma**2)
        weights = torch.softmax(logits, dim=1)
        y_hat = weights @ y_x
        return ((y_hat - x_flat) / sigma).reshape(x.shape)

    return velocity_fn
