"""Dataset audit: counts, exact and near duplicates, label conflicts, Train/Test leakage, official-truth disagreements
and unreadable images, written as ``audit.json`` (the machine-readable contract), ``audit.md``, plots and
``clean_manifest.csv`` (one recommended action per image, used by training).

Near-duplicates use a 256-bit perceptual hash (pHash, ``hash_size=16``). On the shared ISIC 9-class data the
Hamming distances between different files fall into two clean groups: re-encoded copies of one photo at 0-4 bits,
and every other pair at 26 bits or more (the closest are other photos of the *same* lesion). JPEG quality 50 moves a
hash by at most 14 bits, a resize by 6, a colour or tint change by 10, so the default threshold of 20 bits catches
copies without flagging distinct photos (``tests/test_audit_realdata.py`` checks this on the real data).
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import imagehash
import numpy as np
from PIL import Image

from melanoma.data import (DEFAULT_MAX_PIXELS, DatasetIndex, ImageDecodeError, ImageRecord, decode_image,
                           display_name)
from melanoma.truth import GroundTruth

ACTION_KEEP = "keep"
ACTION_DROP_TRAIN_COPY = "drop-train-copy-of-test"
ACTION_RELABEL = "relabel"
ACTION_EXCLUDE_CONFLICT = "exclude-conflict"
ACTION_EXCLUDE_UNREADABLE = "exclude-unreadable"
MANIFEST_COLUMNS = ("path", "split", "image_id", "folder_label", "official_label", "official_source", "lesion_id",
                    "group", "leaked", "action", "reason")


@dataclass
class AuditConfig:
    near_threshold: int = 20      # Hamming bits of 256; see the module docstring for how it was chosen
    hash_size: int = 16           # pHash side: 16 -> 256-bit hashes
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 4
    seed: int = 0                 # which image per class the sample grid shows


@dataclass
class Fingerprint:
    file_sha256: str
    pixel_sha256: str
    phash: np.ndarray             # packed 256-bit hash as 4 x uint64
    size: tuple[int, int]
    mode: str
    notes: list[str]


@dataclass
class AuditResult:
    root: str
    classes: list[str]
    counts: list[dict]
    duplicate_groups: list[dict]
    label_conflicts: list[dict]
    cross_split_leaks: list[dict]
    truth_disagreements: list[dict]
    unreadable: list[dict]
    odd_images: list[dict]
    warnings: list[str]
    summary: dict
    config: dict
    manifest: list[dict] = field(repr=False, default_factory=list)

    def to_json(self) -> dict:
        payload = asdict(self)
        payload.pop("manifest")
        return payload


def fingerprint(record: ImageRecord, config: AuditConfig) -> Fingerprint:
    data = record.path.read_bytes()
    decoded = decode_image(data if data else record.path, max_pixels=config.max_pixels, name=record.rel_path)
    pixels = decoded.pixels
    pixel_digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    bits = imagehash.phash(Image.fromarray(pixels), hash_size=config.hash_size).hash.flatten()
    return Fingerprint(file_sha256=hashlib.sha256(data).hexdigest(), pixel_sha256=pixel_digest,
                       phash=np.packbits(bits).view(np.uint64), size=decoded.original_size,
                       mode=decoded.original_mode, notes=decoded.notes)


def fingerprint_all(records: Sequence[ImageRecord], config: AuditConfig,
                    progress: Callable[[Iterable, int], Iterable] | None = None):
    """Fingerprint every record in a thread pool; returns ({index: Fingerprint}, {index: error message})."""
    def one(index: int):
        try:
            return index, fingerprint(records[index], config), None
        except ImageDecodeError as exc:
            return index, None, str(exc)
        except OSError as exc:
            return index, None, f"{records[index].rel_path}: cannot read file ({exc.strerror or exc})"

    prints: dict[int, Fingerprint] = {}
    errors: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        results = pool.map(one, range(len(records)))
        for index, print_, error in (progress(results, len(records)) if progress else results):
            if error is None:
                prints[index] = print_
            else:
                errors[index] = error
    return prints, errors


def near_pairs(hashes: np.ndarray, threshold: int, chunk: int = 512) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= threshold, in chunks to bound memory."""
    pairs = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start:start + chunk]
        distances = np.bitwise_count(block[:, None, :] ^ hashes[None, :, :]).sum(axis=2)
        rows, cols = np.nonzero(distances <= threshold)
        for row, col in zip(rows.tolist(), cols.tolist()):
            i = start + row
            if i < col:
                pairs.append((i, col, int(distances[row, col])))
    return pairs


class _UnionFind:
    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)

    def components(self, members: Iterable[int]) -> list[list[int]]:
        groups: dict[int, list[int]] = defaultdict(list)
        for item in members:
            groups[self.find(item)].append(item)
        return [sorted(group) for group in groups.values()]


def run_audit(index: DatasetIndex, truth: GroundTruth | None = None, config: AuditConfig | None = None,
              progress: Callable[[Iterable, int], Iterable] | None = None) -> AuditResult:
    """Run every check on a discovered dataset; no files are written here."""
    config = config or AuditConfig()
    records = index.records
    prints, errors = fingerprint_all(records, config, progress)
    good = sorted(prints)
    relations = _copy_relations(prints, good, config)
    lesions = {i: _lesion_of(records[i], truth) for i in range(len(records))}
    duplicate_groups = _duplicate_groups(records, prints, relations)
    label_conflicts = _label_conflicts(records, relations, good)
    leaks, leaked_train = _cross_split_leaks(records, relations, lesions, good)
    disagreements, unlabelled = _truth_disagreements(records, truth, good)
    unreadable = [{"file": display_name(records[i].rel_path), "error": display_name(errors[i])} for i in sorted(errors)]
    unreadable += index.skipped
    odd = _odd_images(records, prints)
    groups = _split_groups(records, relations, lesions)
    manifest = _clean_manifest(records, truth, lesions, groups, errors, leaks, leaked_train, label_conflicts)
    counts = _counts(records, index.classes)
    summary = _summary(records, index, duplicate_groups, label_conflicts, leaks, disagreements, unlabelled,
                       unreadable, manifest, truth)
    return AuditResult(root=display_name(index.root), classes=list(index.classes), counts=counts,
                       duplicate_groups=duplicate_groups, label_conflicts=label_conflicts, cross_split_leaks=leaks,
                       truth_disagreements=disagreements, unreadable=unreadable, odd_images=odd,
                       warnings=list(index.warnings), summary=summary,
                       config=asdict(config) | {"truth_files": truth.sources if truth else []}, manifest=manifest)


@dataclass
class _Relations:
    """How pairs of readable images are copies of each other: 'identical' (same bytes or same pixels) or 'near'."""

    kind: dict[tuple[int, int], str]
    distance: dict[tuple[int, int], int]
    union: _UnionFind
    adjacent: dict[int, list[tuple[int, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for (a, b), kind in self.kind.items():
            self.adjacent.setdefault(a, []).append((b, kind))
            self.adjacent.setdefault(b, []).append((a, kind))

    def partners(self, item: int) -> list[tuple[int, str]]:
        return self.adjacent.get(item, [])


def _copy_relations(prints: dict[int, Fingerprint], good: list[int], config: AuditConfig) -> _Relations:
    kind: dict[tuple[int, int], str] = {}
    distance: dict[tuple[int, int], int] = {}
    for key in ("file_sha256", "pixel_sha256"):
        by_digest: dict[str, list[int]] = defaultdict(list)
        for i in good:
            by_digest[getattr(prints[i], key)].append(i)
        for members in by_digest.values():
            for a_pos, a in enumerate(members):
                for b in members[a_pos + 1:]:
                    kind[(a, b)] = "identical"
                    distance[(a, b)] = 0
    if good:
        hashes = np.stack([prints[i].phash for i in good])
        for a_pos, b_pos, bits in near_pairs(hashes, config.near_threshold):
            pair = (good[a_pos], good[b_pos])
            kind.setdefault(pair, "near-identical")
            distance.setdefault(pair, bits)
    union = _UnionFind(max(good, default=-1) + 1)
    for a, b in kind:
        union.union(a, b)
    return _Relations(kind=kind, distance=distance, union=union)


def _lesion_of(record: ImageRecord, truth: GroundTruth | None) -> str | None:
    if record.lesion_id:
        return record.lesion_id
    return truth.lesion_ids.get(record.image_id) if truth else None


def _duplicate_groups(records, prints, relations: _Relations) -> list[dict]:
    groups = []
    linked = sorted({i for pair in relations.kind for i in pair})
    for members in relations.union.components(linked):
        files = {prints[i].file_sha256 for i in members}
        pixels = {prints[i].pixel_sha256 for i in members}
        kind = "identical" if len(files) == 1 else "pixel-identical" if len(pixels) == 1 else "near-identical"
        distances = [d for (a, b), d in relations.distance.items() if a in members and b in members]
        groups.append({"kind": kind, "files": [display_name(records[i].rel_path) for i in members],
                       "image_ids": [records[i].image_id for i in members],
                       "labels": [records[i].label for i in members], "splits": [records[i].split for i in members],
                       "max_hash_distance": max(distances, default=0)})
    return sorted(groups, key=lambda g: g["files"])


def _label_conflicts(records, relations: _Relations, good: list[int]) -> list[dict]:
    """Groups of one picture (same content, or same ISIC id) filed under two or more classes."""
    union = _UnionFind(len(records))
    for a, b in relations.kind:
        union.union(a, b)
    by_id: dict[str, list[int]] = defaultdict(list)
    for i in good:
        by_id[records[i].image_id].append(i)
    for members in by_id.values():
        for other in members[1:]:
            union.union(members[0], other)
    conflicts = []
    for members in union.components(good):
        labels = sorted({records[i].label for i in members})
        if len(labels) > 1:
            same_bytes = all(relations.kind.get((a, b)) == "identical" for a in members for b in members if a < b)
            conflicts.append({"files": [display_name(records[i].rel_path) for i in members],
                              "image_ids": sorted({records[i].image_id for i in members}),
                              "labels": labels, "splits": sorted({records[i].split for i in members}),
                              "kind": "identical" if same_bytes else "near-identical or same id"})
    return sorted(conflicts, key=lambda c: c["files"])


def _cross_split_leaks(records, relations: _Relations, lesions: dict[int, str | None], good: list[int]):
    """Each held-out (non-Train) image with a copy or another photo of its lesion in Train."""
    train = [i for i in good if records[i].is_train]
    if not train:
        return [], {}
    train_by_lesion: dict[str, list[int]] = defaultdict(list)
    train_by_id: dict[str, list[int]] = defaultdict(list)
    for i in train:
        if lesions[i]:
            train_by_lesion[lesions[i]].append(i)
        train_by_id[records[i].image_id].append(i)
    leaks = []
    leaked_train: dict[int, tuple[str, int]] = {}
    rank = {"identical": 0, "near-identical": 1, "same-lesion": 2}
    for i in good:
        if records[i].is_train or not records[i].split:
            continue
        found: dict[int, str] = {}
        for j, kind in relations.partners(i):
            if records[j].is_train:
                found[j] = kind
        for j in train_by_lesion.get(lesions[i] or "", []) + train_by_id.get(records[i].image_id, []):
            found.setdefault(j, "same-lesion")
        if not found:
            continue
        reason = min(found.values(), key=rank.__getitem__)
        leaks.append({"file": display_name(records[i].rel_path), "split": records[i].split,
                      "image_id": records[i].image_id, "label": records[i].label, "reason": reason,
                      "lesion_id": lesions[i],
                      "train_files": [display_name(records[j].rel_path) for j in sorted(found)],
                      "train_reasons": [found[j] for j in sorted(found)]})
        for j, kind in found.items():
            leaked_train.setdefault(j, (kind, i))
    return leaks, leaked_train


def _truth_disagreements(records, truth: GroundTruth | None, good: list[int]):
    if truth is None:
        return [], None
    disagreements, unlabelled = [], 0
    for i in good:
        official = truth.label_for(records[i].image_id)
        if official is None:
            unlabelled += 1
        elif official.contradicts(records[i].label):
            disagreements.append({"file": display_name(records[i].rel_path), "image_id": records[i].image_id,
                                  "split": records[i].split, "folder_label": records[i].label,
                                  "official_label": official.label, "source": official.source})
    return disagreements, unlabelled


def _odd_images(records, prints: dict[int, Fingerprint]) -> list[dict]:
    sizes = Counter(p.size for p in prints.values())
    usual = sizes.most_common(1)[0][0] if sizes else None
    odd = []
    for i, p in sorted(prints.items()):
        problems = list(p.notes)
        if p.mode != "RGB" and not any(p.mode in note for note in problems):
            problems.append(f"mode {p.mode}")
        if p.size != usual:
            problems.append(f"size {p.size[0]}x{p.size[1]} (most images are {usual[0]}x{usual[1]})")
        if problems:
            odd.append({"file": display_name(records[i].rel_path), "mode": p.mode, "size": list(p.size),
                        "problems": problems})
    return odd


def _split_groups(records, relations: _Relations, lesions: dict[int, str | None]) -> list[str]:
    """Group ids that keep copies, photos of one lesion and one ISIC id on the same side of any split."""
    union = _UnionFind(len(records))
    for a, b in relations.kind:
        union.union(a, b)
    first_of: dict[str, int] = {}
    for i, record in enumerate(records):
        for key in (f"id:{record.image_id}", f"lesion:{lesions[i]}" if lesions[i] else None):
            if key is None:
                continue
            if key in first_of:
                union.union(first_of[key], i)
            else:
                first_of[key] = i
    names: dict[int, str] = {}
    return [names.setdefault(union.find(i), f"g{len(names):05d}") for i in range(len(records))]


def _clean_manifest(records, truth, lesions, groups, errors, leaks, leaked_train, label_conflicts) -> list[dict]:
    leaked_files = {leak["file"] for leak in leaks}
    conflicted = {f for conflict in label_conflicts for f in conflict["files"]}
    rows = []
    for i, record in enumerate(records):
        official = truth.label_for(record.image_id) if truth else None
        action, reason = _action_for(i, record, official, errors, leaked_train, conflicted, records)
        rows.append({"path": display_name(record.rel_path), "split": record.split, "image_id": record.image_id,
                     "folder_label": record.label, "official_label": official.label if official else "",
                     "official_source": official.source if official else "", "lesion_id": lesions[i] or "",
                     "group": groups[i], "leaked": int(display_name(record.rel_path) in leaked_files),
                     "action": action, "reason": reason})
    return rows


def _action_for(i, record, official, errors, leaked_train, conflicted, records) -> tuple[str, str]:
    if i in errors:
        return ACTION_EXCLUDE_UNREADABLE, errors[i]
    if i in leaked_train:
        kind, test_index = leaked_train[i]
        return ACTION_DROP_TRAIN_COPY, f"{kind} to {display_name(records[test_index].rel_path)}"
    contradicted = official is not None and official.contradicts(record.label)
    if display_name(record.rel_path) in conflicted and record.is_train:
        if official is None:
            return ACTION_EXCLUDE_CONFLICT, "same picture filed under other classes; no official label"
        if contradicted:
            return ACTION_EXCLUDE_CONFLICT, f"same picture filed under other classes; official label {official.label}"
    if contradicted:
        return ACTION_RELABEL, f"folder says {record.label}, {official.source} says {official.label}"
    return ACTION_KEEP, ""


def _counts(records, classes: list[str]) -> list[dict]:
    tally = Counter((r.split, r.label) for r in records)
    splits = sorted({r.split for r in records})
    return [{"split": split, "class": label, "count": tally.get((split, label), 0)}
            for split in splits for label in classes]


def _summary(records, index, duplicate_groups, label_conflicts, leaks, disagreements, unlabelled, unreadable,
             manifest, truth) -> dict:
    classes_by_id: dict[str, set[str]] = defaultdict(set)
    for record in records:
        classes_by_id[record.image_id].add(record.label)
    multi_class_ids = sorted(i for i, labels in classes_by_id.items() if len(labels) > 1)
    return {
        "images": len(records),
        "splits": {split or "(none)": sum(1 for r in records if r.split == split) for split in index.splits},
        "classes": len(index.classes),
        "duplicate_groups": len(duplicate_groups),
        "duplicate_groups_by_kind": dict(Counter(g["kind"] for g in duplicate_groups)),
        "image_ids_in_several_classes": len(multi_class_ids),
        "label_conflict_groups": len(label_conflicts),
        "leaked_heldout_images": len(leaks),
        "leaks_by_reason": dict(Counter(leak["reason"] for leak in leaks)),
        "truth_disagreements": len(disagreements) if truth else None,
        "images_without_official_label": unlabelled,
        "unreadable": len(unreadable),
        "actions": dict(Counter(row["action"] for row in manifest)),
    }


# ---------------------------------------------------------------------------------------------------------------
# Writing the audit folder


def write_audit(result: AuditResult, index: DatasetIndex, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write audit.json, audit.md, clean_manifest.csv and the plots; each file atomically."""
    from melanoma.io import save_figure, write_csv, write_json, atomic_write_text
    from melanoma.plots import class_counts_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "json": write_json(out / "audit.json", result.to_json()),
        "manifest": write_csv(out / "clean_manifest.csv", result.manifest, MANIFEST_COLUMNS),
        "counts_png": save_figure(class_counts_figure(result.counts, result.classes), out / "class_counts.png"),
    }
    grid = _sample_grid(index, result)
    if grid is not None:
        written["samples_png"] = save_figure(grid, out / "samples.png")
    leak_figure = _leak_pairs_figure(index, result)
    if leak_figure is not None:
        written["leaks_png"] = save_figure(leak_figure, out / "leaks.png")
    written["markdown"] = atomic_write_text(out / "audit.md",
                                            audit_markdown(result, [str(p) for p in written.values()]))
    return written


def _pixels_or_none(record: ImageRecord):
    try:
        return decode_image(record.path).pixels
    except (ImageDecodeError, OSError):
        return None


def _sample_grid(index: DatasetIndex, result: AuditResult):
    """One image per class (the seed notebooks' first look at the data), drawn with the audit's seed."""
    from melanoma.plots import image_grid_figure

    unreadable = {row["file"] for row in result.unreadable}
    rng = np.random.default_rng(result.config["seed"])
    images, titles = [], []
    for label in index.classes:
        candidates = [r for r in index.records if r.label == label and display_name(r.rel_path) not in unreadable]
        candidates.sort(key=lambda r: (not r.is_train, r.rel_path))
        train_first = [r for r in candidates if r.is_train] or candidates
        for record in rng.permutation(len(train_first)).tolist():
            pixels = _pixels_or_none(train_first[record])
            if pixels is not None:
                images.append(pixels)
                titles.append(f"{label}\n{train_first[record].image_id}")
                break
    if not images:
        return None
    return image_grid_figure(images, titles, columns=min(3, len(images)), title="One image per class")


def _leak_pairs_figure(index: DatasetIndex, result: AuditResult, limit: int = 6):
    from melanoma.plots import pairs_figure

    by_path = {display_name(r.rel_path): r for r in index.records}
    ordered = sorted(result.cross_split_leaks, key=lambda leak: (leak["reason"] != "near-identical", leak["file"]))
    pairs = []
    for leak in ordered[:limit]:
        held_out, train = by_path.get(leak["file"]), by_path.get(leak["train_files"][0])
        left = _pixels_or_none(held_out) if held_out else None
        right = _pixels_or_none(train) if train else None
        if left is not None and right is not None:
            pairs.append((left, f"{leak['split']}: {leak['file']}", right,
                          f"{leak['train_reasons'][0]}: {leak['train_files'][0]}"))
    return pairs_figure(pairs, "Held-out images with a copy in Train") if pairs else None


def audit_markdown(result: AuditResult, files: Sequence[str], limit: int = 40) -> str:
    s = result.summary
    lines = [f"# Dataset audit: `{result.root}`", "",
             f"{s['images']} images, {s['classes']} classes, splits: "
             + ", ".join(f"{k} {v}" for k, v in s["splits"].items()) + ".", ""]
    lines += ["## Findings", "", "| check | found |", "|---|---|",
              f"| duplicate groups (identical / pixel-identical / near-identical) | {s['duplicate_groups']} "
              f"{s['duplicate_groups_by_kind']} |",
              f"| ISIC ids filed under two or more classes | {s['image_ids_in_several_classes']} |",
              f"| label-conflict groups | {s['label_conflict_groups']} |",
              f"| held-out images leaked into Train | {s['leaked_heldout_images']} {s['leaks_by_reason']} |",
              f"| folder labels contradicted by official truth | {_or_na(s['truth_disagreements'])} |",
              f"| images without an official label | {_or_na(s['images_without_official_label'])} |",
              f"| unreadable or skipped files | {s['unreadable']} |",
              f"| recommended actions | {s['actions']} |", ""]
    if result.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in result.warnings] + [""]
    lines += _counts_table(result)
    lines += [f"![{name}]({name})" for name in ("class_counts.png", "samples.png", "leaks.png")
              if any(str(f).endswith(name) for f in files)] + [""]
    lines += _section("Cross-split leaks", ["file", "reason", "lesion_id", "train_files"], result.cross_split_leaks,
                      limit)
    lines += _section("Label conflicts", ["files", "labels", "kind"], result.label_conflicts, limit)
    lines += _section("Official-truth disagreements", ["file", "folder_label", "official_label", "source"],
                      result.truth_disagreements, limit)
    lines += _section("Unreadable or skipped files", ["file", "error"], result.unreadable, limit)
    lines += _section("Odd sizes or modes", ["file", "problems"], result.odd_images, limit)
    lines += ["## Settings", "", f"Near-duplicate threshold: {result.config['near_threshold']} of "
              f"{result.config['hash_size'] ** 2} pHash bits. "
              f"Truth files: {', '.join(result.config['truth_files']) or 'none'}.",
              "", "`clean_manifest.csv` lists every image with its recommended action.", ""]
    return "\n".join(lines)


def _or_na(value) -> str:
    return "n/a (no --truth given)" if value is None else str(value)


def _counts_table(result: AuditResult) -> list[str]:
    splits = sorted({row["split"] for row in result.counts})
    lookup = {(row["split"], row["class"]): row["count"] for row in result.counts}
    lines = ["## Images per class", "", "| class | " + " | ".join(s or "all" for s in splits) + " |",
             "|---|" + "---:|" * len(splits)]
    for label in result.classes:
        lines.append(f"| {label} | " + " | ".join(str(lookup.get((s, label), 0)) for s in splits) + " |")
    return lines + [""]


def _section(title: str, columns: Sequence[str], rows: Sequence[dict], limit: int) -> list[str]:
    lines = [f"## {title} ({len(rows)})", ""]
    if not rows:
        return lines + ["None found.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows[:limit]:
        cells = [", ".join(map(str, row[c])) if isinstance(row.get(c), list) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    if len(rows) > limit:
        lines.append(f"\n... {len(rows) - limit} more in `audit.json`.")
    return lines + [""]
