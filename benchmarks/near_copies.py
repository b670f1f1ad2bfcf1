"""Near-copy search: the audit's two-stage method (melanoma.audit.nearcopy) beside the 256-bit pHash it replaced.

Both methods run on the same images in one run:

* synthetic copies: N course-Train images (seeded) under 17 transforms (resizes, 4:3 stretch and squash, crops of
  10-20 % centred, from one side and off-centre, colour shifts, JPEG q50/q75 and combinations), each compared with
  its original through the whole search (stage 1 must propose the pair, stage 2 must pass it);
* real pairs: all shared images (course Train + Test and isic-extra, 8,560) as one set, the way the audit sees them,
  sorted into the same ISIC id in two files (must be flagged), the same picture under two ids (checked by eye:
  VERIFIED_SAME_PICTURE; should be flagged), another photo of the same HAM10000 lesion (ideally not flagged; the audit
  groups those by lesion id anyway) and every other pair (different pictures: must not be flagged);
* turned copies (issue 23: flips, 90-degree turns, Augmentor's rotate-and-crop up to 10 degrees, combinations) of
  the same N images through ``nearcopy.near_copies``, with and without the turned search
  (melanoma.audit.nearcopy_views), and what the turned search flags among the real pairs beyond the box search;
* the margin (farthest real copy vs closest non-copy) and the wall and CPU time of each stage.

Old: pHash (hash_size 16, ImageHash; only in the dev extra, its columns are skipped without it), copies within 20
bits, as the audit did before. New: distance ``1 - min(structure, detail)`` after alignment, copies within
``nearcopy.THRESHOLD``. A check runs the audit's own entry point (melanoma.audit.copies) on the images of the
flagged cross-id pairs and expects the same pairs and distances.

    python benchmarks/near_copies.py [--synthetic 300] [--quick] [--workers 2] [--json FILE]

The full run takes about 100 CPU seconds (2.5-5.5 minutes on 2 cores shared with other jobs) and 2.6 GB of memory (the
all-pairs masks). ``--quick``: 60 synthetic images, and real pairs between course Train and isic-extra only
(two-set search, about 45 CPU seconds).
Timings are indicative when other jobs share the cores; the CPU seconds are the better guide.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from _common import HAM10000_METADATA, default_sources, print_table, write_results
from PIL import Image, ImageEnhance

from melanoma.audit import copies as fingerprints
from melanoma.audit import nearcopy, nearcopy_views
from melanoma.data.images import decode_image
from melanoma.data.sources import load_dataset
from melanoma.train.balance import augmentor_rotate

try:
    import imagehash
except ImportError:  # the dev extra: pip install -e '.[dev]'
    imagehash = None

OLD_BITS = 20   # the old audit's pHash threshold
SEED = 0
FAR = 2.0       # new distance of a pair that stage 1 does not propose (the largest possible)

# Pairs of DIFFERENT ids that are the same picture, checked by eye during the method's development: every pair that
# either method flagged, and the next closest ones, viewed side by side and aligned with a difference image at
# 300-420 px (evidence sheets made by that study's measurement script, not kept in this repository). Identical hairs,
# specks, bubbles, ruler marks and lesion outline; they differ in colour, crop, scan geometry or resolution.
VERIFIED_SAME_PICTURE = (
    # course Train x isic-extra: 4 near pixel-identical, 1 HAM10000 photo under two lesion ids, 11 ISIC 2016 images
    # and their re-digitised ISIC 2017 twins (ISIC_0014xxx/0015xxx)
    ("ISIC_0000280", "ISIC_0000279"), ("ISIC_0010302", "ISIC_0000520"), ("ISIC_0010990", "ISIC_0000521"),
    ("ISIC_0000512", "ISIC_0000477"), ("ISIC_0000174", "ISIC_0015071"), ("ISIC_0000165", "ISIC_0014788"),
    ("ISIC_0025387", "ISIC_0029880"), ("ISIC_0000168", "ISIC_0015190"), ("ISIC_0000224", "ISIC_0014791"),
    ("ISIC_0000226", "ISIC_0014949"), ("ISIC_0000229", "ISIC_0014771"), ("ISIC_0000230", "ISIC_0014763"),
    ("ISIC_0000227", "ISIC_0015034"), ("ISIC_0000223", "ISIC_0014818"), ("ISIC_0000220", "ISIC_0015202"),
    ("ISIC_0000157", "ISIC_0014946"),
    # within the course set
    ("ISIC_0000399", "ISIC_0001124"),
    # within isic-extra: ISIC 2016 images and their 2017 re-digitised twins
    ("ISIC_0000215", "ISIC_0015313"), ("ISIC_0000177", "ISIC_0014657"), ("ISIC_0000206", "ISIC_0014739"),
    ("ISIC_0000209", "ISIC_0015016"), ("ISIC_0000204", "ISIC_0014748"), ("ISIC_0000184", "ISIC_0015310"),
    ("ISIC_0000186", "ISIC_0014698"), ("ISIC_0000205", "ISIC_0014742"), ("ISIC_0000179", "ISIC_0014765"),
    ("ISIC_0000217", "ISIC_0014973"), ("ISIC_0000185", "ISIC_0015155"), ("ISIC_0000218", "ISIC_0015241"),
    ("ISIC_0000182", "ISIC_0015395"), ("ISIC_0000198", "ISIC_0014667"),
)
# Different-picture pairs near the threshold, reviewed the same way. They stay "different pictures" in the counts;
# a flagged one not noted here as one lesion is reported as a different lesion flagged (which must not happen).
ONE_LESION = "other photo of one lesion"
REVIEWED = {
    ("ISIC_0001137", "ISIC_0010808"): ONE_LESION + " (hairs differ); course Train vs course Test",
    ("ISIC_0011750", "ISIC_0011751"): ONE_LESION + " (bubbles and hairs differ)",
    ("ISIC_0032740", "ISIC_0034283"): ONE_LESION + ", photographed twice; HAM10000 gives two lesion ids",
    ("ISIC_0027820", "ISIC_0030835"): ONE_LESION + ", photographed twice; HAM10000 gives two lesion ids",
    ("ISIC_0001127", "ISIC_0010550"): ONE_LESION + " (focus and colour differ)",
    ("ISIC_0010393", "ISIC_0001148"): ONE_LESION + " (specular dots and vessels differ)",
    ("ISIC_0000423", "ISIC_0010571"): ONE_LESION + " (surface dots differ)",
    ("ISIC_0001141", "ISIC_0010054"): ONE_LESION + " (hairs differ)",
    ("ISIC_0000433", "ISIC_0009896"): ONE_LESION + " (a hair in one only)",
    ("ISIC_0011126", "ISIC_0001131"): "one lesion, hairs match but not the geometry: maybe a distorted re-scan",
    ("ISIC_0000314", "ISIC_0000367"): "different lesions sharing one dermoscope field (circle and bar)",
    ("ISIC_0015102", "ISIC_0015353"): ONE_LESION + ", mirrored left-right (outline and notches match, colour "
                                                   "differs); found by the turned search",
}
REVIEWED = {frozenset(pair): note for pair, note in REVIEWED.items()}


# ------------------------------------------------------------------------------------------ synthetic copies
def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((w, h), Image.LANCZOS))


def _crop(a: np.ndarray, left: float, top: float, right: float, bottom: float) -> np.ndarray:
    """Remove these fractions of the width / height from each edge."""
    h, w = a.shape[:2]
    return a[round(top * h):h - round(bottom * h), round(left * w):w - round(right * w)]


def _jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"))


def _colour(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness 0.75-1.25, contrast 0.75-1.3, saturation 0.7-1.3, hue +-11-28 degrees, per-channel gains +-15 %,
    gamma 0.8-1.25."""
    image = ImageEnhance.Brightness(Image.fromarray(a)).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.3))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.choice([-1, 1]) * rng.uniform(8, 20))) % 256
    x = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB")).astype(np.float32) / 255.0
    x = x * rng.uniform(0.85, 1.15, size=3)[None, None, :]
    x = np.clip(x, 0, 1) ** rng.uniform(0.8, 1.25)
    return (x * 255 + 0.5).astype(np.uint8)


def _side_crop(a: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    edges = [0.0, 0.0, 0.0, 0.0]
    edges[rng.integers(4)] = fraction
    return _crop(a, *edges)


def _offcentre_crop(a: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Keep a (1-f) x (1-f) window at least 75 % of the way to one edge on both axes."""
    left = fraction * rng.choice([rng.uniform(0, 0.25), rng.uniform(0.75, 1)])
    top = fraction * rng.choice([rng.uniform(0, 0.25), rng.uniform(0.75, 1)])
    return _crop(a, left, top, fraction - left, fraction - top)


def _random_crop(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """10-20 % of each dimension at a random position, or from one side only (half the time)."""
    if rng.random() < 0.5:
        return _side_crop(a, rng.uniform(0.1, 0.2), rng)
    fx, fy = rng.uniform(0.1, 0.2, size=2)
    left, top = fx * rng.random(), fy * rng.random()
    return _crop(a, left, top, fx - left, fy - top)


def _to_43(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    return _resize(a, round(h * 4 / 3), h) if w <= h else _resize(a, w, round(w * 3 / 4))


TRANSFORMS = {  # name: f(rgb, rng); the order fixes each copy's seed
    "resize 180->120": lambda a, r: _resize(a, 120, 120),
    "resize up 180->300": lambda a, r: _resize(a, 300, 300),
    "stretch to 4:3": lambda a, r: _to_43(a),
    "4:3 crop (12.5 % top+bottom), squash to square": lambda a, r: _resize(_crop(a, 0, .125, 0, .125), 180, 180),
    "crop 10 % centred": lambda a, r: _crop(a, .05, .05, .05, .05),
    "crop 20 % centred": lambda a, r: _crop(a, .1, .1, .1, .1),
    "crop 10 % one side": lambda a, r: _side_crop(a, 0.10, r),
    "crop 20 % one side": lambda a, r: _side_crop(a, 0.20, r),
    "crop 15 % off-centre (both axes)": lambda a, r: _offcentre_crop(a, 0.15, r),
    "crop 20 % off-centre (both axes)": lambda a, r: _offcentre_crop(a, 0.20, r),
    "colour shift": _colour,
    "JPEG q50": lambda a, r: _jpeg(a, 50),
    "JPEG q75": lambda a, r: _jpeg(a, 75),
    "random crop 10-20 % + squash": lambda a, r: _resize(_random_crop(a, r), 180, 180),
    "crop + 4:3 + colour + JPEG q50-95":
        lambda a, r: _jpeg(_colour(_to_43(_random_crop(a, r)), r), int(r.integers(50, 96))),
    "crop + squash + colour + JPEG q50": lambda a, r: _jpeg(_colour(_resize(_random_crop(a, r), 180, 180), r), 50),
    "4:3 + crop 20 % one side + colour + JPEG q60": lambda a, r: _jpeg(_colour(_side_crop(_to_43(a), 0.20, r), r), 60),
}



def _rotate_crop(a: np.ndarray, angle: float) -> np.ndarray:
    """Augmentor's rotate at a given angle (as balance.augmentor_rotate): rotate, crop the largest inner rectangle,
    resize back."""
    h, w = a.shape[:2]
    rotated = Image.fromarray(a).rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    scale = 1.0 / (np.cos(np.deg2rad(abs(angle))) + np.sin(np.deg2rad(abs(angle))) * max(w, h) / min(w, h))
    left, top = (rotated.width - w * scale) / 2, (rotated.height - h * scale) / 2
    box = tuple(int(round(v)) for v in (left, top, left + w * scale, top + h * scale))
    return np.asarray(rotated.crop(box).resize((w, h), Image.Resampling.BICUBIC))


def _augmentor(a: np.ndarray, r: np.random.Generator, low: float = 0.0) -> np.ndarray:
    """Augmentor's rotate: balance.augmentor_rotate itself (uniform -10..10 degrees), or low..10 degrees either way."""
    if not low:
        return augmentor_rotate(np.ascontiguousarray(a), r, max_degrees=10.0, probability=1.0)
    return _rotate_crop(np.ascontiguousarray(a), r.uniform(low, 10.0) * r.choice([-1, 1]))


TURNED = {  # copies the box search cannot see (issue 23 item 10): the course notebooks' Augmentor copies
    "flip left-right": lambda a, r: a[:, ::-1],
    "flip top-bottom": lambda a, r: a[::-1],
    "turn 90": lambda a, r: np.rot90(a),
    "turn 180": lambda a, r: np.rot90(a, 2),
    "turn 270": lambda a, r: np.rot90(a, 3),
    "transpose": lambda a, r: a.transpose(1, 0, 2),
    "Augmentor rotate 0-10 deg either way, cropped": lambda a, r: _augmentor(a, r),
    "Augmentor rotate 5-10 deg either way, cropped": lambda a, r: _augmentor(a, r, 5.0),
    "flip + Augmentor rotate 0-10 deg": lambda a, r: _augmentor(a[:, ::-1], r),
    "turn 90 + Augmentor rotate 0-10 deg + JPEG q75": lambda a, r: _jpeg(_augmentor(np.rot90(a), r), 75),
    "flip + colour shift + JPEG q75": lambda a, r: _jpeg(_colour(np.ascontiguousarray(a[:, ::-1]), r), 75),
}

# ----------------------------------------------------------------------------------------------------- helpers
@contextmanager
def timed(timings: dict, name: str):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    timings[name] = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}


def phashes(arrays) -> np.ndarray:
    """The old audit's fingerprint: 256-bit pHash (hash_size=16) packed as 4 x uint64."""
    return np.stack([np.packbits(imagehash.phash(Image.fromarray(a), hash_size=16).hash.flatten()).view(np.uint64)
                     for a in arrays])


def hamming(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(len(a), len(b)) uint16 pHash distances: the old all-pairs comparison, without its threshold."""
    out = np.empty((len(a), len(b)), np.uint16)
    for start in range(0, len(a), chunk):
        out[start:start + chunk] = np.bitwise_count(a[start:start + chunk, None, :] ^ b[None, :, :]).sum(2)
    return out


def load_images(quick: bool, workers: int, timings: dict) -> dict:
    """Course Train (sorted by path), course Test (not with --quick), then isic-extra in manifest order, decoded."""
    index = load_dataset(default_sources())
    course = index.sources[0]["name"]
    with open(HAM10000_METADATA, newline="") as handle:
        ham = {row["image_id"]: row["lesion_id"] for row in csv.DictReader(handle)}
    by_path = sorted((r for r in index.records if r.source == course), key=lambda r: r.rel_path)
    parts = {"train": [r for r in by_path if r.is_train], "test": [] if quick else [r for r in by_path if r.is_test],
             "extra": [r for r in index.records if r.source != course]}
    records = [r for part in parts.values() for r in part]
    with timed(timings, "decode all images (both methods)"), ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(lambda r: decode_image(r.path).pixels, records))
    return {"records": records, "arrays": arrays, "ids": np.array([r.image_id for r in records]),
            "kinds": np.array([kind for kind, part in parts.items() for _ in part]),
            "lesions": np.array([r.lesion_id or ham.get(r.image_id, "") for r in records])}


# ------------------------------------------------------------------------------------------------ measurements
def synthetic_recall(data: dict, count: int, prints, old, workers: int) -> tuple[list[dict], dict]:
    """Each transform of each sampled Train image against its original, through stage 1 (two-set search of copies
    against originals; the copy must be proposed with its own original) and stage 2."""
    sources = np.random.default_rng(SEED).choice(np.flatnonzero(data["kinds"] == "train"), count, replace=False)
    originals = prints[sources]
    rows, new_all, old_all = [], [], []
    for t_index, (name, transform) in enumerate(TRANSFORMS.items()):
        copies = [transform(data["arrays"][k], np.random.default_rng(SEED * 1000 + t_index * count + m))
                  for m, k in enumerate(sources)]
        copied = nearcopy.fingerprint_many(copies, workers=workers)
        cand = nearcopy.candidate_pairs(copied, originals, workers=workers)
        cand = cand.take(cand.i == cand.j)
        structure, detail, _ = nearcopy.verify(copied, originals, cand, workers=workers)
        new = np.full(count, FAR)
        new[cand.i] = nearcopy.distance(structure, detail)
        row = {"transform": name, "copies": count, "new stage-1 recall": len(cand.i) / count,
               "new recall": float(np.mean(new <= nearcopy.THRESHOLD)),
               "new p95": float(np.percentile(new, 95)), "new max": float(new.max())}
        if old is not None:
            bits = np.bitwise_count(phashes(copies) ^ old[sources]).sum(1)
            row |= {"old recall": float(np.mean(bits <= OLD_BITS)), "old bits p95": float(np.percentile(bits, 95)),
                    "old bits max": int(bits.max())}
            old_all.append(bits)
        rows.append(row)
        new_all.append(new)
    overall = {"copies": count * len(TRANSFORMS), "new_recall": float(np.mean(np.concatenate(new_all)
                                                                           <= nearcopy.THRESHOLD))}
    if old is not None:
        overall["old_recall"] = float(np.mean(np.concatenate(old_all) <= OLD_BITS))
    return rows, overall


def turned_recall(data: dict, count: int, prints, workers: int) -> tuple[list[dict], dict]:
    """Each TURNED transform of each sampled Train image against its original, through nearcopy.near_copies (two
    sets, copies x originals): without the turned search (the box search alone) and with it."""
    sources = np.random.default_rng(SEED).choice(np.flatnonzero(data["kinds"] == "train"), count, replace=False)
    originals = prints[sources]
    rows, found_all = [], []
    for t_index, (name, transform) in enumerate(TURNED.items()):
        copies = [np.ascontiguousarray(transform(data["arrays"][k], np.random.default_rng(SEED * 1000 + 77 + t_index
                                                                                         * count + m)))
                  for m, k in enumerate(sources)]
        copied = nearcopy.fingerprint_many(copies, workers=workers)
        row = {"transform": name, "copies": count}
        for label, turned in (("box search only", False), ("with turned search", True)):
            found = {i: d for i, j, d in nearcopy.near_copies(copied, originals, workers=workers, turned=turned)
                     if i == j}
            row[f"recall, {label}"] = len(found) / count
            if turned:
                d = np.array([found.get(m, FAR) for m in range(count)])
                row |= {"p95": float(np.percentile(d, 95)), "max": float(d.max())}
                found_all.append(len(found))
        rows.append(row)
    return rows, {"copies": count * len(TURNED), "recall": sum(found_all) / (count * len(TURNED))}


def _category(data: dict, a: int, b: int) -> str:
    ids, lesions = data["ids"], data["lesions"]
    if ids[a] == ids[b]:
        return "same id"
    if frozenset((ids[a], ids[b])) in {frozenset(p) for p in VERIFIED_SAME_PICTURE}:
        return "same picture, other id (verified)"
    if lesions[a] and lesions[a] == lesions[b]:
        return "same lesion, other photo"
    return "different pictures"


def real_turned(data: dict, prints, real: dict, workers: int, timings: dict) -> dict:
    """The turned search over all images as one set (or course Train x isic-extra with --quick): pairs it flags
    that the box search did not, by category."""
    if real["two_sets"]:
        rows, cols = np.flatnonzero(data["kinds"] == "train"), np.flatnonzero(data["kinds"] == "extra")
        with timed(timings, "new: turned search (views, stage 1, stage 2), course Train x isic-extra"):
            turned = nearcopy.turned_pairs(prints[rows], prints[cols], {}, workers)
        turned = {_key(rows[i], cols[j]): d for (i, j), d in turned.items()}
    else:
        with timed(timings, "new: turned search (views, stage 1, stage 2), all images as one set"):
            turned = nearcopy.turned_pairs(prints, None, {}, workers)
    flagged = {pair: d for pair, d in turned.items() if d <= nearcopy.THRESHOLD}
    added = {pair: d for pair, d in flagged.items() if pair not in real["_new_flagged"]}
    counts: dict = defaultdict(lambda: {"verified": 0, "flagged": 0, "added to the box search": 0})
    for pair, d in turned.items():
        c = counts[_category(data, *pair)]
        c["verified"] += 1
        c["flagged"] += int(d <= nearcopy.THRESHOLD)
        c["added to the box search"] += int(pair in added)
    listed = [_describe(data, a, b, d, None) | {"category": _category(data, a, b)} for (a, b), d in added.items()]
    return {"_added": added, "candidates_verified": len(turned),
            "by_category": [{"category": k} | v for k, v in counts.items()],
            "added_pairs": sorted(listed, key=lambda r: r["new_distance"])}


def pair_masks(data: dict, rows: np.ndarray, cols: np.ndarray, one_set: bool) -> tuple[dict, dict]:
    """Boolean (rows x cols) masks: the pair categories, and the scopes (Train x extra; all pairs, i < j)."""
    _, id_code = np.unique(data["ids"], return_inverse=True)
    _, lesion_code = np.unique(data["lesions"], return_inverse=True)
    has_lesion = data["lesions"] != ""
    scope = np.triu(np.ones((len(rows), len(cols)), bool), 1) if one_set else np.ones((len(rows), len(cols)), bool)
    same_id = (id_code[rows][:, None] == id_code[cols][None, :]) & scope
    verified = np.zeros_like(same_id)
    row_at, col_at = defaultdict(list), defaultdict(list)
    for position, image_id in enumerate(data["ids"][rows]):
        row_at[image_id].append(position)
    for position, image_id in enumerate(data["ids"][cols]):
        col_at[image_id].append(position)
    for a, b in VERIFIED_SAME_PICTURE:
        for x, y in ((a, b), (b, a)):
            for r in row_at[x]:
                verified[r, col_at[y]] = True
    verified &= scope
    same_lesion = ((lesion_code[rows][:, None] == lesion_code[cols][None, :]) & has_lesion[rows][:, None]
                   & scope & ~same_id & ~verified)
    train, extra = data["kinds"] == "train", data["kinds"] == "extra"
    cross = ((train[rows][:, None] & extra[cols][None, :]) | (extra[rows][:, None] & train[cols][None, :])) & scope
    categories = {"same id": same_id, "same picture, other id (verified)": verified,
                  "same lesion, other photo": same_lesion,
                  "different pictures": scope & ~same_id & ~same_lesion & ~verified}
    return categories, {"Train x extra": cross} | ({} if not one_set else {"all pairs": scope})


def real_pairs(data: dict, prints, old, quick: bool, workers: int, timings: dict) -> dict:
    n = len(data["ids"])
    if quick:
        rows, cols = np.flatnonzero(data["kinds"] == "train"), np.flatnonzero(data["kinds"] == "extra")
        a, b, what = prints[rows], prints[cols], f"course Train x isic-extra ({len(rows) * len(cols):,} pairs)"
    else:
        rows = cols = np.arange(n)
        a = b = prints
        what = f"all {n:,} images as one set ({n * (n - 1) // 2:,} pairs)"
    with timed(timings, f"new: stage 1, box hashes, {what}"):
        cand = nearcopy.candidate_pairs(a, None if b is a else b, workers=workers)
    with timed(timings, f"new: stage 2, align + verify {len(cand.i):,} candidates"):
        structure, detail, _ = nearcopy.verify(a, b, cand, workers=workers)
    dist = nearcopy.distance(structure, detail)
    old_d = None
    if old is not None:
        with timed(timings, f"old: pHash distances, {what}"):
            old_d = hamming(old[rows], old[cols])
    categories, scopes = pair_masks(data, rows, cols, one_set=not quick)
    table, closest = [], {}
    for scope_name, scope in scopes.items():
        for name, category in categories.items():
            mask = category & scope
            in_cat = mask[cand.i, cand.j]
            d = dist[in_cat]
            pairs = int(mask.sum())
            row = {"category": name, "scope": scope_name, "pairs": pairs, "new stage-1 candidates": len(d),
                   "new flagged": int((d <= nearcopy.THRESHOLD).sum()),
                   "new min": float(d.min()) if len(d) else (FAR if pairs else None),
                   "new max": float(d.max()) if len(d) == pairs and pairs else (FAR if pairs else None)}
            if old_d is not None:
                bits = old_d[mask]
                row |= {"old flagged": int((bits <= OLD_BITS).sum()), "old min": int(bits.min()) if pairs else None,
                        "old max": int(bits.max()) if pairs else None}
            table.append(row)
            if name == "different pictures":
                closest[scope_name] = _closest(data, rows, cols, cand, dist, in_cat, old_d, mask)
    flagged = _listed_pairs(data, rows, cols, cand, dist, old_d, categories, scopes)
    return {"pairs_searched": what, "two_sets": quick, "stage1_candidates": len(cand.i), "categories": table,
            "closest_different": closest, "listed_pairs": flagged,
            "_new_flagged": {_key(rows[i], cols[j]): float(dist[k]) for k, (i, j) in enumerate(zip(cand.i, cand.j))
                             if dist[k] <= nearcopy.THRESHOLD}}


def _key(a, b) -> tuple[int, int]:
    return (int(min(a, b)), int(max(a, b)))


def _describe(data: dict, a: int, b: int, new: float, bits) -> dict:
    ids = data["ids"]
    return {"a": data["records"][a].rel_path, "b": data["records"][b].rel_path, "new_distance": round(new, 4),
            "old_bits": None if bits is None else int(bits),
            "note": REVIEWED.get(frozenset((ids[a], ids[b])), "")}


def _closest(data, rows, cols, cand, dist, in_cat, old_d, mask) -> dict:
    """The closest different-picture pair by each method."""
    out = {}
    if in_cat.any():
        k = np.flatnonzero(in_cat)[np.argmin(dist[in_cat])]
        i, j = cand.i[k], cand.j[k]
        out["new"] = _describe(data, rows[i], cols[j], float(dist[k]), None if old_d is None else old_d[i, j])
    if old_d is not None:
        i, j = np.unravel_index(np.argmin(np.where(mask, old_d, np.iinfo(np.uint16).max)), old_d.shape)
        match = np.flatnonzero((cand.i == i) & (cand.j == j))
        out["old"] = _describe(data, rows[i], cols[j], float(dist[match[0]]) if len(match) else FAR, old_d[i, j])
    return out


def _listed_pairs(data, rows, cols, cand, dist, old_d, categories, scopes) -> list[dict]:
    """Every verified cross-id pair, and every different-picture pair that either method flags."""
    verified, different = categories["same picture, other id (verified)"], categories["different pictures"]
    picked = {(int(i), int(j)) for i, j in zip(*np.nonzero(verified))}
    new_at = {(int(i), int(j)): float(dist[k]) for k, (i, j) in enumerate(zip(cand.i, cand.j))}
    picked |= {pair for pair, d in new_at.items() if d <= nearcopy.THRESHOLD and different[pair]}
    if old_d is not None:
        picked |= {(int(i), int(j)) for i, j in zip(*np.nonzero((old_d <= OLD_BITS) & different))}
    out = []
    for i, j in picked:
        row = _describe(data, rows[i], cols[j], new_at.get((i, j), FAR), None if old_d is None else old_d[i, j])
        row |= {"category": "verified same picture" if verified[i, j] else "different pictures",
                "train_x_extra": bool(scopes["Train x extra"][i, j]),
                "flag_new": row["new_distance"] <= nearcopy.THRESHOLD,
                "flag_old": None if old_d is None else row["old_bits"] <= OLD_BITS}
        out.append(row)
    return sorted(out, key=lambda r: (not r["train_x_extra"], r["category"], r["new_distance"]))


def audit_path_check(data: dict, real: dict, workers: int) -> dict:
    """Run the audit's entry point (fingerprints.fingerprint + near_copy_pairs) on the images of the listed pairs:
    it must flag the same pairs at the same distances as the staged calls above (among pairs those searched)."""
    by_path = {r.rel_path: k for k, r in enumerate(data["records"])}
    images = sorted({by_path[p[end]] for p in real["listed_pairs"] for end in ("a", "b")})
    prints = [fingerprints.fingerprint(data["records"][k]) for k in images]
    found = {_key(images[a], images[b]): d for a, b, d in fingerprints.near_copy_pairs(prints, workers=workers)}
    if real["two_sets"]:  # only course Train x isic-extra was searched
        found = {pair: d for pair, d in found.items() if {data["kinds"][k] for k in pair} == {"train", "extra"}}
    inside = set(images)
    expected = {pair: d for pair, d in real["_new_flagged"].items() if pair[0] in inside and pair[1] in inside}
    worst = max((abs(found[p] - expected[p]) for p in found.keys() & expected.keys()), default=0.0)
    return {"images": len(images), "pairs_flagged": len(found), "same_pairs": found.keys() == expected.keys(),
            "max_distance_difference": float(worst)}


# ---------------------------------------------------------------------------------------------------- output
def margins(real: dict) -> list[dict]:
    rows = {(r["category"], r["scope"]): r for r in real["categories"]}
    scope = "all pairs" if ("same id", "all pairs") in rows else "Train x extra"
    out = []
    for method, unit, far, near in (("old", "bits", "old max", "old min"), ("new", "distance", "new max", "new min")):
        if far not in rows[("same id", scope)]:
            continue
        copies = [rows[(c, scope)][far] for c in ("same id", "same picture, other id (verified)")]
        row = {"method": f"{method} ({unit}, flagged <= {OLD_BITS if method == 'old' else nearcopy.THRESHOLD})",
               "farthest same-id copy": copies[0], "farthest verified cross-id copy": copies[1],
               "closest other photo of a lesion": rows[("same lesion, other photo", scope)][near]}
        for name in real["closest_different"]:
            row[f"closest different picture, {name}"] = rows[("different pictures", name)][near]
            row[f"margin, {name}"] = row[f"closest different picture, {name}"] - max(copies)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=None, help="course-Train images to copy (default 300, "
                        "60 with --quick)")
    parser.add_argument("--quick", action="store_true", help="60 synthetic images, real pairs course Train x "
                        "isic-extra only")
    parser.add_argument("--workers", type=int, default=2, help="threads for each stage (default 2)")
    parser.add_argument("--json")
    args = parser.parse_args()
    count = args.synthetic or (60 if args.quick else 300)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    if imagehash is None:
        print("ImageHash is not installed (it is in the dev extra: pip install -e '.[dev]'): old pHash columns "
              "skipped")
    timings: dict = {}
    data = load_images(args.quick, args.workers, timings)
    print(f"{len(data['ids'])} images: " + ", ".join(f"{k} {int((data['kinds'] == k).sum())}"
                                                      for k in ("train", "test", "extra")))
    with timed(timings, "new: fingerprints (64x64 bases + box hashes)"):
        prints = nearcopy.fingerprint_many(data["arrays"], workers=args.workers)
    old = None
    if imagehash is not None:
        with timed(timings, "old: fingerprints (pHash)"):
            old = phashes(data["arrays"])
    real = real_pairs(data, prints, old, args.quick, args.workers, timings)
    for method in ("new", "old"):
        steps = [v for k, v in timings.items() if k.startswith(method + ":")]
        if steps:
            timings[f"{method}: total"] = {u: round(sum(v[u] for v in steps), 2) for u in ("wall_s", "cpu_s")}
    with timed(timings, f"synthetic copies, {count} images x {len(TRANSFORMS)} transforms (both methods)"):
        synthetic, overall = synthetic_recall(data, count, prints, old, args.workers)
    with timed(timings, f"turned copies, {count} images x {len(TURNED)} transforms"):
        turned_rows, turned_overall = turned_recall(data, count, prints, args.workers)
    turned_real = real_turned(data, prints, real, args.workers, timings)
    real["_new_flagged"] |= turned_real.pop("_added")   # what the audit's entry point (box + turned search) flags
    check = audit_path_check(data, real, args.workers)
    load_after = os.getloadavg()[0]

    print(f"\nSynthetic copies of {count} course-Train images (new: flagged <= {nearcopy.THRESHOLD}"
          + (f"; old: pHash <= {OLD_BITS} bits)" if old is not None else ")"))
    columns = ["transform", "old recall", "new stage-1 recall", "new recall", "old bits p95", "old bits max",
               "new p95", "new max"]
    print_table(synthetic + [{"transform": f"all {overall['copies']:,}", "old recall": overall.get("old_recall"),
                              "new recall": overall["new_recall"]}], [c for c in columns if old is not None
                                                                      or not c.startswith("old")])
    print(f"\nTurned copies of {count} course-Train images through nearcopy.near_copies (flagged <= "
          f"{nearcopy.THRESHOLD}), box search alone and with the turned search (nearcopy_views)")
    columns = ["transform", "recall, box search only", "recall, with turned search", "p95", "max"]
    print_table(turned_rows + [{"transform": f"all {turned_overall['copies']:,}",
                                "recall, with turned search": turned_overall["recall"]}], columns)
    print(f"\nTurned search on real pairs ({real['pairs_searched']}): {turned_real['candidates_verified']:,} "
          "candidates verified")
    print_table(turned_real["by_category"], ["category", "verified", "flagged", "added to the box search"])
    if turned_real["added_pairs"]:
        print_table(turned_real["added_pairs"], ["a", "b", "category", "new_distance", "note"])
    print(f"\nReal pairs: {real['pairs_searched']}; new stage 1 proposes {real['stage1_candidates']:,}")
    columns = ["category", "scope", "pairs", "old flagged", "new flagged", "old min", "old max", "new min", "new max"]
    print_table(real["categories"], [c for c in columns if old is not None or not c.startswith("old")])
    flagged_different = [p for p in real["listed_pairs"] if p["category"] == "different pictures" and p["flag_new"]]
    different_lesions = [p for p in flagged_different if not p["note"].startswith(ONE_LESION)]
    print(f"different-picture pairs flagged by the new method: {len(flagged_different)}; different lesions among "
          f"them: {len(different_lesions)} (the others were reviewed by eye as {ONE_LESION} without a shared "
          "lesion id)" + ("  <-- WARNING: must be 0" if different_lesions else ""))
    print("\nMargin: farthest real copy vs closest non-copy (a negative margin means copies and other pictures "
          "overlap)")
    margin = margins(real)
    print_table(margin, list(margin[-1]))
    shown = [p for p in real["listed_pairs"] if p["train_x_extra"] or p["category"] == "different pictures"]
    print(f"\nSame picture under two ids (course Train x isic-extra), and different pictures flagged by either method "
          f"(new distance 2.0: stage 1 did not propose the pair; all {len(real['listed_pairs'])} in the JSON)")
    print_table(shown, ["a", "b", "category", "new_distance", "old_bits", "flag_new", "flag_old", "note"])
    print("\nTiming (s)")
    print_table([{"step": step} | value for step, value in timings.items()], ["step", "wall_s", "cpu_s"])
    note = (f"Timings are indicative: the {os.cpu_count()} cores were shared with other jobs (load average "
            f"{load_before:.1f} at the start, {load_after:.1f} at the end); the CPU seconds are the better guide.")
    print(note)
    print(f"audit entry point (melanoma.audit.copies) on the {check['images']} images of those pairs: "
          f"{'same pairs' if check['same_pairs'] else 'DIFFERENT PAIRS'}, distances within "
          f"{check['max_distance_difference']:.1e}")
    del real["_new_flagged"]
    write_results("near_copies", {
        "date": time.strftime("%Y-%m-%d"),
        "config": {"quick": args.quick, "turned_views": len(nearcopy_views.VIEWS), "turned_angles":
                   list(nearcopy_views.ANGLES), "synthetic_images": count, "seed": SEED, "workers": args.workers,
                   "new_threshold": nearcopy.THRESHOLD, "new_candidate_score": nearcopy.CANDIDATE_SCORE,
                   "new_prefilter_bits": nearcopy.PREFILTER_BITS, "old_bits": OLD_BITS if old is not None else None,
                   "images": {k: int((data["kinds"] == k).sum()) for k in ("train", "test", "extra")}},
        "synthetic": synthetic, "synthetic_overall": overall, "turned": turned_rows, "turned_overall": turned_overall,
        "turned_real_pairs": turned_real, "real_pairs": real, "margin": margin,
        "audit_entry_point_check": check, "timing": timings, "note": note,
        "total_runtime_s": round(time.perf_counter() - started, 1)}, args.json)


if __name__ == "__main__":
    main()
