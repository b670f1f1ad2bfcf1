"""Data sources: where labelled images come from, one source or several in one run.

Three kinds of source are understood, and any mix of them can be given at once::

    ROOT/<class>/*.jpg  or  ROOT/{Train,Test}/<class>/*.jpg    a folder tree (folder names are split and class)
    FILE.csv                                                  a manifest: image, label[, lesion_id, split,
                                                              official_label_source]
    DIR/metadata.csv + DIR/ISIC_*.jpg                         an ISIC Archive download (``isic image download``)

Every record keeps the name of its source. With several sources, record paths are relative to the folder that holds
them all, so they stay unique. A repeated image id within or across sources is not an error: finding and resolving
copies is the audit's job (:mod:`melanoma.audit`). Only rows that cannot be used at all (a missing file, an unknown
label, an empty image cell) stop a manifest, all of them named at once.

An ISIC Archive download's diagnoses are mapped onto the nine classes by ``tables/isic_archive_diagnoses.csv``
(docs/data_sources.md explains the choices); rows with a diagnosis outside the nine classes and non-dermoscopic
images are skipped and counted.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from melanoma.data import (IMAGE_SUFFIXES, ISIC_CLASSES, SPLIT_NAMES, DataError, DatasetIndex, ImageRecord,
                           has_surrogates, display_name, image_id_from_name)

FOLDER, MANIFEST, ISIC_ARCHIVE = "folder", "manifest", "isic-archive"
ARCHIVE_METADATA = "metadata.csv"
DIAGNOSIS_COLUMNS = ("diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5")
DERMOSCOPIC = "dermoscopic"
_PROBLEMS_SHOWN = 20


def load_dataset(sources: str | os.PathLike | Sequence[str | os.PathLike], classes: Sequence[str] | None = None,
                 image_root: str | os.PathLike | None = None) -> DatasetIndex:
    """Discover one data source or several (folders, manifests, ISIC Archive downloads) as one dataset."""
    paths = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(s) for s in sources]
    if not paths:
        raise DataError("no data source given")
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.absolute() in seen:
            raise DataError(f"{display_name(path)}: data source given twice")
        seen[path.absolute()] = path
    indexes = [load_source(path, classes=classes, image_root=image_root) for path in paths]
    return indexes[0] if len(indexes) == 1 else combine(indexes)


def load_source(source: str | os.PathLike, classes: Sequence[str] | None = None,
                image_root: str | os.PathLike | None = None) -> DatasetIndex:
    """One source, its kind told by what it is: a folder tree, a .csv manifest or an ISIC Archive download."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{display_name(source)}: no such file or folder")
    if source.is_dir():
        if _is_archive_download(source):
            return read_archive_download(source)
        return discover_folder(source)
    if source.suffix.lower() == ".csv":
        return read_manifest(source, classes=classes, image_root=image_root)
    raise DataError(f"{display_name(source)}: expected a folder of class folders, an ISIC Archive download folder "
                    "(with metadata.csv) or a .csv manifest")


def combine(indexes: Sequence[DatasetIndex]) -> DatasetIndex:
    """Several sources as one dataset: paths relative to the folder holding them all, sources named by their path
    from there, classes the union."""
    root = Path(os.path.commonpath([index.root.absolute() for index in indexes]))
    records, warnings, skipped, described = [], [], [], []
    for index in indexes:
        prefix = Path(os.path.relpath(index.root.absolute(), root))
        name = _relative_name(Path(index.sources[0]["path"]), root)
        records += [replace(record, rel_path=(prefix / record.rel_path).as_posix(), source=name)
                    for record in index.records]
        warnings += [f"{name}: {warning}" for warning in index.warnings]
        skipped += [row | {"file": (prefix / row["file"]).as_posix()} if "file" in row else row
                    for row in index.skipped]
        described.append(index.sources[0] | {"name": name})
    classes = sorted({record.label for record in records} | {c for index in indexes for c in index.classes})
    return DatasetIndex(root=root, records=records, classes=classes, warnings=warnings, skipped=skipped,
                        sources=described)


def _relative_name(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path.absolute(), root)).as_posix()


def _describe(kind: str, path: Path, records: list[ImageRecord], **extra) -> dict:
    return {"name": path.name, "kind": kind, "path": str(path.absolute()), "images": len(records),
            "classes": dict(sorted(Counter(r.label for r in records).items()))} | extra


def _named(records: list[ImageRecord], name: str) -> list[ImageRecord]:
    return [replace(record, source=name) for record in records]


# ---------------------------------------------------------------------------------------------------------------
# Folder trees


def discover_folder(root: str | os.PathLike) -> DatasetIndex:
    """Find ``ROOT/<class>/*`` or ``ROOT/<split>/<class>/*`` images; classes sorted by name."""
    root = Path(root)
    subdirs = _visible_dirs(root)
    if not subdirs:
        raise DataError(f"{display_name(root)}: no class folders inside "
                        "(expected ROOT/<class>/* or ROOT/Train/<class>/*)")
    split_layout = all(d.name.lower() in SPLIT_NAMES for d in subdirs)
    split_dirs = subdirs if split_layout else [root]
    records: list[ImageRecord] = []
    skipped: list[dict] = []
    warnings: list[str] = []
    class_names: set[str] = set()
    per_split_classes: dict[str, set[str]] = {}
    for split_dir in split_dirs:
        split = split_dir.name if split_layout else ""
        class_dirs = _visible_dirs(split_dir)
        per_split_classes[split] = set()
        if not class_dirs:
            warnings.append(f"{display_name(split_dir)}: no class folders inside")
        for class_dir in class_dirs:
            label = class_dir.name
            class_names.add(label)
            found = _images_in(class_dir, root, label, split, skipped, warnings)
            if found:
                per_split_classes[split].add(label)
            else:
                warnings.append(f"{display_name(class_dir)}: class folder '{label}' holds no images")
            records.extend(found)
    if not records:
        raise DataError(f"{display_name(root)}: no images found under the class folders")
    classes = sorted(class_names)
    warnings.extend(_class_coverage_warnings(classes, per_split_classes))
    records = _named(records, root.name)
    return DatasetIndex(root=root, records=records, classes=classes, warnings=warnings, skipped=skipped,
                        sources=[_describe(FOLDER, root, records, skipped=len(skipped))])


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(class_dir: Path, root: Path, label: str, split: str, skipped: list[dict],
               warnings: list[str]) -> list[ImageRecord]:
    found = []
    for path in sorted(class_dir.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        if has_surrogates(path.name):
            warnings.append(f"{display_name(rel)}: file name is not valid UTF-8 (shown with \\x escapes); "
                            "rename it so manifests and reports can refer to it")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"file": display_name(rel),
                            "error": f"not an image file name (suffix '{path.suffix}'); skipped"})
            continue
        found.append(ImageRecord(path=path, rel_path=rel, label=label, split=split,
                                 image_id=image_id_from_name(path.name)))
    return found


def _class_coverage_warnings(classes: list[str], per_split: dict[str, set[str]]) -> list[str]:
    warnings = []
    if len(classes) < 2:
        warnings.append(f"only one class found ({', '.join(classes)}): a classifier needs at least two")
    train = next((s for s in per_split if s.lower() == "train"), None)
    for split, present in per_split.items():
        if train is None or split == train:
            continue
        for label in sorted(present - per_split[train]):
            warnings.append(f"class '{label}' has images in {split} but none in {train}: a model cannot learn it")
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# CSV manifests


def read_csv_rows(path: Path, what: str = "CSV file") -> tuple[list[str], list[dict]]:
    """(columns, rows) of a UTF-8 CSV file (a byte-order mark is fine); one-line errors for unreadable ones."""
    if path.is_dir():
        raise DataError(f"{display_name(path)}: is a folder, not a {what}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except UnicodeDecodeError as exc:
        raise DataError(f"{display_name(path)}: not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise DataError(f"{display_name(path)}: not a readable CSV file ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{display_name(path)}: cannot read ({exc.strerror or exc})") from exc
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in rows]
    return columns, rows


def read_manifest(manifest: str | os.PathLike, classes: Sequence[str] | None = None,
                  image_root: str | os.PathLike | None = None) -> DatasetIndex:
    """Read a CSV manifest, checking every row before returning; unusable rows raise one DataError naming them all.

    A repeated image id is kept (the audit reports it as a duplicate or a label conflict); the same file listed twice
    with the same label is read once, with a warning."""
    manifest = Path(manifest)
    base = Path(image_root) if image_root else manifest.parent
    allowed = set(classes) if classes is not None else set(ISIC_CLASSES)
    columns, rows = read_csv_rows(manifest, "CSV manifest")
    for required in ("image", "label"):
        if required not in columns:
            has = ", ".join(sorted(c for c in columns if c)) or "no columns"
            raise DataError(f"{display_name(manifest)}: missing column '{required}' (has: {has})")
    if not rows:
        raise DataError(f"{display_name(manifest)}: a header but no rows")
    problems: list[str] = []
    warnings: list[str] = []
    records: list[ImageRecord] = []
    first_row: dict[str, tuple[int, str]] = {}
    for line, row in enumerate(rows, start=2):
        record = _manifest_row(row, line, base, allowed, problems)
        if record is None:
            continue
        if record.rel_path in first_row:
            earlier, label = first_row[record.rel_path]
            if label == record.label:
                warnings.append(f"row {line} repeats row {earlier} ({record.rel_path}); read once")
                continue
            record = replace(record, rel_path=f"{record.rel_path}#row{line}")
        first_row.setdefault(record.rel_path, (line, record.label))
        records.append(record)
    if problems:
        raise DataError(f"{display_name(manifest)}: {len(problems)} unusable row(s):\n  " + _listed(problems))
    records = _named(records, manifest.name)
    return DatasetIndex(root=base, records=records, classes=sorted({r.label for r in records}), warnings=warnings,
                        sources=[_describe(MANIFEST, manifest, records)])


def _listed(problems: list[str]) -> str:
    more = len(problems) - _PROBLEMS_SHOWN
    return "\n  ".join(problems[:_PROBLEMS_SHOWN]) + (f"\n  ... and {more} more" if more > 0 else "")


def _manifest_row(row: dict, line: int, base: Path, allowed: set[str], problems: list[str]) -> ImageRecord | None:
    image = (row.get("image") or "").strip()
    label = (row.get("label") or "").strip()
    where = f"row {line} ({image or 'no image'})"
    if not image:
        problems.append(f"row {line}: empty 'image'")
        return None
    if label not in allowed:
        problems.append(f"{where}: unknown label '{label}' (known: {', '.join(sorted(allowed))})")
        return None
    path = _resolve_manifest_image(image, base)
    if path is None:
        problems.append(f"{where}: file not found under {display_name(base)}")
        return None
    if path.is_dir():
        problems.append(f"{where}: is a folder, not an image file")
        return None
    rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
    return ImageRecord(path=path, rel_path=rel, label=label, split=(row.get("split") or "").strip(),
                       image_id=image_id_from_name(path.name), lesion_id=(row.get("lesion_id") or "").strip() or None,
                       official_source=(row.get("official_label_source") or "").strip())


def _resolve_manifest_image(image: str, base: Path) -> Path | None:
    candidate = Path(image) if Path(image).is_absolute() else base / image
    if candidate.exists():
        return candidate
    stem = Path(image).name
    if image_id_from_name(stem) == stem:
        for suffix in (".jpg", ".jpeg", ".png"):
            if (base / f"{image}{suffix}").is_file():
                return base / f"{image}{suffix}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# ISIC Archive downloads (isic-cli)


def _is_archive_download(folder: Path) -> bool:
    metadata = folder / ARCHIVE_METADATA
    if not metadata.is_file():
        return False
    columns, _ = read_csv_rows(metadata, "metadata.csv")
    return "isic_id" in columns


def archive_diagnosis_table() -> dict[str, str]:
    """Archive diagnosis term (lower case) -> one of the nine classes, or "" for a term deliberately skipped."""
    text = files("melanoma").joinpath("tables/isic_archive_diagnoses.csv").read_text(encoding="utf-8")
    return {row["archive_term"]: row["class"] for row in csv.DictReader(text.splitlines())}


def archive_class(row: dict, table: dict[str, str]) -> tuple[str | None, str]:
    """(class or None, deciding term) for one metadata.csv row: the most specific diagnosis_N cell that the table
    knows decides (an unknown newer term falls back to its parent level); the legacy ``diagnosis`` column is used
    only when no diagnosis_N cell is filled."""
    unknown = ""
    for column in reversed(DIAGNOSIS_COLUMNS):
        term = (row.get(column) or "").strip().lower()
        if not term:
            continue
        if term in table:
            return table[term] or None, term
        unknown = unknown or term
    if unknown:
        return None, unknown
    term = (row.get("diagnosis") or "").strip().lower()
    return (table.get(term) or None), term


def read_archive_download(folder: str | os.PathLike) -> DatasetIndex:
    """An ``isic image download`` folder: images named by ISIC id, metadata.csv, attribution.txt, licenses/."""
    folder = Path(folder)
    metadata = folder / ARCHIVE_METADATA
    _, rows = read_csv_rows(metadata, "metadata.csv")
    images = {image_id_from_name(p.name): p for p in folder.iterdir()
              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}
    table = archive_diagnosis_table()
    records: list[ImageRecord] = []
    skipped: Counter = Counter()
    problems: list[str] = []
    official = f"ISIC Archive diagnosis ({folder.name}/{ARCHIVE_METADATA})"
    for line, row in enumerate(rows, start=2):
        isic_id = (row.get("isic_id") or "").strip()
        image_type = (row.get("image_type") or "").strip()
        label, term = archive_class(row, table)
        if image_type and image_type != DERMOSCOPIC:
            skipped[f"not dermoscopic ({image_type})"] += 1
        elif label is None:
            skipped[f"diagnosis outside the nine classes ({term or 'none given'})"] += 1
        elif isic_id not in images:
            problems.append(f"row {line} ({isic_id or 'no isic_id'}): image file not found in {display_name(folder)}")
        else:
            path = images[isic_id]
            records.append(ImageRecord(path=path, rel_path=path.name, label=label, image_id=isic_id,
                                       lesion_id=(row.get("lesion_id") or "").strip() or None,
                                       official_source=official))
    if problems:
        raise DataError(f"{display_name(metadata)}: {len(problems)} unusable row(s):\n  " + _listed(problems))
    if not records:
        raise DataError(f"{display_name(folder)}: no usable images (skipped: {dict(skipped) or 'nothing'})")
    listed = {r.image_id for r in records} | {(row.get("isic_id") or "").strip() for row in rows}
    warnings = [f"{len(unlisted)} image file(s) without a metadata.csv row, not used (e.g. {sorted(unlisted)[0]})"
                for unlisted in [set(images) - listed] if unlisted]
    records = _named(records, folder.name)
    return DatasetIndex(root=folder, records=records, classes=sorted({r.label for r in records}), warnings=warnings,
                        sources=[_describe(ISIC_ARCHIVE, folder, records, rows=len(rows),
                                           skipped=dict(sorted(skipped.items())), **_attribution(folder, rows))])


def _attribution(folder: Path, rows: list[dict]) -> dict:
    """The download's attribution text and licences, carried into audits and run reports."""
    path = folder / "attribution.txt"
    text = path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else ""
    licences = Counter((row.get("copyright_license") or "").strip() for row in rows)
    licences.pop("", None)
    return {"attribution": text, "licenses": dict(sorted(licences.items()))}


def source_summary(source: dict) -> str:
    """One line per source for the command line: what it is, how many images, what was skipped."""
    skipped = source.get("skipped")
    if isinstance(skipped, dict) and skipped:
        detail = "; skipped " + ", ".join(f"{count} {reason}" for reason, count in skipped.items())
    elif skipped:
        detail = f"; skipped {skipped} non-image file(s)"
    else:
        detail = ""
    return f"{source['name']} ({source['kind']}): {source['images']} images{detail}"
