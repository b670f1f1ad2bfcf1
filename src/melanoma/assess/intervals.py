"""Intervals for every reported number: one AUC and one stratified bootstrap resampler, used by the metrics,
the subgroups, external validation, consistency and the recipe comparisons (paired draws on the same images)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from melanoma.assess.metrics import CI_METRICS, headline


def bootstrap_ci(labels: Sequence[int], probabilities: np.ndarray, classes: Sequence[str], threshold: float | None,
                 resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Stratified bootstrap (resampling within each class, so every resample keeps the class counts) of the
    headline metrics: point value and the central ``level`` percentile interval."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    point = headline(labels, probabilities, classes, threshold)
    samples: dict[str, list[float]] = {name: [] for name in CI_METRICS}
    for _ in range(resamples):
        picked = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        for name, value in headline(labels[picked], probabilities[picked], classes, threshold).items():
            if value is not None:
                samples[name].append(value)
    tail = (1 - level) / 2 * 100
    return {name: {"value": point[name],
                   "low": float(np.percentile(samples[name], tail)) if samples[name] else None,
                   "high": float(np.percentile(samples[name], 100 - tail)) if samples[name] else None}
            for name in CI_METRICS}


# ---------------------------------------------------------------------------------------------------------------
# AUC with intervals, alone and paired


def auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve from ranks (ties count half); None when one side is empty."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _resamples(positive: np.ndarray, resamples: int, seed: int):
    """Stratified bootstrap draws: positives and negatives resampled separately, so each draw keeps both counts."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    for _ in range(resamples):
        yield np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])


def auc_interval(positive: np.ndarray, score: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict:
    """AUC with its 95 % stratified-bootstrap interval and the counts it rests on."""
    positive = np.asarray(positive, dtype=bool)
    result = {"value": auc(positive, score), "low": None, "high": None, "positives": int(positive.sum()),
              "negatives": int((~positive).sum())}
    if result["value"] is not None and resamples:
        values = [auc(positive[p], score[p]) for p in _resamples(positive, resamples, seed)]
        result["low"], result["high"] = (float(v) for v in np.percentile(values, [2.5, 97.5]))
    return result


def paired_auc_difference(positive: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, resamples: int = 2000,
                          seed: int = 0) -> dict:
    """AUC of B minus AUC of A on the same images, with the 95 % interval of the difference from the same
    resamples for both. ``outside_noise`` is true when the interval excludes 0."""
    positive = np.asarray(positive, dtype=bool)
    result = {"a": auc_interval(positive, score_a, 0), "b": auc_interval(positive, score_b, 0)}
    if result["a"]["value"] is None:
        return result | {"difference": None, "low": None, "high": None, "outside_noise": False}
    differences = np.array([auc(positive[p], score_b[p]) - auc(positive[p], score_a[p])
                            for p in _resamples(positive, resamples, seed)])
    low, high = (float(v) for v in np.percentile(differences, [2.5, 97.5]))
    return result | {"difference": result["b"]["value"] - result["a"]["value"], "low": low, "high": high,
                     "share_b_better": float((differences > 0).mean()), "resamples": resamples,
                     "outside_noise": bool(low > 0 or high < 0)}
