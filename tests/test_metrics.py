"""Metrics against scipy, scikit-learn and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.neighbors import NearestNeighbors

from flows.metrics import (
    memorization_ratio,
    memorized_fraction,
    nearest_train_distances,
    sliced_wasserstein,
    wasserstein_1d,
)

torch.set_num_threads(1)
F64 = torch.float64


def test_wasserstein_1d_matches_scipy_for_unequal_sizes() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 3, generator=g, dtype=F64), torch.rand(53, 3, generator=g, dtype=F64)
    ours = wasserstein_1d(a, b, p=1)
    for j in range(3):
        truth = scipy.stats.wasserstein_distance(a[:, j].numpy(), b[:, j].numpy())
        # Both are exact sums over the merged quantile breaks: float64 round-off.
        assert ours[j].item() == pytest.approx(truth, rel=1e-10, abs=1e-12)


def test_wasserstein_1d_p2_equals_replicated_equal_size_formula() -> None:
    # Sizes 6 and 4: replicating each point to lcm = 12 atoms turns both into equal-size sets,
    # where W2^2 is the mean squared gap of sorted values.
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 1, generator=g, dtype=F64), torch.randn(4, 1, generator=g, dtype=F64)
    a_rep = a.repeat_interleave(2, dim=0).sort(dim=0).values
    b_rep = b.repeat_interleave(3, dim=0).sort(dim=0).values
    truth = ((a_rep - b_rep) ** 2).mean().sqrt()
    # Exact finite sums in float64.
    torch.testing.assert_close(wasserstein_1d(a, b, p=2)[0], truth, rtol=1e-12, atol=1e-12)


def test_sliced_wasserstein_in_one_dimension_is_the_exact_distance() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, 1, generator=g, dtype=F64), torch.randn(70, 1, generator=g, dtype=F64)
    truth = scipy.stats.wasserstein_distance(a[:, 0].numpy(), b[:, 0].numpy())
    # In 1-D every direction is +-1 and W_p is invariant to the sign: exact up to round-off.
    sw = sliced_wasserstein(a, b, 5, torch.Generator().manual_seed(0), p=1)
    assert sw.item() == pytest.approx(truth, rel=1e-10)


def test_sliced_wasserstein_of_a_shift_matches_sphere_average() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 3, generator=g, dtype=F64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    sw = sliced_wasserstein(a, a + c, 20_000, torch.Generator().manual_seed(1))
    # Every 1-D distance is |theta . c|; E (theta . c)^2 = |c|^2 / d on the sphere. With 20,000
    # directions the Monte Carlo relative error of SW^2 is ~0.6%; allow 3%.
    assert sw.item() ** 2 == pytest.approx(c.pow(2).sum().item() / 3, rel=0.03)


def test_sliced_wasserstein_between_isotropic_gaussians() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(1000, 3, generator=g, dtype=F64)
    b = 2.0 * torch.randn(1000, 3, generator=g, dtype=F64) + torch.tensor([0.0, 0.0, 3.0])
    sw = sliced_wasserstein(a, b, 500, torch.Generator().manual_seed(2))
    # Projections are N(0, 1) and N(3 theta_3, 4): SW_2^2 = |mu|^2 / d + (2 - 1)^2 = 4.
    # 1000 samples and 500 directions leave ~1% spread (seeds gave 1.980-1.997); 0.1 on 2.
    assert sw.item() == pytest.approx(2.0, abs=0.1)


def test_sliced_wasserstein_basic_properties() -> None:
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(30, 2, 2, generator=g), torch.randn(40, 2, 2, generator=g) + 1.0
    assert sliced_wasserstein(a, a, 10, torch.Generator().manual_seed(0)).item() == 0.0
    ab = sliced_wasserstein(a, b, 10, torch.Generator().manual_seed(0))
    ba = sliced_wasserstein(b, a, 10, torch.Generator().manual_seed(0))
    shuffled = sliced_wasserstein(a.flip(0), b, 10, torch.Generator().manual_seed(0))
    # Symmetry and order invariance hold exactly up to float rounding of the projections.
    assert ab.item() == pytest.approx(ba.item(), rel=1e-6)
    assert ab.item() == pytest.approx(shuffled.item(), rel=1e-6)
    assert ab.item() > 0.5


def test_memorization_ratio_matches_scikit_learn_neighbours() -> None:
    g = torch.Generator().manual_seed(6)
    train = torch.randn(300, 4, generator=g, dtype=F64)
    samples = torch.randn(100, 4, generator=g, dtype=F64)
    distances, _ = NearestNeighbors(n_neighbors=2).fit(train.numpy()).kneighbors(samples.numpy())
    truth = torch.from_numpy(distances[:, 0] / distances[:, 1])
    # Two exact float64 distance computations.
    ours = nearest_train_distances(samples, train, chunk_size=7)
    torch.testing.assert_close(ours, torch.from_numpy(distances), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(memorization_ratio(samples, train), truth, rtol=1e-10, atol=1e-12)


def test_memorization_ratio_flags_copies() -> None:
    train = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    samples = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 5.0], [0.01, 0.0]])
    ratio = memorization_ratio(samples, train)
    # Copy -> 0; midpoint of two points -> 1; duplicated training point -> 0 (0/0 defined as 0);
    # 0.01 from one point, 0.99 from the next -> 1/99.
    torch.testing.assert_close(ratio, torch.tensor([0.0, 1.0, 0.0, 0.01 / 0.99]), rtol=1e-5, atol=0)
    assert memorized_fraction(ratio) == 0.75


def test_bad_input_raises_naming_argument() -> None:
    a = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="sample shape"):
        sliced_wasserstein(a, torch.zeros(5, 3), 10, None)
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein(a, a, 0, None)
    with pytest.raises(ValueError, match="p must"):
        sliced_wasserstein(a, a, 3, None, p=3)
    with pytest.raises(ValueError, match="b must contain only finite"):
        sliced_wasserstein(a, torch.full((5, 2), math.nan), 3, None)
    with pytest.raises(ValueError, match="generator"):
        sliced_wasserstein(a, a, 3, 7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2"):
        memorization_ratio(a, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="sample shape"):
        memorization_ratio(a, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="threshold"):
        memorized_fraction(torch.zeros(3), threshold=0.0)
    with pytest.raises(ValueError, match="ratio"):
        memorized_fraction(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="columns"):
        wasserstein_1d(torch.zeros(3, 2), torch.zeros(3, 1))
    assert np.isfinite(sliced_wasserstein(a, a, 3, None).item())
