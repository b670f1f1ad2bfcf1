"""Intervals for every reported number: one stratified bootstrap resampler, used by the headline metrics, the
subgroups, external validation and the recipe comparisons (benchmarks/compare_runs.py, era_shift.py).

Each resample draws, within every stratum (a class, by default), as many images as the stratum holds, with
replacement, so every resample keeps the class counts; the interval is the central 95 % of the resampled values
(percentiles). A paired comparison of two runs applies each resample to both runs' scores of the same images, so
the interval is that of the difference itself. The AUC is :func:`melanoma.assess.metrics.auc` throughout.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from melanoma.assess.metrics import CI_METRICS, auc, headline

LEVEL = 0.95


def stratified_resamples(strata: Sequence, resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Index arrays of bootstrap resamples: each stratum (equal values of ``strata``, in sorted order) resampled to its
    own size with replacement. The one resampler behind every interval of the project."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(strata == value) for value in np.unique(strata)]
    for _ in range(resamples):
        yield np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])


def percentile_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float | None, float | None]:
    """The central ``level`` share of resampled values; (None, None) when there are none."""
    if not len(values):
        return None, None
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def bootstrap_ci(labels: Sequence[int], probabilities: np.ndarray, classes: Sequence[str], threshold: float | None,
                 resamples: int = 1000, seed: int = 0, level: float = LEVEL) -> dict[str, dict]:
    """The headline metrics (point value and interval), resampled within each class."""
    labels = np.asarray(labels)
    point = headline(labels, probabilities, classes, threshold)
    samples: dict[str, list[float]] = {name: [] for name in CI_METRICS}
    for picked in stratified_resamples(labels, resamples, seed):
        for name, value in headline(labels[picked], probabilities[picked], classes, threshold).items():
            if value is not None:
                samples[name].append(value)
    return {name: dict(zip(("value", "low", "high"), (point[name], *percentile_interval(samples[name], level))))
            for name in CI_METRICS}


def auc_interval(strata: Sequence, positive: np.ndarray, score: np.ndarray, resamples: int = 1000,
                 seed: int = 0) -> dict:
    """AUC with its interval (resampled within ``strata``, e.g. the class labels) and the counts it rests on."""
    positive = np.asarray(positive, dtype=bool)
    result = {"value": auc(positive, score), "low": None, "high": None, "positives": int(positive.sum()),
              "negatives": int((~positive).sum())}
    if result["value"] is not None and resamples:
        values = [auc(positive[p], score[p]) for p in stratified_resamples(strata, resamples, seed)]
        result["low"], result["high"] = percentile_interval([v for v in values if v is not None])
    return result


def paired_difference(statistic_a: Callable[[np.ndarray], float], statistic_b: Callable[[np.ndarray], float],
                      strata: Sequence, resamples: int, seed: int = 0) -> dict:
    """statistic_b(rows) - statistic_a(rows) on the same resampled rows, with its interval; each statistic takes an
    index array of the images (or pairs) that ``strata`` labels. ``outside_noise``: the interval excludes 0."""
    everything = np.arange(len(strata))
    differences = np.array([statistic_b(rows) - statistic_a(rows)
                            for rows in stratified_resamples(strata, resamples, seed)])
    low, high = percentile_interval(differences)
    a, b = float(statistic_a(everything)), float(statistic_b(everything))
    return {"a": a, "b": b, "difference": b - a, "low": low, "high": high, "n": len(everything),
            "resamples": resamples, "share_b_better": float((differences > 0).mean()),
            "outside_noise": bool(low > 0 or high < 0)}


def paired_auc_difference(strata: Sequence, positive: np.ndarray, score_a: np.ndarray, score_b: np.ndarray,
                          resamples: int = 2000, seed: int = 0) -> dict:
    """AUC of B minus AUC of A on the same images, from the same resamples for both (see :func:`paired_difference`),
    beside each run's AUC with the counts."""
    positive = np.asarray(positive, dtype=bool)
    result = {"a": auc_interval(strata, positive, score_a, 0), "b": auc_interval(strata, positive, score_b, 0)}
    if result["a"]["value"] is None:
        return result | {"difference": None, "low": None, "high": None, "outside_noise": False}
    paired = paired_difference(lambda rows: auc(positive[rows], score_a[rows]),
                               lambda rows: auc(positive[rows], score_b[rows]), strata, resamples, seed)
    return result | {key: paired[key] for key in ("difference", "low", "high", "share_b_better", "resamples",
                                                  "outside_noise")}
