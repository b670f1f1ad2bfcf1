"""External validation: scoring a run on a labelled image set it was never trained, calibrated or thresholded on (a
folder with ``labels.csv`` and ``<class>/<image_id>.jpg``, e.g. ``../shared/data/external-dev``), overall and per
block of ISIC ids, with bootstrap intervals (:mod:`melanoma.assess.intervals`)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from melanoma.assess.intervals import auc_interval, bootstrap_ci
from melanoma.assess.metrics import compute_metrics
from melanoma.core.errors import DataError
from melanoma.core.text import display_name
from melanoma.data.images import build_cache
from melanoma.data.records import COLLECTIONS, IMAGE_SUFFIXES, MELANOMA, ImageRecord, id_block

LABELS_FILE = "labels.csv"
NEVUS = "nevus"


def read_external(folder: str | Path, classes: Sequence[str] | None = None) -> list[ImageRecord]:
    """The images of an external set, checked before any is decoded: labels.csv with image_id and class columns,
    one row per image, every class known to the model (when ``classes`` is given), every image file present."""
    folder = Path(folder)
    labels = folder / LABELS_FILE
    if not folder.is_dir():
        raise DataError(f"{display_name(folder)}: external validation folder not found")
    if not labels.is_file():
        raise DataError(f"{display_name(labels)}: not found; an external validation folder needs a labels.csv "
                        "with image_id and class columns")
    try:
        with open(labels, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{display_name(labels)}: not a readable CSV file ({exc})") from exc
    if "image_id" not in header or "class" not in header:
        raise DataError(f"{display_name(labels)}: needs image_id and class columns (found: "
                        f"{', '.join(h for h in header if h) or 'none'})")
    if not rows:
        raise DataError(f"{display_name(labels)}: no images listed")
    records, seen = [], set()
    for line, row in enumerate(rows, start=2):
        image_id, label = (row.get("image_id") or "").strip(), (row.get("class") or "").strip()
        if not image_id or not label:
            raise DataError(f"{display_name(labels)}, line {line}: empty image_id or class")
        if image_id in seen:
            raise DataError(f"{display_name(labels)}, line {line}: {image_id} is listed twice")
        if classes is not None and label not in classes:
            raise DataError(f"{display_name(labels)}, line {line}: class '{label}' is not one of the model's classes "
                            f"({', '.join(classes)})")
        seen.add(image_id)
        path = _image_file(folder, label, image_id)
        if path is None:
            raise DataError(f"{display_name(labels)}, line {line}: no image file for {image_id} (looked for "
                            f"{label}/{image_id}.jpg and {image_id}.jpg in {display_name(folder)})")
        records.append(ImageRecord(path=path, rel_path=str(path.relative_to(folder)), label=label, image_id=image_id,
                                   source=folder.name))
    return records


def _image_file(folder: Path, label: str, image_id: str) -> Path | None:
    for parent in (folder / label, folder):
        for suffix in sorted(IMAGE_SUFFIXES):
            for name in (image_id + suffix, image_id + suffix.upper()):
                if (parent / name).is_file():
                    return parent / name
    return None


def external_validation(folder: str | Path, predict: Callable[[np.ndarray], np.ndarray], classes: Sequence[str],
                        image_size: int, threshold: float | None, resamples: int = 1000, seed: int = 0) -> dict:
    """Melanoma AUC (95 % bootstrap interval), melanoma-vs-nevus AUC, and sensitivity/specificity at the run's own
    alert threshold, on an external set; ``predict`` maps uint8 images to the run's calibrated probabilities."""
    records = read_external(folder, classes)
    cache = build_cache(records, size=image_size)
    ok = cache.ok_indices
    labels = np.array([list(classes).index(records[i].label) for i in ok])
    probs = predict(cache.images[ok])
    metrics = compute_metrics(labels, probs, classes, threshold)
    result = {"folder": display_name(Path(folder).absolute()), "n": len(ok),
              "counts": {c: int((labels == i).sum()) for i, c in enumerate(classes) if (labels == i).any()},
              "unreadable": [cache.errors[i] for i in sorted(cache.errors)],
              "used_for": "reporting only: never trained, calibrated or thresholded on",
              "balanced_accuracy": metrics["balanced_accuracy"], "melanoma": metrics.get("melanoma")}
    if resamples:
        result["ci"] = bootstrap_ci(labels, probs, classes, threshold, resamples=resamples, seed=seed)
    if MELANOMA in classes:
        m = list(classes).index(MELANOMA)
        is_melanoma = labels == m
        blocks = np.array([id_block(records[i].image_id or records[i].rel_path) for i in ok])
        result["by_collection"] = {}
        for block in (block for block in COLLECTIONS if (blocks == block).any()):
            inside = blocks == block
            result["by_collection"][block] = {
                "n": int(inside.sum()), "melanomas": int(is_melanoma[inside].sum()),
                "melanoma_auc": auc_interval(labels[inside], is_melanoma[inside], probs[inside, m], resamples, seed)}
        # one interval for one number: the headline bootstrap's (the same resamples within each class), not drawn again
        result["melanoma_auc"] = auc_interval(labels, is_melanoma, probs[:, m], 0) \
            | {key: result["ci"]["melanoma_auc"][key] for key in ("low", "high") if resamples}
        result["median_p_melanoma"] = {"melanomas": _median(probs[is_melanoma, m]),
                                       "others": _median(probs[~is_melanoma, m])}
        if NEVUS in classes:
            pair = np.isin(labels, [m, list(classes).index(NEVUS)])
            result["melanoma_vs_nevus_auc"] = auc_interval(labels[pair], is_melanoma[pair], probs[pair, m], resamples,
                                                           seed)
    return result


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def external_summary(result: dict) -> str:
    """For the training log: one line, then one per collection block of ISIC ids."""
    def interval(part: dict | None) -> str:
        if not part or part.get("value") is None:
            return "n/a"
        return f"{part['value']:.3f}" + (f" [{part['low']:.3f}, {part['high']:.3f}]" if part.get("low") is not None
                                         else "")

    mel = result.get("melanoma") or {}
    alert = (f", sensitivity {mel['sensitivity']:.2f} / specificity {mel['specificity']:.2f} at the alert"
             if mel.get("sensitivity") is not None and mel.get("specificity") is not None else "")
    blocks = "".join(f"\n  external, ids {name} (n={part['n']}, {part['melanomas']} melanomas): melanoma AUC "
                     f"{interval(part['melanoma_auc'])}" for name, part in (result.get("by_collection") or {}).items())
    return (f"external validation ({result['folder']}, n={result['n']}, never trained on): melanoma AUC "
            f"{interval(result.get('melanoma_auc'))}, melanoma vs nevus {interval(result.get('melanoma_vs_nevus_auc'))}"
            + alert + blocks)
