"""clean_manifest.csv, the audit's verdict on every image: its columns, its actions, and the selections it makes
(the training pool, the validation images, the held-out images scored once per picture), shared by training and
``melanoma evaluate``."""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from melanoma.core.errors import DataError
from melanoma.core.text import display_name
from melanoma.data.records import DatasetIndex, ImageRecord

CLEAN_MANIFEST = "clean_manifest.csv"  # in every audit folder (melanoma audit --out, or RUN/audit)
# What the audit recommends for each image (the `action` column)
ACTION_KEEP = "keep"
ACTION_DROP_TRAIN_COPY = "drop-train-copy-of-test"
ACTION_RELABEL = "relabel"
ACTION_EXCLUDE_CONFLICT = "exclude-conflict"
ACTION_EXCLUDE_UNREADABLE = "exclude-unreadable"
ACTION_DROP_DUPLICATE = "drop-duplicate"
ACTION_EXCLUDE_DISPUTED = "exclude-disputed-truth"
MANIFEST_COLUMNS = ("key", "path", "source", "split", "image_id", "folder_label", "official_label", "official_source",
                    "lesion_id", "group", "leaked", "action", "reason")


def manifest_file(audit: str | Path) -> Path:
    """An audit folder's clean_manifest.csv, or the file itself when ``audit`` names it (``--audit`` takes both)."""
    path = Path(audit)
    return path / CLEAN_MANIFEST if path.is_dir() else path


def read_clean_manifest(audit: str | Path) -> list[dict]:
    """The rows of an audit's clean_manifest.csv (``audit``: the folder or the file): the one reader of that file.
    It is written with surrogateescape (melanoma.core.io), so a file name that is not UTF-8 reads back as it was."""
    path = manifest_file(audit)
    if not path.is_file():
        raise DataError(f"{display_name(path)}: no {CLEAN_MANIFEST} there; run `melanoma audit` first")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return list(csv.DictReader(handle))


DROPPING_ACTIONS = (ACTION_DROP_TRAIN_COPY, ACTION_EXCLUDE_CONFLICT, ACTION_EXCLUDE_UNREADABLE, ACTION_DROP_DUPLICATE,
                    ACTION_EXCLUDE_DISPUTED)
# A held-out split is scored as it is, except: an unreadable image, a picture whose sources disagree on its official
# label, and the second copy of one picture found in two sources (one picture, one vote).
HELDOUT_DROPPING = (ACTION_EXCLUDE_UNREADABLE, ACTION_EXCLUDE_DISPUTED, ACTION_DROP_DUPLICATE)


@dataclass
class Selection:
    """Records chosen for one purpose, with the label each trains on and the group that keeps lesions together."""

    records: list[ImageRecord]
    labels: list[str]
    groups: list[str]
    leaked: list[bool] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    relabelled: int = 0


def select_training_pool(index: DatasetIndex, manifest: Sequence[dict] | None, relabel: bool = False) -> Selection:
    """The training pool (Train splits, and sources without splits) after the clean-manifest actions.

    ``manifest`` None means ``--no-clean``: every record as it is, grouped only by ISIC id.
    """
    pool = [r for r in index.records if r.in_training_pool]
    if not pool:
        raise DataError(f"{display_name(index.root)}: no Train split found (splits: {', '.join(index.splits)})")
    return _apply_manifest(pool, manifest, relabel)


def select_validation(index: DatasetIndex, manifest: Sequence[dict] | None, relabel: bool = False) -> Selection | None:
    """The sources' own validation split (val, valid or validation) after the clean-manifest actions; None if none."""
    records = [r for r in index.records if r.is_validation]
    return _apply_manifest(records, manifest, relabel) if records else None


HELDOUT_COPIES = (ACTION_EXCLUDE_DISPUTED, ACTION_DROP_DUPLICATE)  # one picture, one vote; unreadable files kept


def select_heldout(index: DatasetIndex, split: str, manifest: Sequence[dict] | None,
                   dropping: Sequence[str] = HELDOUT_DROPPING) -> Selection:
    """A held-out split as it is (never cleaned or relabelled), with each image's leak flag from the audit; only the
    actions in ``dropping`` remove an image, counted in ``dropped``."""
    selection = Selection(records=[], labels=[], groups=[])
    rows = rows_by_key(manifest)
    for record in index.in_split(split):
        row = rows.get(record_key(record, rows))
        if row is not None and row["action"] in dropping:
            selection.dropped[row["action"]] += 1
            continue
        selection.records.append(record)
        selection.labels.append(record.label)
        selection.groups.append(record.image_id)
        selection.leaked.append(bool(int(row["leaked"])) if row is not None else False)
    return selection


def rows_by_key(manifest: Sequence[dict] | None) -> dict[str, dict]:
    """Clean-manifest rows by record key; by path for an audit written before keys existed."""
    if not manifest:
        return {}
    column = "key" if "key" in manifest[0] else "path"
    return {row[column]: row for row in manifest}


def record_key(record: ImageRecord, rows: dict[str, dict]) -> str:
    """The manifest key of a record: its identity, or its printable path for an audit without keys."""
    return record.identity if record.identity in rows else display_name(record.rel_path)


def _apply_manifest(pool: list[ImageRecord], manifest: Sequence[dict] | None, relabel: bool) -> Selection:
    if manifest is None:
        return Selection(records=pool, labels=[r.label for r in pool], groups=[r.image_id for r in pool])
    rows = rows_by_key(manifest)
    selection = Selection(records=[], labels=[], groups=[])
    for record in pool:
        row = rows.get(record_key(record, rows))
        if row is None:
            raise DataError(f"{display_name(record.rel_path)}: not in the audit's clean manifest; "
                            "re-run `melanoma audit` on this data")
        if row["action"] in DROPPING_ACTIONS:
            selection.dropped[row["action"]] += 1
            continue
        label = record.label
        if relabel and row["action"] == ACTION_RELABEL and row["official_label"]:
            label = row["official_label"]
            selection.relabelled += 1
        selection.records.append(record)
        selection.labels.append(label)
        selection.groups.append(row["group"] or record.image_id)
    return selection
