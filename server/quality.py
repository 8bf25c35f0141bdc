"""The quality gate's measurements: how good a model version is on its declared data set.

- 2-D data sets (moons, eight_gaussians, checkerboard, spirals): sliced Wasserstein-2 distance
  between samples and fresh data (lower is better), and the negative log-likelihood of held-out
  data in nats per dimension (exact divergence, rk4; lower is better). Generated sets are
  infinite, so freshly drawn points are held out from any training run.
- digits: accuracy of a small scikit-learn classifier, trained on the real digits, on
  class-conditional samples (higher is better). The shipped digits model trains on every
  scikit-learn digit, so there is no held-out split to score a likelihood on.

Both versions of a comparison are measured with the same noise, data and projections (common
random numbers), so the difference reflects the models rather than sampling luck.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from flows.likelihood import log_likelihood
from flows.metrics import sliced_wasserstein
from flows.solvers import ODE_SOLVERS, sample
from flowserve.modeldir import LoadedModel
from training.datasets import DATASETS, load_digits_data, make_dataset

SLICED_WASSERSTEIN = "sliced_wasserstein"
CLASSIFIER_ACCURACY = "classifier_accuracy"
HELDOUT_NLL = "heldout_nll_nats_per_dim"
_PROJECTIONS = 128
# Keeps relative losses finite when the reference score is (nearly) zero.
_EPSILON = 1e-12


@dataclass(frozen=True)
class QualityScore:
    """One measurement of a model version.

    Attributes:
        metric: `SLICED_WASSERSTEIN`, `CLASSIFIER_ACCURACY` or `HELDOUT_NLL`.
        value: The measured value (nan-free: non-finite results score as infinitely bad).
        higher_is_better: Direction of the metric.
        relative: Whether a loss is measured as a fraction of the reference value (distances,
            accuracies) or as a plain difference in the metric's units (log-likelihoods, whose
            zero is arbitrary, so a fraction of them means nothing).
    """

    metric: str
    value: float
    higher_is_better: bool
    relative: bool = True

    def loss(self, reference: QualityScore) -> float:
        """How much worse this score is than `reference` (<= 0: no loss).

        A fraction of the reference for relative metrics, a difference in the metric's units
        otherwise.
        """
        if reference.metric != self.metric:
            raise ValueError(f"cannot compare {self.metric} with {reference.metric}")
        worse_by = self.value - reference.value
        if self.higher_is_better:
            worse_by = -worse_by
        if not self.relative:
            return worse_by
        return worse_by / max(abs(reference.value), _EPSILON)


def _draw(model: LoadedModel, num_samples: int, seed: int, labels: torch.Tensor | None) -> Any:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    x_0 = torch.randn((num_samples, *config.sample_shape), generator=generator)
    solver = config.default_solver if config.default_solver in ODE_SOLVERS else "euler"
    return sample(model.velocity_fn(labels), x_0, config.default_num_steps, solver=solver)


class QualityMeter:
    """Measures model versions; trains the digits classifier once, on first use."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self._num_samples = num_samples
        self._seed = seed
        self._lock = threading.Lock()
        self._classifier: Any = None

    def measure(self, model: LoadedModel) -> tuple[QualityScore, ...]:
        """The model's scores; empty when its data set (if any) has no measure here."""
        dataset = model.config.dataset
        if dataset is None or dataset not in DATASETS:
            return ()
        if dataset == "digits" and model.config.num_classes == 10:
            return (self._digits_accuracy(model),)
        if DATASETS[dataset].sample_shape == (2,) and tuple(model.config.sample_shape) == (2,):
            return (self._sliced_wasserstein(model, dataset), self._heldout_nll(model, dataset))
        return ()

    def _sliced_wasserstein(self, model: LoadedModel, dataset: str) -> QualityScore:
        samples = _draw(model, self._num_samples, self._seed, None)
        if not bool(torch.isfinite(samples).all()):
            return QualityScore(SLICED_WASSERSTEIN, float("inf"), higher_is_better=False)
        data = make_dataset(dataset, self._num_samples, torch.Generator().manual_seed(self._seed))
        distance = sliced_wasserstein(
            samples, data, _PROJECTIONS, torch.Generator().manual_seed(self._seed + 1)
        )
        return QualityScore(SLICED_WASSERSTEIN, float(distance), higher_is_better=False)

    def _heldout_nll(self, model: LoadedModel, dataset: str) -> QualityScore:
        # Seed + 2: neither the sampling noise (seed) nor the projections (seed + 1).
        data = make_dataset(
            dataset, self._num_samples, torch.Generator().manual_seed(self._seed + 2)
        )
        estimate = log_likelihood(
            model.velocity_fn(), data, model.config.default_num_steps, solver="rk4"
        )
        nll = -float(estimate.log_prob.mean()) / data[0].numel()
        if not math.isfinite(nll):
            nll = float("inf")
        return QualityScore(HELDOUT_NLL, nll, higher_is_better=False, relative=False)

    def _digits_accuracy(self, model: LoadedModel) -> QualityScore:
        classifier = self._digits_classifier()
        labels = torch.arange(self._num_samples) % 10
        samples = _draw(model, self._num_samples, self._seed, labels)
        if not bool(torch.isfinite(samples).all()):
            return QualityScore(CLASSIFIER_ACCURACY, 0.0, higher_is_better=True)
        predicted = classifier.predict(samples.reshape(len(samples), -1).numpy())
        accuracy = float((torch.as_tensor(predicted) == labels).double().mean())
        return QualityScore(CLASSIFIER_ACCURACY, accuracy, higher_is_better=True)

    def _digits_classifier(self) -> Any:
        with self._lock:
            if self._classifier is None:
                from sklearn.linear_model import LogisticRegression

                digits = load_digits_data()
                classifier = LogisticRegression(max_iter=2000)
                classifier.fit(digits.x.reshape(len(digits.x), -1).numpy(), digits.labels.numpy())
                self._classifier = classifier
            return self._classifier
