"""Temperature scaling and calibration measures on constructed cases."""
from __future__ import annotations

import numpy as np
import pytest

from melanoma.assess.calibration import (
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from melanoma.models.probabilities import apply_temperature


def _overconfident(n: int = 600, seed: int = 0):
    """A model right 70% of the time that always claims ~99% confidence."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    predicted = np.where(rng.random(n) < 0.7, labels, (labels + 1) % 3)
    probs = np.full((n, 3), 0.005)
    probs[np.arange(n), predicted] = 0.99
    return probs, labels


def test_temperature_scaling_lowers_nll_and_ece_of_an_overconfident_model():
    probs, labels = _overconfident()
    temperature = fit_temperature(probs, labels)
    calibrated = apply_temperature(probs, temperature)
    assert temperature > 1.5  # softening, as an overconfident model needs
    # the best any rescaling can do here: 70% at p=0.7, 30% at p=0.15 -> NLL 0.82 (from 1.61)
    ideal = -(0.7 * np.log(0.7) + 0.3 * np.log(0.15))
    assert negative_log_likelihood(calibrated, labels) < ideal + 0.02 < negative_log_likelihood(probs, labels)
    assert expected_calibration_error(calibrated, labels) < 0.05 < expected_calibration_error(probs, labels)
    assert (calibrated.argmax(1) == probs.argmax(1)).all()
    held_out, held_labels = _overconfident(seed=1)
    assert negative_log_likelihood(apply_temperature(held_out, temperature), held_labels) < \
        negative_log_likelihood(held_out, held_labels)


def test_ece_and_brier_hand_computed():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bins: confidence 0.9 -> accuracy 0.5 (gap 0.4), confidence 0.6 -> accuracy 1.0 (gap 0.4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    assert brier_score(probs, labels) == pytest.approx((0.02 + 1.62 + 0.32 + 0.32) / 4)


def test_temperature_one_changes_nothing():
    probs, _ = _overconfident(20)
    assert np.allclose(apply_temperature(probs, 1.0), probs)
