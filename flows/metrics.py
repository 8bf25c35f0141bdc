"""Sample-quality and memorization measures on batches `(n, *sample_shape)`."""

from __future__ import annotations

import torch
from torch import Tensor

from flows._checks import check_batch, check_positive_int


def _flat_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> tuple[Tensor, Tensor]:
    check_batch(name_a, a)
    check_batch(name_b, b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{name_b} must have the sample shape of {name_a} {tuple(a.shape[1:])}, "
            f"got {tuple(b.shape[1:])}"
        )
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def wasserstein_1d(a: Tensor, b: Tensor, p: int = 2) -> Tensor:
    """Exact p-Wasserstein distance between empirical measures on the line, column by column.

    Integrates |F_a^{-1}(u) - F_b^{-1}(u)|^p over u in (0, 1) exactly: both quantile functions
    are piecewise constant with breaks at i/n and j/m, so the integral is a finite sum over the
    merged breaks. Sizes may differ.

    Args:
        a: `(n, num_columns)` samples.
        b: `(m, num_columns)` samples.
        p: Order, 1 or 2.

    Returns:
        `(num_columns,)` distances W_p.
    """
    check_batch("a", a)
    check_batch("b", b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be (n, columns) and (m, columns), got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    n, m = a.shape[0], b.shape[0]
    a_sorted, _ = torch.sort(a.to(torch.float64), dim=0)
    b_sorted, _ = torch.sort(b.to(torch.float64), dim=0)
    if n == m:
        # Equal sizes: the quantile functions share their breaks.
        return ((a_sorted - b_sorted).abs() ** p).mean(0) ** (1.0 / p)
    f64, device = torch.float64, a_sorted.device
    breaks_a = torch.arange(1, n + 1, dtype=f64, device=device) / n
    breaks_b = torch.arange(1, m + 1, dtype=f64, device=device) / m
    breaks = torch.cat([breaks_a, breaks_b]).sort()[0]
    widths = torch.diff(breaks, prepend=breaks.new_zeros(1))
    mids = breaks - 0.5 * widths  # inside each interval, so floor() picks its quantile
    index_a = (mids * n).floor().long().clamp_(0, n - 1)
    index_b = (mids * m).floor().long().clamp_(0, m - 1)
    gap = (a_sorted[index_a] - b_sorted[index_b]).abs()
    return (widths[:, None] * gap**p).sum(0) ** (1.0 / p)


def sliced_wasserstein(
    a: Tensor,
    b: Tensor,
    num_projections: int,
    generator: torch.Generator | None,
    p: int = 2,
) -> Tensor:
    """Sliced p-Wasserstein distance: (E_theta W_p(theta . a, theta . b)^p)^(1/p).

    Directions theta are uniform on the unit sphere (normalised Gaussians) drawn from
    `generator`, so a seed fixes the value. Each one-dimensional distance is exact
    (`wasserstein_1d`), and the two sets may differ in size.

    Args:
        a: Samples, `(n, *sample_shape)`.
        b: Samples, `(m, *sample_shape)`.
        num_projections: Random directions, >= 1.
        generator: Seeded source of the directions (None: torch's global generator).
        p: Order, 1 or 2.

    Returns:
        Scalar tensor (float64) in a's units.
    """
    a_flat, b_flat = _flat_pair(a, b, "a", "b")
    check_positive_int("num_projections", num_projections)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
    dim = a_flat.shape[1]
    device = generator.device if generator is not None else a_flat.device
    theta = torch.randn(dim, num_projections, generator=generator, device=device)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(a_flat)
    per_direction = wasserstein_1d(a_flat @ theta, b_flat.to(a_flat) @ theta, p)
    return (per_direction**p).mean() ** (1.0 / p)


def nearest_train_distances(samples: Tensor, train: Tensor, chunk_size: int = 1024) -> Tensor:
    """Euclidean distances from each sample to its nearest and second-nearest training point.

    Args:
        samples: `(n, *sample_shape)`.
        train: `(num_train, *sample_shape)` with num_train >= 2.
        chunk_size: Samples per distance block (bounds memory at chunk_size * num_train).

    Returns:
        `(n, 2)`: nearest, second nearest.
    """
    s_flat, t_flat = _flat_pair(samples, train, "samples", "train")
    if t_flat.shape[0] < 2:
        raise ValueError(f"train must hold at least 2 points, got {t_flat.shape[0]}")
    check_positive_int("chunk_size", chunk_size)
    t_flat = t_flat.to(s_flat)
    blocks = []
    for start in range(0, s_flat.shape[0], chunk_size):
        # Direct differences (not the |a|^2 - 2ab + |b|^2 expansion) keep near-zero distances
        # of copied samples accurate.
        dist = torch.cdist(
            s_flat[start : start + chunk_size], t_flat, compute_mode="donot_use_mm_for_euclid_dist"
        )
        blocks.append(dist.topk(2, dim=1, largest=False).values)
    return torch.cat(blocks)


def memorization_ratio(samples: Tensor, train: Tensor) -> Tensor:
    """Distance to the nearest training point over distance to the second nearest, per sample.

    Near 0: the sample sits on one training point (copied); near 1: it is about as far from
    its two nearest training points (not tied to either). A sample on a duplicated training
    point has 0 / 0 and is reported as 0. Yoon et al. (2023) count ratio < 1/3 as memorized
    (`memorized_fraction`).

    Args:
        samples: Generated samples, `(n, *sample_shape)`.
        train: Training set, `(num_train, *sample_shape)` with num_train >= 2.

    Returns:
        `(n,)` ratios in [0, 1].
    """
    distances = nearest_train_distances(samples, train)
    nearest, second = distances[:, 0], distances[:, 1]
    return torch.where(second > 0, nearest / second.clamp_min(1e-30), torch.zeros_like(nearest))


def memorized_fraction(ratio: Tensor, threshold: float = 1.0 / 3.0) -> float:
    """Fraction of samples whose `memorization_ratio` is below `threshold` (in (0, 1]).

    Args:
        ratio: `(n,)` from `memorization_ratio`.
        threshold: Cut-off; 1/3 as in Yoon et al. (2023).

    Returns:
        The fraction in [0, 1].
    """
    if not isinstance(ratio, Tensor) or ratio.dim() != 1 or ratio.shape[0] < 1:
        raise ValueError("ratio must be a non-empty tensor of shape (n,)")
    if not isinstance(threshold, float) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a float in (0, 1], got {threshold!r}")
    return float((ratio < threshold).to(torch.float64).mean())
