"""Writing an audit folder: ``audit.json`` (the machine-readable contract), ``audit.md`` for people,
``clean_manifest.csv`` (one recommended action per image) and the plots (class counts, one sample per class, Test
images beside their Train copies)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from melanoma.audit.audit import AuditConfig, AuditResult, run_audit
from melanoma.audit.manifest import CLEAN_MANIFEST, MANIFEST_COLUMNS
from melanoma.core.errors import ImageDecodeError
from melanoma.core.io import atomic_write_text, read_json, save_figure, write_csv, write_json
from melanoma.core.plots import class_counts_figure, image_grid_figure, pairs_figure
from melanoma.core.text import display_name
from melanoma.data.images import decode_image
from melanoma.data.records import DatasetIndex, ImageRecord

AUDIT_JSON = "audit.json"  # the machine-readable contract; its presence marks an audit folder
AUDIT_MARKDOWN = "audit.md"
OPTIONAL_OUTPUTS = ("samples.png", "leaks.png")  # written only when there is something to show


def write_audit(result: AuditResult, index: DatasetIndex, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write audit.json, audit.md, clean_manifest.csv and the plots; each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for optional in OPTIONAL_OUTPUTS:  # a re-used folder must not show a previous audit's figure as this one's
        (out / optional).unlink(missing_ok=True)
    written = {
        "json": write_json(out / AUDIT_JSON, result.to_json()),
        "manifest": write_csv(out / CLEAN_MANIFEST, result.manifest, MANIFEST_COLUMNS),
        "counts_png": save_figure(class_counts_figure(result.counts, result.classes), out / "class_counts.png"),
    }
    grid = _sample_grid(index, result)
    if grid is not None:
        written["samples_png"] = save_figure(grid, out / "samples.png")
    leak_figure = _leak_pairs_figure(index, result)
    if leak_figure is not None:
        written["leaks_png"] = save_figure(leak_figure, out / "leaks.png")
    written["markdown"] = atomic_write_text(out / AUDIT_MARKDOWN,
                                            audit_markdown(result, [str(p) for p in written.values()]))
    return written


def _pixels_or_none(record: ImageRecord):
    try:
        return decode_image(record.path).pixels
    except (ImageDecodeError, OSError):
        return None


def _sample_grid(index: DatasetIndex, result: AuditResult):
    """One image per class (the seed notebooks' first look at the data), drawn with the audit's seed."""
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
    lines += ["## Settings", "", f"Near-copy threshold: distance {result.config['near_threshold']} "
              "(1 - the lower of the aligned images' structure and detail correlations). "
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


def read_audit_json(audit_dir: str | os.PathLike) -> dict | None:
    """An audit folder's audit.json, or None where the folder has none (an older audit, or none at all)."""
    path = Path(audit_dir) / AUDIT_JSON
    return read_json(path) if path.is_file() else None


def audit_now(index: DatasetIndex, truth=None, out_dir: str | os.PathLike | None = None) -> list[dict]:
    """Audit ``index`` now (with ``truth``, official ground truth, when given) and return its clean-manifest rows;
    with ``out_dir``, the audit folder is written there as ``melanoma audit`` writes it."""
    result = run_audit(index, truth, AuditConfig())
    if out_dir is not None:
        write_audit(result, index, out_dir)
    return result.manifest
