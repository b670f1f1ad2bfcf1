"""One evaluation path for validation, test, prediction and serving: probabilities from a model, and metrics.

``predict_probabilities`` is the only place a model meets evaluation images; ``compute_metrics`` the only place
metrics are computed from labels and probabilities.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from melanoma.data import MELANOMA
from melanoma.transforms import dihedral_views, eval_pixels, to_model_input


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, images: np.ndarray, image_size: int, batch_size: int = 64,
                          tta: bool = False, device: str | torch.device = "cpu") -> np.ndarray:
    """Softmax probabilities for N x H x W x 3 uint8 images, optionally averaged over the 8 dihedral views."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([eval_pixels(image, image_size) for image in images[start:start + batch_size]])
        views = dihedral_views(batch) if tta else [batch]
        probs = sum(torch.softmax(model(to_model_input(v).to(device)).float(), dim=1) for v in views) / len(views)
        outputs.append(probs.cpu())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outputs).numpy()


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
                             "support": int(support[i])} for i, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(labels, predicted, labels=all_classes).tolist(),
    }
    if MELANOMA in classes:
        metrics["melanoma"] = melanoma_metrics(labels == list(classes).index(MELANOMA),
                                               probabilities[:, list(classes).index(MELANOMA)] if len(labels) else
                                               np.zeros(0), predicted == list(classes).index(MELANOMA),
                                               melanoma_threshold)
    return metrics


def melanoma_metrics(is_melanoma: np.ndarray, melanoma_probability: np.ndarray, predicted_melanoma: np.ndarray,
                     threshold: float | None) -> dict:
    """Melanoma vs rest: AUC, and sensitivity/specificity of the top-class call and (if given) of the alert threshold."""
    from sklearn.metrics import roc_auc_score

    positives, negatives = is_melanoma.sum(), (~is_melanoma).sum()
    result = {"positives": int(positives), "negatives": int(negatives),
              "auc": float(roc_auc_score(is_melanoma, melanoma_probability)) if positives and negatives else None,
              "recall_top_class": _rate(predicted_melanoma & is_melanoma, positives),
              "specificity_top_class": _rate(~predicted_melanoma & ~is_melanoma, negatives)}
    if threshold is not None:
        alert = melanoma_probability >= threshold
        result.update({"threshold": float(threshold), "sensitivity": _rate(alert & is_melanoma, positives),
                       "specificity": _rate(~alert & ~is_melanoma, negatives)})
    return result


def _rate(hits: np.ndarray, total: int) -> float | None:
    return float(hits.sum() / total) if total else None
