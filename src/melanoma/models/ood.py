"""The out-of-distribution gate: detectors on the model's pooled penultimate features (Mahalanobis, kNN) and logits
(energy), the threshold chosen on validation, and the gate file (``ood_gate.npz``) kept in the run folder.

Every detector gives a score where higher means "less like the training images":

- ``mahalanobis``: the squared Mahalanobis distance to the nearest class mean, with one covariance shared by all
  classes, estimated with Ledoit-Wolf shrinkage (scikit-learn) so that it stays invertible when the feature
  dimension is close to the number of training images (Lee et al., NeurIPS 2018).
- ``energy``: ``-logsumexp(logits)`` (Liu et al., NeurIPS 2020); nothing to fit.
- ``knn``: one minus the cosine similarity to the k-th nearest training image, on L2-normalised features
  (Sun et al., ICML 2022).

The threshold is the score below which ``KEEP`` (95 %) of the validation images fall, so at least that share of
in-distribution images passes. The gate file is a NumPy ``.npz`` read with ``allow_pickle=False`` and records the
detector, its arrays, the threshold and the SHA-256 of the checkpoint whose features it was fitted on: a gate that
does not belong to the run's model is refused.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from melanoma.core.errors import GateError
from melanoma.core.io import atomic_write_bytes
from melanoma.core.text import display_name
from melanoma.models.catalog import DETECTORS

GATE_FILE = "ood_gate.npz"
GATE_FORMAT = "melanoma-ood-gate-v1"
KEEP = 0.95              # share of in-distribution validation images that must pass
KNN_K = 10
KNN_PER_NEIGHBOUR = 50  # k grows with the bank up to KNN_K: one neighbour per 50 training images (Sun et al. 2022)
KNN_BANK = 10_000        # at most this many training images kept for kNN (a seeded subsample beyond)
REASON = "out of distribution: this does not look like a dermoscopic lesion image"
# what each detector keeps, and with which dimensions ("C" classes, "D" feature dimension)
_ARRAYS = {"mahalanobis": {"means": ("C", "D"), "precision": ("D", "D")}, "energy": {},
           "knn": {"bank": ("N", "D")}}


@dataclass
class OODGate:
    """A fitted detector and its threshold: ``decide`` says, per image, whether it looks like the training data."""

    detector: str
    threshold: float
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    checkpoint_sha256: str = ""
    info: dict = field(default_factory=dict)

    @property
    def needs_features(self) -> bool:
        return self.detector != "energy"

    def scores(self, features: np.ndarray | None, logits: np.ndarray | None) -> np.ndarray:
        return detector_scores(self.detector, self._scoring_arrays, features, logits)

    @functools.cached_property
    def _scoring_arrays(self) -> dict[str, np.ndarray]:
        """The Mahalanobis arrays in float64 once per gate, not once per request (the file keeps float32)."""
        return {name: np.asarray(array, dtype=np.float64) if name in ("means", "precision") else array
                for name, array in self.arrays.items()}

    def decide(self, features: np.ndarray | None, logits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, in_distribution) for N images; an image passes when its score is at most the threshold."""
        scores = self.scores(features, logits)
        return scores, scores <= self.threshold


# ---------------------------------------------------------------------------------------------------------------
# Detectors


def knn_k(bank_size: int) -> int:
    """The neighbour whose distance is the kNN score: the 10th for 500 or more training images, fewer for fewer."""
    return max(1, min(KNN_K, bank_size // KNN_PER_NEIGHBOUR))


def fit_detector(detector: str, features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays ``detector`` needs, fitted on in-distribution training features (N x D) and labels (N)."""
    if detector not in DETECTORS:
        raise GateError(f"unknown out-of-distribution detector '{detector}' (choose from: {', '.join(DETECTORS)})")
    features = np.asarray(features, dtype=np.float64)
    if detector == "energy":
        return {}
    if len(features) < 2:
        raise GateError(f"the {detector} detector needs at least 2 training images, got {len(features)}")
    if detector == "knn":
        bank = _normalised(features)
        if len(bank) > KNN_BANK:
            bank = bank[np.sort(np.random.default_rng(seed).choice(len(bank), KNN_BANK, replace=False))]
        return {"bank": bank.astype(np.float32)}
    from sklearn.covariance import LedoitWolf

    labels = np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return {"means": means.astype(np.float32), "precision": precision.astype(np.float32)}


def detector_scores(detector: str, arrays: dict[str, np.ndarray], features: np.ndarray | None,
                    logits: np.ndarray | None) -> np.ndarray:
    """Out-of-distribution scores (higher = less like the training images) for N images."""
    if detector == "energy":
        if logits is None:
            raise GateError("the energy detector needs the model's logits")
        logits = np.asarray(logits, dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        return -(top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
    if features is None:
        raise GateError(f"the {detector} detector needs the model's pooled features")
    features = np.asarray(features, dtype=np.float64)
    if detector == "knn":
        # in the bank's float32: converting the whole bank to float64 on every request cost ~9 ms of CPU each
        similarity = (_normalised(features).astype(np.float32) @ arrays["bank"].T).astype(np.float64)
        k = knn_k(similarity.shape[1])
        kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
        return 1.0 - kth
    precision = np.asarray(arrays["precision"], dtype=np.float64)  # no copy when the gate already converted it
    means = np.asarray(arrays["means"], dtype=np.float64)
    projected = features @ precision
    distances = ((projected * features).sum(axis=1)[:, None] - 2 * projected @ means.T
                 + ((means @ precision) * means).sum(axis=1)[None, :])
    return distances.min(axis=1)


def _normalised(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def choose_threshold(val_scores: np.ndarray, keep: float = KEEP) -> float:
    """The smallest score at or below which at least ``keep`` of the validation scores lie."""
    val_scores = np.asarray(val_scores, dtype=np.float64)
    if not len(val_scores) or not np.isfinite(val_scores).all():
        raise GateError("cannot choose the gate's threshold: no validation images, or non-finite scores")
    return float(np.quantile(val_scores, keep, method="higher"))


def fit_gate(detector: str, train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
             val_logits: np.ndarray, checkpoint_sha256: str, keep: float = KEEP) -> OODGate:
    """Fit ``detector`` on the training features and choose its threshold on validation."""
    arrays = fit_detector(detector, train_features, train_labels)
    val_scores = detector_scores(detector, arrays, val_features, val_logits)
    threshold = choose_threshold(val_scores, keep)
    info = {"fitted_on": "train", "threshold_on": "validation", "keep": keep, "n_train": int(len(train_labels)),
            "n_validation": int(len(val_scores)), "validation_pass_rate": float((val_scores <= threshold).mean()),
            "feature_dim": int(np.asarray(train_features).shape[1]),
            "k": knn_k(len(train_features)) if detector == "knn" else None}
    return OODGate(detector, threshold, arrays, checkpoint_sha256, info)


# ---------------------------------------------------------------------------------------------------------------
# The gate file


def save_gate(gate: OODGate, run_dir: str | os.PathLike) -> Path:
    """Write RUN/ood_gate.npz atomically (no pickled objects: arrays and one JSON string)."""
    meta = {"format": GATE_FORMAT, "detector": gate.detector, "threshold": gate.threshold,
            "checkpoint_sha256": gate.checkpoint_sha256, "info": gate.info}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **gate.arrays)
    return atomic_write_bytes(Path(run_dir) / GATE_FILE, buffer.getvalue())


def load_gate(run_dir: str | os.PathLike, checkpoint_sha256: str | None = None) -> OODGate | None:
    """The run's gate, None when it has none; a GateError naming the file when it is damaged or belongs to another
    model (``checkpoint_sha256``: the run's best.pt)."""
    path = Path(run_dir) / GATE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as exc:  # truncated zip, pickled content, bad JSON: all mean the same to the user
        raise GateError(f"{display_name(path)}: not a readable gate file ({exc}); refit it with "
                        f"`melanoma fit-ood {display_name(Path(run_dir))}`") from exc
    gate = _checked(meta, arrays, path)
    if checkpoint_sha256 is not None and gate.checkpoint_sha256 != checkpoint_sha256:
        raise GateError(f"{display_name(path)} was fitted on another model than this run's checkpoint (SHA-256 "
                        f"differs); refit it with `melanoma fit-ood {display_name(Path(run_dir))}`")
    return gate


def _checked(meta, arrays: dict[str, np.ndarray], path: Path) -> OODGate:
    if not isinstance(meta, dict) or meta.get("format") != GATE_FORMAT:
        raise GateError(f"{display_name(path)}: not a melanoma gate file")
    detector, threshold = meta.get("detector"), meta.get("threshold")
    if detector not in DETECTORS:
        raise GateError(f"{display_name(path)}: unknown detector {detector!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise GateError(f"{display_name(path)}: threshold {threshold!r} is not a finite number; the file is damaged")
    wanted = _ARRAYS[detector]
    if set(arrays) != set(wanted) or any(a.ndim != 2 or not np.isfinite(a).all() for a in arrays.values()):
        raise GateError(f"{display_name(path)}: the {detector} arrays are missing or damaged")
    sizes: dict[str, int] = {}
    for name, dims in wanted.items():
        for dim, size in zip(dims, arrays[name].shape):
            if sizes.setdefault(dim, size) != size:
                raise GateError(f"{display_name(path)}: the {detector} arrays do not fit together")
    return OODGate(detector, float(threshold), arrays, str(meta.get("checkpoint_sha256", "")), meta.get("info") or {})


def load_gate_with_notice(run_dir: str | os.PathLike, checkpoint_sha256: str) -> OODGate | None:
    """:func:`load_gate`, with a one-line notice (a warning) when the run has no gate: it then predicts ungated."""
    import warnings

    gate = load_gate(run_dir, checkpoint_sha256)
    if gate is None:
        name = display_name(Path(run_dir))
        warnings.warn(f"{name} has no out-of-distribution gate ({GATE_FILE}); predicting without one "
                      f"(in_distribution empty). Fit it with `melanoma fit-ood {name}`", stacklevel=4)
    return gate
