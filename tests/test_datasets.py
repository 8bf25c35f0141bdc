"""training.datasets: shapes, ranges, the geometry of each toy set, and determinism by seed."""

from __future__ import annotations

import math

import pytest
import torch

from training.datasets import (
    DATASETS,
    DIGITS_SIZE,
    load_digits_data,
    make_dataset,
    make_labeled_dataset,
)

N = 4000


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(DATASETS))
def test_shapes_dtypes_and_labels(name: str) -> None:
    info = DATASETS[name]
    n = 300
    data = make_labeled_dataset(name, n, _generator(0))
    assert data.x.shape == (n, *info.sample_shape)
    assert data.x.dtype == torch.float32
    assert data.labels.shape == (n,)
    assert data.labels.dtype == torch.int64
    assert int(data.labels.min()) >= 0
    assert int(data.labels.max()) < info.num_classes
    assert bool(torch.isfinite(data.x).all())


@pytest.mark.parametrize("name", list(DATASETS))
def test_same_seed_same_points_other_seed_other_points(name: str) -> None:
    first = make_dataset(name, 200, _generator(7))
    assert torch.equal(first, make_dataset(name, 200, _generator(7)))
    assert not torch.equal(first, make_dataset(name, 200, _generator(8)))


def test_digits_are_sklearn_digits_scaled_to_unit_range() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits_data()
    reference = load_digits()
    assert digits.x.shape == (DIGITS_SIZE, 1, 8, 8)
    # Pixel values are integers 0..16, so the scaled values are exact multiples of 1/8.
    raw = torch.as_tensor(reference.images, dtype=torch.float32)
    assert torch.equal((digits.x[:, 0] + 1.0) * 8.0, raw)
    assert float(digits.x.min()) == -1.0
    assert float(digits.x.max()) == 1.0
    assert torch.equal(digits.labels, torch.as_tensor(reference.target))
    assert sorted(set(digits.labels.tolist())) == list(range(10))


def test_digit_subsets_are_drawn_without_replacement() -> None:
    sample = make_labeled_dataset("digits", DIGITS_SIZE, _generator(0))
    # Every image once: the multiset of (image, label) rows equals the full set's.
    full = load_digits_data()
    key = lambda x, y: sorted(  # noqa: E731 - a one-line sort key
        zip(x.reshape(len(x), -1).tolist(), y.tolist(), strict=True)
    )
    assert key(sample.x, sample.labels) == key(full.x, full.labels)


def test_moons_points_sit_on_their_arcs() -> None:
    data = make_labeled_dataset("moons", N, _generator(1))
    # Undo the centring, then measure the distance to each moon's unit circle.
    raw = data.x + torch.tensor([0.5, 0.25])
    centers = torch.tensor([[0.0, 0.0], [1.0, 0.5]])[data.labels]
    radial = (raw - centers).norm(dim=1) - 1.0
    # Noise is isotropic with std 0.05, so the radial residual has std ~0.05; 4000 points
    # estimate it within ~2%, the 0.045..0.055 band allows 10%.
    assert 0.045 < float(radial.std()) < 0.055
    assert abs(float(radial.mean())) < 0.01  # mean of a 0.05-std residual over 4000: +-0.002
    # The outer moon is the upper half circle, the inner one the lower half (before noise).
    upper = raw[:, 1] - centers[:, 1]
    assert float((upper[data.labels == 0] > -0.15).float().mean()) > 0.99
    assert float((upper[data.labels == 1] < 0.15).float().mean()) > 0.99


def test_eight_gaussians_are_centred_on_the_circle() -> None:
    data = make_labeled_dataset("eight_gaussians", N, _generator(2))
    angle = data.labels.to(torch.float32) * (math.pi / 4)
    centers = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    offsets = data.x - centers
    # Each coordinate ~N(0, 0.15^2): 8000 values estimate the std within ~1%; allow 5%.
    assert abs(float(offsets.std()) - 0.15) < 0.0075
    assert float(offsets.mean(dim=0).abs().max()) < 0.01  # standard error 0.15/sqrt(4000)=0.0024
    counts = torch.bincount(data.labels, minlength=8).float()
    # Equal weights: each count ~ Binomial(4000, 1/8), std ~21; 120 is ~6 standard deviations.
    assert float((counts - N / 8).abs().max()) < 120


def test_checkerboard_covers_only_dark_squares() -> None:
    x = make_dataset("checkerboard", N, _generator(3))
    assert float(x.min()) >= -2.0
    assert float(x.max()) < 2.0
    cells = torch.floor(x).to(torch.int64)
    # Dark squares have an even (column + row) parity on the [-2, 2)^2 board.
    assert bool(((cells[:, 0] + cells[:, 1]) % 2 == 0).all())
    assert len({tuple(cell) for cell in cells.tolist()}) == 8


def test_spirals_are_point_symmetric_arms() -> None:
    data = make_labeled_dataset("spirals", N, _generator(4))
    # Reflecting arm 1 through the origin lands on arm 0: compare radii distributions.
    radius = data.x.norm(dim=1)
    r0, r1 = radius[data.labels == 0], radius[data.labels == 1]
    # Quantiles of two 2000-point samples of one law agree to ~0.1 (radii span 0..3).
    for q in (0.25, 0.5, 0.75):
        assert abs(float(r0.quantile(q)) - float(r1.quantile(q))) < 0.1
    assert float(radius.max()) < 3.6  # outer end at radius 3 plus a few noise stds (0.1)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("swiss_roll", 10, None), "dataset"),
        (("moons", 0, None), "n"),
        (("moons", 2.5, None), "n"),
        (("digits", DIGITS_SIZE + 1, None), "n"),
        (("moons", 10, 42), "generator"),
    ],
)
def test_bad_arguments_name_the_argument(args: tuple[object, ...], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_dataset(*args)  # type: ignore[arg-type]
