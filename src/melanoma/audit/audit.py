"""Dataset audit: counts, exact and near duplicates, label conflicts, Train/Test leakage, official-truth disagreements
and unreadable images, with one recommended action per image (the clean manifest that training applies).

How copies are recognised lives in :mod:`melanoma.audit.copies`; writing the audit folder (``audit.json``,
``audit.md``, ``clean_manifest.csv``, plots) in :mod:`melanoma.audit.report`.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from melanoma.audit import nearcopy
from melanoma.audit.copies import Fingerprint, UnionFind, fingerprint_all, near_copy_pairs
from melanoma.audit.manifest import (
    ACTION_DROP_DUPLICATE,
    ACTION_DROP_TRAIN_COPY,
    ACTION_EXCLUDE_CONFLICT,
    ACTION_EXCLUDE_DISPUTED,
    ACTION_EXCLUDE_UNREADABLE,
    ACTION_KEEP,
    ACTION_RELABEL,
)
from melanoma.core.text import display_name
from melanoma.data.images import DEFAULT_MAX_PIXELS
from melanoma.data.records import DatasetIndex, ImageRecord
from melanoma.data.truth import GroundTruth, with_record_labels

_ISIC_ID = re.compile(r"ISIC_\d{7}")


@dataclass
class AuditConfig:
    near_threshold: float = nearcopy.THRESHOLD  # near-copy distance; see melanoma.audit.copies for how it was chosen
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 4
    seed: int = 0                 # which image per class the sample grid shows


@dataclass
class AuditResult:
    root: str
    classes: list[str]
    sources: list[dict]
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


def run_audit(index: DatasetIndex, truth: GroundTruth | None = None, config: AuditConfig | None = None,
              progress: Callable[[Iterable, int], Iterable] | None = None) -> AuditResult:
    """Run every check on a discovered dataset; no files are written here."""
    config = config or AuditConfig()
    records = index.records
    truth = with_record_labels(truth, records)
    prints, errors = fingerprint_all(records, config.max_pixels, config.workers, progress)
    good = sorted(prints)
    lesions = {i: _lesion_of(records[i], truth) for i in range(len(records))}
    relations = _copy_relations(records, prints, good, lesions, config)
    duplicate_groups = _duplicate_groups(records, prints, relations)
    label_conflicts = _label_conflicts(records, relations, good)
    leaks, leaked_train = _cross_split_leaks(records, relations, lesions, good)
    disputed = _disputed_official_labels(records, good)
    disagreements, unlabelled = _truth_disagreements(records, truth, [i for i in good
                                                                       if records[i].image_id not in disputed])
    disagreements += [row for rows in disputed.values() for row in rows]
    unreadable = [{"file": display_name(records[i].rel_path), "error": display_name(errors[i])} for i in sorted(errors)]
    unreadable += index.skipped
    odd = _odd_images(records, prints)
    groups = _split_groups(records, relations, lesions)
    manifest = _clean_manifest(records, truth, lesions, groups, errors, leaks, leaked_train, label_conflicts)
    _exclude_disputed(records, disputed, manifest)
    _drop_cross_source_copies(records, prints, relations, manifest)
    _drop_cross_source_copies(records, prints, relations, manifest, held_out=True)
    counts = _counts(records, index.classes)
    summary = _summary(records, index, duplicate_groups, label_conflicts, leaks, disagreements, unlabelled,
                       unreadable, manifest, truth)
    return AuditResult(root=display_name(index.root), classes=list(index.classes), counts=counts,
                       sources=index.sources,
                       duplicate_groups=duplicate_groups, label_conflicts=label_conflicts, cross_split_leaks=leaks,
                       truth_disagreements=disagreements, unreadable=unreadable, odd_images=odd,
                       warnings=list(index.warnings), summary=summary,
                       config=asdict(config) | {"truth_files": truth.sources if truth else []}, manifest=manifest)


@dataclass
class _Relations:
    """How pairs of readable images are copies of each other: 'identical' (same bytes or same pixels) or 'near'."""

    kind: dict[tuple[int, int], str]
    distance: dict[tuple[int, int], int]
    union: UnionFind
    adjacent: dict[int, list[tuple[int, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for (a, b), kind in self.kind.items():
            self.adjacent.setdefault(a, []).append((b, kind))
            self.adjacent.setdefault(b, []).append((a, kind))

    def partners(self, item: int) -> list[tuple[int, str]]:
        return self.adjacent.get(item, [])


def _copy_relations(records, prints: dict[int, Fingerprint], good: list[int], lesions: dict[int, str | None],
                    config: AuditConfig) -> _Relations:
    """Pairs that are one picture: same bytes or pixels ('identical'), a near-copy ('near-identical'), or the same
    ISIC id in two sources ('same-id': the archive's id names one picture, whatever size each source keeps).

    Two photos of one known lesion taken seconds apart can look like a crop of one photo; they are grouped by their
    lesion id anyway, so a near-copy between them is not counted as one picture (a second photo trains too)."""
    kind: dict[tuple[int, int], str] = {}
    distance: dict[tuple[int, int], float] = {}
    for key in ("file_sha256", "pixel_sha256"):
        by_digest: dict[str, list[int]] = defaultdict(list)
        for i in good:
            by_digest[getattr(prints[i], key)].append(i)
        for members in by_digest.values():
            for a_pos, a in enumerate(members):
                for b in members[a_pos + 1:]:
                    kind[(a, b)] = "identical"
                    distance[(a, b)] = 0
    for a_pos, b_pos, apart in near_copy_pairs([prints[i] for i in good], config.near_threshold, config.workers):
        pair = (good[a_pos], good[b_pos])
        if pair not in kind and not (lesions[pair[0]] and lesions[pair[0]] == lesions[pair[1]]):
            kind[pair] = "near-identical"
            distance[pair] = round(apart, 3)
    for pair in _same_id_across_sources(records, good):
        kind.setdefault(pair, "same-id")
    union = UnionFind(max(good, default=-1) + 1)
    for a, b in kind:
        union.union(a, b)
    return _Relations(kind=kind, distance=distance, union=union)


def _same_id_across_sources(records, good: list[int]) -> list[tuple[int, int]]:
    by_id: dict[str, list[int]] = defaultdict(list)
    for i in good:
        if _ISIC_ID.fullmatch(records[i].image_id):
            by_id[records[i].image_id].append(i)
    return [(a, b) for members in by_id.values() for pos, a in enumerate(members) for b in members[pos + 1:]
            if records[a].source != records[b].source]


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
        if kind == "near-identical" and all(relations.kind.get((a, b)) == "same-id"
                                            for a in members for b in members if a < b):
            kind = "same-id"
        groups.append({"kind": kind, "files": [display_name(records[i].rel_path) for i in members],
                       "sources": [records[i].source for i in members],
                       "image_ids": [records[i].image_id for i in members],
                       "labels": [records[i].label for i in members], "splits": [records[i].split for i in members],
                       "max_near_distance": max(distances, default=0)})
    return sorted(groups, key=lambda g: g["files"])


def _label_conflicts(records, relations: _Relations, good: list[int]) -> list[dict]:
    """Groups of one picture (same content, or same ISIC id) filed under two or more classes."""
    union = UnionFind(len(records))
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
            conflicts.append({"members": members, "files": [display_name(records[i].rel_path) for i in members],
                              "image_ids": sorted({records[i].image_id for i in members}),
                              "labels": labels, "splits": sorted({records[i].split for i in members}),
                              "sources": sorted({records[i].source for i in members}),
                              "kind": "identical" if same_bytes else "near-identical or same id"})
    return sorted(conflicts, key=lambda c: c["files"])


def _cross_split_leaks(records, relations: _Relations, lesions: dict[int, str | None], good: list[int]):
    """Each held-out (non-Train) image with a copy or another photo of its lesion in the training pool of any
    source (Train, or a source without splits)."""
    train = [i for i in good if records[i].in_training_pool]
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
    rank = {"identical": 0, "near-identical": 1, "same-id": 2, "same-lesion": 3}
    for i in good:
        if records[i].in_training_pool:
            continue
        found: dict[int, str] = {}
        for j, kind in relations.partners(i):
            if records[j].in_training_pool:
                found[j] = kind
        for j in train_by_lesion.get(lesions[i] or "", []) + train_by_id.get(records[i].image_id, []):
            found.setdefault(j, "same-lesion")
        if not found:
            continue
        reason = min(found.values(), key=rank.__getitem__)
        leaks.append({"index": i, "file": display_name(records[i].rel_path), "source": records[i].source,
                      "split": records[i].split,
                      "image_id": records[i].image_id, "label": records[i].label, "reason": reason,
                      "lesion_id": lesions[i],
                      "train_files": [display_name(records[j].rel_path) for j in sorted(found)],
                      "train_sources": [records[j].source for j in sorted(found)],
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
            disagreements.append({"file": display_name(records[i].rel_path), "data_source": records[i].source,
                                  "image_id": records[i].image_id,
                                  "split": records[i].split, "folder_label": records[i].label,
                                  "official_label": official.label, "source": official.source})
    return disagreements, unlabelled


def _odd_images(records, prints: dict[int, Fingerprint]) -> list[dict]:
    """Images decoded with a conversion, or of another size than most of their own source's images."""
    sizes: dict[str, Counter] = defaultdict(Counter)
    for i, p in prints.items():
        sizes[records[i].source][p.size] += 1
    odd = []
    for i, p in sorted(prints.items()):
        problems = list(p.notes)
        usual = sizes[records[i].source].most_common(1)[0][0]
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
    union = UnionFind(len(records))
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
    leaked_files = {leak.pop("index") for leak in leaks}
    conflicted = {i for conflict in label_conflicts for i in conflict.pop("members")}
    rows = []
    for i, record in enumerate(records):
        official = truth.label_for(record.image_id) if truth else None
        action, reason = _action_for(i, record, official, errors, leaked_train, conflicted, records)
        rows.append({"key": record.identity, "path": display_name(record.rel_path), "source": record.source,
                     "split": record.split, "image_id": record.image_id,
                     "folder_label": record.label, "official_label": official.label if official else "",
                     "official_source": official.source if official else "", "lesion_id": lesions[i] or "",
                     "group": groups[i], "leaked": int(i in leaked_files),
                     "action": action, "reason": reason})
    return rows


def _action_for(i, record, official, errors, leaked_train, conflicted, records) -> tuple[str, str]:
    if i in errors:
        return ACTION_EXCLUDE_UNREADABLE, errors[i]
    if i in leaked_train:
        kind, test_index = leaked_train[i]
        return ACTION_DROP_TRAIN_COPY, f"{kind} to {display_name(records[test_index].rel_path)}"
    contradicted = official is not None and official.contradicts(record.label)
    if i in conflicted and record.in_training_pool:
        if official is None:
            return ACTION_EXCLUDE_CONFLICT, "same picture filed under other classes; no official label"
        if contradicted:
            return ACTION_EXCLUDE_CONFLICT, f"same picture filed under other classes; official label {official.label}"
    if contradicted:
        return ACTION_RELABEL, f"folder says {record.label}, {official.source} says {official.label}"
    return ACTION_KEEP, ""


def _drop_cross_source_copies(records, prints, relations: _Relations, manifest: list[dict],
                              held_out: bool = False) -> None:
    """One picture in several sources trains once (and, with ``held_out``, is scored once in its held-out split):
    of the copies still kept, keep the one with an official label when their labels differ, else the largest image
    (then the first source given); the rest get ``drop-duplicate`` with the kept copy and the reason named."""
    source_order = {name: position for position, name in reversed(list(enumerate(r.source for r in records)))}
    kept = [i for i in sorted(prints) if records[i].in_training_pool != held_out
            and manifest[i]["action"] in (ACTION_KEEP, ACTION_RELABEL)]
    by_split: dict[tuple[int, str], list[int]] = defaultdict(list)
    for members in relations.union.components(kept):
        for i in members:
            by_split[(members[0], records[i].split.lower() if held_out else "")].append(i)
    for members in by_split.values():
        if len({records[i].source for i in members}) < 2:
            continue
        labels_differ = len({records[i].label for i in members}) > 1

        def preference(i: int):
            width, height = prints[i].size
            official = bool(records[i].official_source) if labels_differ else False
            return (official, width * height, -source_order[records[i].source], records[i].rel_path)

        winner = max(members, key=preference)
        width, height = prints[winner].size
        why = (f"official label {records[winner].label}" if labels_differ and records[winner].official_source
               else f"larger image, {width}x{height}")
        for i in members:
            if i != winner:
                manifest[i]["action"] = ACTION_DROP_DUPLICATE
                manifest[i]["reason"] = (f"same picture as {display_name(records[winner].rel_path)} "
                                         f"({records[winner].source}), kept: {why}")


def _disputed_official_labels(records, good: list[int]) -> dict[str, list[dict]]:
    """ISIC ids whose official labels (a manifest's official_label_source, an ISIC Archive download) differ between
    records: a truth disagreement between sources, the same whichever source was given first."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for i in good:
        if records[i].official_source and _ISIC_ID.fullmatch(records[i].image_id):
            by_id[records[i].image_id].append(i)
    disputed = {}
    for image_id, members in sorted(by_id.items()):
        opinions = sorted({(records[i].source, records[i].label) for i in members})
        if len({label for _, label in opinions}) < 2:
            continue
        said = "; ".join(f"{source} says {label}" for source, label in opinions)
        disputed[image_id] = [{"file": display_name(records[i].rel_path), "data_source": records[i].source,
                               "image_id": image_id, "split": records[i].split, "folder_label": records[i].label,
                               "official_label": "disputed", "source": said, "kind": "between sources",
                               "index": i} for i in members]
    return disputed


def _exclude_disputed(records, disputed: dict[str, list[dict]], manifest: list[dict]) -> None:
    """Every image of an id whose sources disagree on the official label is excluded, on every side of the split."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_id[record.image_id].append(i)
    for image_id, rows in disputed.items():
        said = rows[0]["source"]
        for row in rows:
            row.pop("index")
        for i in by_id[image_id]:
            if manifest[i]["action"] != ACTION_EXCLUDE_UNREADABLE:
                manifest[i].update(action=ACTION_EXCLUDE_DISPUTED, official_label="", official_source="",
                                   reason=f"sources disagree on the official label: {said}")


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
        "truth_disagreements": len(disagreements) if truth or disagreements else None,
        "truth_disagreements_between_sources": sum(d.get("kind") == "between sources" for d in disagreements),
        "images_without_official_label": unlabelled,
        "unreadable": len(unreadable),
        "actions": dict(Counter(row["action"] for row in manifest)),
        "sources": {source["name"]: source["images"] for source in index.sources},
        "across_sources": _across_sources(duplicate_groups, label_conflicts, leaks, disagreements, manifest,
                                          {source["name"] for source in index.sources}),
    }


def _across_sources(duplicate_groups, label_conflicts, leaks, disagreements, manifest, source_names) -> dict:
    """How many findings join images of different sources (a truth disagreement does when another data source's
    official label contradicts the image's own label)."""
    return {"duplicate_groups": sum(len(set(g["sources"])) > 1 for g in duplicate_groups),
            "label_conflict_groups": sum(len(c["sources"]) > 1 for c in label_conflicts),
            "truth_disagreements": sum(d.get("kind") == "between sources"
                                       or (d["source"] in source_names and d["source"] != d["data_source"])
                                       for d in disagreements),
            "leaked_heldout_images": sum(any(s != leak["source"] for s in leak["train_sources"]) for leak in leaks),
            "duplicates_dropped": sum(row["action"] == ACTION_DROP_DUPLICATE for row in manifest)}
