"""Rendering consistency: the stress transforms (re-rendering, and the rotations, flip, brightness and contrast of
Young et al. 2021), each seeded per image, and how much a model's answer changes between two renderings of one
picture: the audit's cross-source copies, and each validation image against its stressed versions.

A lesion has no up or down, and its diagnosis does not depend on how the file was resized or saved, so for every
measure here the right answer is "no change": the share of images whose top class changes, the share whose melanoma
alert changes (at the run's own threshold) and the mean |change in p(melanoma)|. Young et al., "Stress testing reveals
gaps in clinic readiness of image-based diagnostic artificial intelligence models", npj Digital Medicine 4, 10
(2021), found published dermatologist-level CNNs changing their answer for 6.5-22 % of lesions under such stresses.

Scoring a run measures this on seeded subsets (``COPY_PAIRS`` copy pairs, ``STRESS_IMAGES`` validation images) so that
it costs seconds, not minutes; ``benchmarks/consistency.py`` measures any run folder, on all of them if asked.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from melanoma.audit.manifest import manifest_file, read_clean_manifest
from melanoma.audit.report import read_audit_json
from melanoma.data.images import build_cache
from melanoma.data.records import MELANOMA, ImageRecord

Predict = Callable[[np.ndarray], np.ndarray]  # N x H x W x 3 uint8 images -> N x classes probabilities

STRESS_NAMES = ("re-render", "rotate 90", "rotate 20", "flip horizontal", "brightness +20%", "contrast -20%")
STRESS_IMAGES = 150     # validation images stressed when a run is scored (a seeded subset)
COPY_PAIRS = 200        # cross-source copy pairs compared when a run is scored (a seeded subset)


# ---------------------------------------------------------------------------------------------------------------
# Stress transforms: uint8 H x W x 3 in, uint8 H x W x 3 of the same size out


def rerender(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another camera pipeline: a mild white-balance shift (channel gains within +-5 %) and gamma within +-10 %, then
    downscaled to 0.5-0.8 of the side, JPEG-encoded at quality 50-90 and scaled back up."""
    height, width = image.shape[:2]
    gains = 1 + rng.uniform(-0.05, 0.05, size=3)
    gamma = 1 + rng.uniform(-0.1, 0.1)
    scale = rng.uniform(0.5, 0.8)
    quality = int(rng.integers(50, 91))
    colour = np.clip((image / 255.0) ** gamma * (gains / gains.mean()) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    small = Image.fromarray(colour).resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                           Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation about the centre; multiples of 90 exactly, others on a mirror-padded image cropped back, so no
    black corners appear (a dermoscopy picture's own vignette stays where it was)."""
    if degrees % 90 == 0:
        return np.ascontiguousarray(np.rot90(image, k=int(degrees // 90) % 4))
    height, width = image.shape[:2]
    pad = (max(height, width) + 1) // 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    turned = np.asarray(Image.fromarray(padded).rotate(degrees, resample=Image.Resampling.BICUBIC), dtype=np.uint8)
    return np.ascontiguousarray(turned[pad:pad + height, pad:pad + width])


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(image * factor + 0.5, 0, 255).astype(np.uint8)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend towards the image's mean grey (torchvision's adjust_contrast): factor 0.8 is contrast -20 %."""
    grey = (image @ np.array([0.299, 0.587, 0.114])).mean()
    return np.clip(grey + factor * (image - grey) + 0.5, 0, 255).astype(np.uint8)


_STRESSES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "re-render": rerender,
    "rotate 90": lambda image, rng: rotate(image, 90),
    "rotate 20": lambda image, rng: rotate(image, 20),
    "flip horizontal": lambda image, rng: np.ascontiguousarray(image[:, ::-1]),
    "brightness +20%": lambda image, rng: brightness(image, 1.2),
    "contrast -20%": lambda image, rng: contrast(image, 0.8),
}


def stressed(images: np.ndarray, stress: str, seed: int = 0, indices: Sequence[int] | None = None) -> np.ndarray:
    """``images`` under one stress. Image i draws from its own generator (seed, stress, indices[i]), so the same
    seed gives the same pictures whatever the batch, order or subset."""
    if stress not in _STRESSES:
        raise ValueError(f"unknown stress '{stress}' (choose from: {', '.join(STRESS_NAMES)})")
    indices = range(len(images)) if indices is None else indices
    number = STRESS_NAMES.index(stress)
    return np.stack([_STRESSES[stress](image, np.random.default_rng([seed, number, int(i)]))
                     for image, i in zip(images, indices)]) if len(images) else images.copy()


# ---------------------------------------------------------------------------------------------------------------
# Agreement between two renderings


def agreement(first: np.ndarray, second: np.ndarray, classes: Sequence[str], threshold: float | None) -> dict:
    """How two sets of probabilities for the same pictures differ: the share whose top class changes, whose
    melanoma alert (p >= threshold) changes, and the mean |change in p(melanoma)| (mean signed change beside it)."""
    result = {"n": int(len(first)),
              "top_class_changed": float((first.argmax(1) != second.argmax(1)).mean()) if len(first) else None}
    if MELANOMA in classes and len(first):
        m = list(classes).index(MELANOMA)
        delta = second[:, m] - first[:, m]
        result["mean_abs_delta_melanoma"] = float(np.abs(delta).mean())
        result["mean_delta_melanoma"] = float(delta.mean())
        if threshold is not None:
            result["alert_changed"] = float(((first[:, m] >= threshold) != (second[:, m] >= threshold)).mean())
    return result


def seeded_subset(total: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` of ``total`` items, drawn with ``seed`` (all of them when limit is None)."""
    if limit is None or limit >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def stress_consistency(predict: Predict, images: np.ndarray, classes: Sequence[str], threshold: float | None,
                       seed: int = 0, limit: int | None = STRESS_IMAGES, stresses: Iterable[str] = STRESS_NAMES,
                       base: np.ndarray | None = None) -> dict:
    """Each stress against the unstressed images, on a seeded subset of at most ``limit`` of them. ``base``: the
    unstressed images' probabilities when already known (all of them, in order), to save predicting them again."""
    picked = seeded_subset(len(images), limit, seed)
    base = predict(images[picked]) if base is None else base[picked]
    return {"images": int(len(picked)), "of": int(len(images)), "seed": seed,
            "stresses": {name: agreement(base, predict(stressed(images[picked], name, seed, picked)), classes,
                                         threshold) for name in stresses}}


def copy_pairs(audit_dir: Path) -> list[dict]:
    """One pair per picture the audit found in more than one source: {"files": [a, b], "sources", "label"} with a
    from the first source (by name) and b from the next. From audit.json's duplicate groups, or, for an audit
    without them, files of one ISIC id in two sources of clean_manifest.csv. Empty if the audit is absent."""
    groups: list[dict] = []
    if (audit := read_audit_json(audit_dir)) is not None:
        groups = [g for g in audit.get("duplicate_groups", []) if len(set(g.get("sources", []))) > 1]
    elif manifest_file(audit_dir).is_file():
        groups = _same_id_groups(read_clean_manifest(audit_dir))
    pairs = []
    for group in groups:
        first = {}
        labels = group.get("labels") or [""] * len(group["files"])
        for file, source, label in sorted(zip(group["files"], group["sources"], labels),
                                          key=lambda t: (t[1], t[0])):
            first.setdefault(source, (file, label))
        (a, label), (b, _) = list(first.values())[:2]
        pairs.append({"files": [a, b], "sources": list(first)[:2], "label": label})
    return sorted(pairs, key=lambda p: p["files"])


def _same_id_groups(rows: list[dict]) -> list[dict]:
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("image_id", "").startswith("ISIC_"):
            by_id.setdefault(row["image_id"], []).append(row)
    return [{"files": [r["path"] for r in members], "sources": [r["source"] for r in members],
             "labels": [r.get("folder_label", "") for r in members]}
            for members in by_id.values() if len({r["source"] for r in members}) > 1]


def copy_consistency(predict: Predict, root: Path, pairs: list[dict], image_size: int, classes: Sequence[str],
                     threshold: float | None, trained: set[str] = frozenset(), seed: int = 0,
                     limit: int | None = COPY_PAIRS) -> dict:
    """The two files of each copy pair (paths relative to ``root``) decoded as evaluation decodes them and compared:
    over all pairs, over pairs neither of whose files was trained on, and per class (the first file's label)."""
    present = [pair for pair in pairs if all((Path(root) / file).is_file() for file in pair["files"])]
    picked = [present[i] for i in seeded_subset(len(present), limit, seed)]
    files = [file for pair in picked for file in pair["files"]]
    records = [ImageRecord(path=Path(root) / file, rel_path=file, label="") for file in files]
    cache = build_cache(records, size=image_size)
    readable = [i for i in range(len(picked)) if 2 * i not in cache.errors and 2 * i + 1 not in cache.errors]
    if not readable:
        return {"pairs": 0, "of": len(pairs), "note": "no readable copy pairs"}
    probs = predict(cache.images[[j for i in readable for j in (2 * i, 2 * i + 1)]])
    first, second = probs[0::2], probs[1::2]
    kept = [picked[i] for i in readable]
    unseen = np.array([not (set(p["files"]) & trained) for p in kept])
    labels = np.array([p["label"] for p in kept])
    sources = sorted({tuple(p["sources"]) for p in kept})
    return {"pairs": len(kept), "of": len(pairs), "seed": seed, "missing": len(pairs) - len(present),
            "unreadable": len(picked) - len(readable),
            "sources": [list(s) for s in sources], "delta_is": "second source minus first",
            "all": agreement(first, second, classes, threshold),
            "not_trained_on": agreement(first[unseen], second[unseen], classes, threshold),
            "by_class": {label: agreement(first[labels == label], second[labels == label], classes, threshold)
                         for label in sorted(set(labels.tolist()))}}


# ---------------------------------------------------------------------------------------------------------------
# Both, for a run


def measure_consistency(predict: Predict, *, classes: Sequence[str], threshold: float | None, image_size: int,
                        val_images: np.ndarray, root: Path | None, audit_dir: Path | None,
                        trained: set[str] = frozenset(), seed: int = 0, copy_limit: int | None = COPY_PAIRS,
                        stress_limit: int | None = STRESS_IMAGES, val_probs: np.ndarray | None = None) -> dict:
    """The ``consistency`` section of metrics.json: cross-source copies (where the audit found any) and stresses."""
    started, cpu = time.perf_counter(), time.process_time()
    result: dict = {"threshold": threshold}
    pairs = copy_pairs(audit_dir) if audit_dir is not None and root is not None else []
    if pairs:
        result["copies"] = copy_consistency(predict, root, pairs, image_size, classes, threshold, trained, seed,
                                            copy_limit)
    if len(val_images):
        result["stresses"] = stress_consistency(predict, val_images, classes, threshold, seed, stress_limit,
                                                base=val_probs)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["cpu_seconds"] = round(time.process_time() - cpu, 1)  # all threads of this process
    return result


def consistency_summary(result: dict) -> str:
    """One line: copy disagreement and the worst stress."""
    parts = []
    if copies := result.get("copies"):
        part = copies["all"]
        parts.append(f"cross-source copies (n={part['n']}): top class differs {part['top_class_changed']:.1%}, "
                     f"mean |dp(melanoma)| {part.get('mean_abs_delta_melanoma', float('nan')):.3f}")
    if stresses := result.get("stresses"):
        changes = {name: s.get("alert_changed", s["top_class_changed"]) for name, s in stresses["stresses"].items()}
        worst = max(changes, key=changes.get)
        parts.append(f"stresses (n={stresses['images']}): melanoma alert changes {min(changes.values()):.1%}-"
                     f"{changes[worst]:.1%} (worst: {worst})")
    return "consistency: " + ("; ".join(parts) or "nothing to measure")
