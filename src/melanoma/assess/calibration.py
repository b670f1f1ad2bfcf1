"""Temperature scaling (fitted on validation) and the calibration measures reported with it: ECE, Brier score, NLL,
and a reliability diagram. A temperature rescales log-probabilities, p_T = softmax(log p / T); it never changes the
top class."""
from __future__ import annotations

import numpy as np

from melanoma.models.probabilities import EPS, apply_temperature


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], EPS, 1.0)).mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises validation NLL."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels)
    result = minimize_scalar(lambda t: negative_log_likelihood(apply_temperature(probabilities, t), labels),
                             bounds=(0.05, 20.0), method="bounded")
    return float(result.x)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """|accuracy - confidence| of the top class, averaged over equal-width confidence bins weighted by size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    onehot = np.eye(probabilities.shape[1])[np.asarray(labels)]
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


def calibration_summary(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    return {"ece": expected_calibration_error(probabilities, labels), "brier": brier_score(probabilities, labels),
            "nll": negative_log_likelihood(probabilities, labels)}


def reliability_figure(before: np.ndarray, after: np.ndarray, labels: np.ndarray, temperature: float,
                       bins: int = 10):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5.5))
    axes = figure.add_subplot()
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for probabilities, label, marker in ((before, "before", "o-"), (after, f"after (T = {temperature:.2f})", "s-")):
        confidence = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == labels
        accuracy = [correct[(confidence > lo) & (confidence <= hi)].mean()
                    if ((confidence > lo) & (confidence <= hi)).any() else np.nan
                    for lo, hi in zip(edges[:-1], edges[1:])]
        ece = expected_calibration_error(probabilities, labels)
        axes.plot(centres, accuracy, marker, label=f"{label}, ECE {ece:.3f}")
    axes.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    axes.set(xlabel="confidence of the top class", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
             title="Reliability diagram (validation)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return figure
