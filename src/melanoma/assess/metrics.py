"""Metrics from labels and probabilities.

``compute_metrics`` is the only place metrics are computed (the probabilities come from
:mod:`melanoma.models.probabilities`, the only place a model meets evaluation images); :func:`auc` is the one area
under the ROC curve every number uses; ``headline`` is the handful that :mod:`melanoma.assess.intervals` puts
intervals on; ``threshold_for_sensitivity`` chooses the melanoma alert threshold.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from melanoma.data.records import MELANOMA


def compute_metrics(labels: Sequence[int], probabilities: np.ndarray, classes: Sequence[str],
                    melanoma_threshold: float | None = None) -> dict:
    """Accuracy, balanced accuracy, macro F1, per-class table, confusion matrix and melanoma-vs-rest figures."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1) if len(labels) else labels
    present = np.unique(labels)
    all_classes = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=all_classes,
                                                                     zero_division=0)
    metrics = {
        "n": int(len(labels)),
        "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
        # balanced accuracy and macro F1 over the classes present in this split (absent ones have no recall)
        "balanced_accuracy": float(recall[present].mean()) if len(labels) else float("nan"),
        "macro_f1": float(f1[present].mean()) if len(labels) else float("nan"),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i]), "auc": auc(labels == i, probabilities[:, i])}
                      for i, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(labels, predicted, labels=all_classes).tolist(),
    }
    if MELANOMA in classes:
        metrics["melanoma"] = melanoma_metrics(labels == list(classes).index(MELANOMA),
                                               probabilities[:, list(classes).index(MELANOMA)] if len(labels) else
                                               np.zeros(0), predicted == list(classes).index(MELANOMA),
                                               melanoma_threshold)
    return metrics


def auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve from ranks (ties count half, as scikit-learn's); None when a side is empty."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def melanoma_metrics(is_melanoma: np.ndarray, melanoma_probability: np.ndarray, predicted_melanoma: np.ndarray,
                     threshold: float | None) -> dict:
    """Melanoma vs rest: AUC, and sensitivity/specificity of the top-class call and (if given) of the alert
    threshold."""
    positives, negatives = is_melanoma.sum(), (~is_melanoma).sum()
    result = {"positives": int(positives), "negatives": int(negatives), "auc": auc(is_melanoma, melanoma_probability),
              "recall_top_class": _rate(predicted_melanoma & is_melanoma, positives),
              "specificity_top_class": _rate(~predicted_melanoma & ~is_melanoma, negatives)}
    if threshold is not None:
        alert = melanoma_probability >= threshold
        result.update({"threshold": float(threshold), "sensitivity": _rate(alert & is_melanoma, positives),
                       "specificity": _rate(~alert & ~is_melanoma, negatives)})
    return result


def _rate(hits: np.ndarray, total: int) -> float | None:
    return float(hits.sum() / total) if total else None


def threshold_for_sensitivity(is_melanoma: np.ndarray, melanoma_probability: np.ndarray,
                              target: float = 0.9) -> dict:
    """The highest alert threshold whose sensitivity reaches ``target`` (missing a melanoma costs far more than a
    false alarm), with the specificity it costs. Chosen on validation, never on Test."""
    is_melanoma = np.asarray(is_melanoma, dtype=bool)
    positives = np.sort(np.asarray(melanoma_probability)[is_melanoma])[::-1]
    if len(positives) == 0:
        return {"threshold": 0.5, "target_sensitivity": target, "sensitivity": None, "specificity": None,
                "note": "no melanoma in the validation split; default threshold 0.5"}
    needed = int(np.ceil(target * len(positives)))
    threshold = float(positives[max(needed, 1) - 1])
    alert = melanoma_probability >= threshold
    negatives = ~is_melanoma
    return {"threshold": threshold, "target_sensitivity": target,
            "sensitivity": float(alert[is_melanoma].mean()),
            "specificity": float((~alert[negatives]).mean()) if negatives.any() else None}


CI_METRICS = ("balanced_accuracy", "macro_f1", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def headline(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
             threshold: float | None) -> dict[str, float | None]:
    """The few numbers reported with confidence intervals, in plain numpy (fast enough for 1,000 resamples);
    ``tests/assess/test_evaluation.py`` checks them against scikit-learn."""
    labels = np.asarray(labels)
    k = len(classes)
    predicted = probabilities.argmax(axis=1)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    support, called, hits = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    present = support > 0
    recall = np.divide(hits, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(hits, called, out=np.zeros(k), where=called > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    result = {"balanced_accuracy": float(recall[present].mean()), "macro_f1": float(f1[present].mean()),
              "melanoma_auc": None, "melanoma_sensitivity": None, "melanoma_specificity": None}
    if MELANOMA not in classes:
        return result
    score = probabilities[:, list(classes).index(MELANOMA)]
    positive = labels == list(classes).index(MELANOMA)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    result["melanoma_auc"] = auc(positive, score)
    if threshold is not None:
        alert = score >= threshold
        result["melanoma_sensitivity"] = float(alert[positive].mean()) if n_pos else None
        result["melanoma_specificity"] = float((~alert[~positive]).mean()) if n_neg else None
    return result
