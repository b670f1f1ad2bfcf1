"""ISIC Archive downloads (what ``isic image download DIR`` writes): metadata.csv rows to labelled records, the
archive's diagnoses mapped onto the nine classes (``tables/isic_archive_diagnoses.csv``), one image file per ISIC id,
and the attribution and licences to carry into reports. :mod:`melanoma.data.sources` names the records and describes the
source.
"""
from __future__ import annotations

import csv
from collections import Counter
from importlib.resources import files
from pathlib import Path

from melanoma.core.errors import DataError
from melanoma.core.text import display_name
from melanoma.data.csvfiles import listed_problems, printable, read_csv_rows
from melanoma.data.records import IMAGE_SUFFIXES, ImageRecord, image_id_from_name
from melanoma.data.truth import scoped_lesion_id

ARCHIVE_METADATA = "metadata.csv"
DIAGNOSIS_COLUMNS = ("diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5")
DERMOSCOPIC = "dermoscopic"


def archive_diagnosis_table() -> dict[str, str]:
    """ISIC Archive diagnosis term (lower case) -> one of the nine classes, or "" for a term deliberately skipped."""
    text = files("melanoma.data").joinpath("tables/isic_archive_diagnoses.csv").read_text(encoding="utf-8")
    return {row["archive_term"]: row["class"] for row in csv.DictReader(text.splitlines())}


def archive_class(row: dict, table: dict[str, str]) -> tuple[str | None, str]:
    """(class or None, deciding term) for one ISIC Archive metadata.csv row: the most specific diagnosis_N cell that
    the table knows decides (an unknown newer term falls back to its parent level); the legacy ``diagnosis`` column
    is used only when no diagnosis_N cell is filled."""
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


def is_archive_download(folder: Path) -> bool:
    """A folder with a metadata.csv that has an ``isic_id`` column. Where image files sit beside a metadata.csv that
    cannot be read or has no ``isic_id``, that is an error naming the file, not a folder tree without classes."""
    metadata = folder / ARCHIVE_METADATA
    if not metadata.is_file():
        return False
    loose_images = any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    try:
        columns, _ = read_csv_rows(metadata, "metadata.csv")
    except DataError:
        if loose_images:
            raise
        return False  # a folder tree that happens to hold a metadata.csv of its own
    if "isic_id" not in columns and loose_images:
        _require_isic_id(metadata, columns)
    return "isic_id" in columns


def _require_isic_id(metadata: Path, columns: list[str]) -> None:
    if "isic_id" not in columns:
        raise DataError(f"{display_name(metadata)}: no 'isic_id' column (has: "
                        f"{printable(', '.join(c for c in columns if c)) or 'no named columns'}); an ISIC Archive "
                        "download's metadata.csv names each image by its isic_id")


def archive_records(folder: Path) -> tuple[list[ImageRecord], list[str], dict]:
    """(records, warnings, what to add to the source's description) of an ``isic image download`` folder: images
    named by ISIC id, metadata.csv, attribution.txt, licenses/. Rows outside the nine classes and non-dermoscopic
    images are skipped and counted; a listed image whose file is missing stops it, all such rows named at once.

    Where one ISIC id has several image files (``ISIC_0000141.jpg`` and ``ISIC_0000141 (copy).jpg``, or a .jpg and a
    .png), the exact name ``<id>.jpg`` is taken and the others named in a warning; without that file, none of them
    is used (skipped, counted and named). ``image_type`` is compared in any case."""
    metadata = folder / ARCHIVE_METADATA
    columns, rows = read_csv_rows(metadata, "metadata.csv")
    _require_isic_id(metadata, columns)
    listed_ids = {(row.get("isic_id") or "").strip() for row in rows}
    images, ambiguous, warnings = _one_file_per_id(folder, listed_ids)
    table = archive_diagnosis_table()
    records: list[ImageRecord] = []
    skipped: Counter = Counter()
    problems: list[str] = []
    official = f"ISIC Archive diagnosis ({folder.name}/{ARCHIVE_METADATA})"
    scope = display_name(folder.resolve())
    for line, row in enumerate(rows, start=2):
        isic_id = (row.get("isic_id") or "").strip()
        image_type = (row.get("image_type") or "").strip()
        label, term = archive_class(row, table)
        if image_type and image_type.lower() != DERMOSCOPIC:
            skipped[f"not dermoscopic ({printable(image_type)})"] += 1
        elif label is None:
            skipped[f"diagnosis outside the nine classes ({printable(term) or 'none given'})"] += 1
        elif isic_id in ambiguous:
            skipped["several image files for one ISIC id, none named <id>.jpg"] += 1
        elif isic_id not in images:
            problems.append(f"row {line} ({printable(isic_id) or 'no isic_id'}): image file not found in "
                            f"{display_name(folder)}")
        else:
            path = images[isic_id]
            records.append(ImageRecord(path=path, rel_path=path.name, label=label, image_id=isic_id,
                                       lesion_id=scoped_lesion_id(row.get("lesion_id"), scope),
                                       official_source=official))
    if problems:
        raise DataError(f"{display_name(metadata)}: {len(problems)} unusable row(s):\n  " + listed_problems(problems))
    if not records:
        raise DataError(f"{display_name(folder)}: no usable images (skipped: {dict(skipped) or 'nothing'})")
    unlisted = sorted((set(images) | set(ambiguous)) - listed_ids)
    if unlisted:
        warnings.append(f"{len(unlisted)} image file(s) without a metadata.csv row, not used "
                        f"(e.g. {printable(unlisted[0])})")
    return records, warnings, {"rows": len(rows), "skipped": dict(sorted(skipped.items())),
                               **_attribution(folder, rows)}


def _one_file_per_id(folder: Path, listed: set[str]) -> tuple[dict[str, Path], dict[str, list[Path]], list[str]]:
    """(id -> its one image file, id -> its several files when none is exactly ``<id>.jpg``, warnings naming every
    listed id with several files). Files are taken in name order, so the choice never depends on directory order."""
    by_id: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            by_id.setdefault(image_id_from_name(path.name), []).append(path)
    images: dict[str, Path] = {}
    ambiguous: dict[str, list[Path]] = {}
    warnings: list[str] = []
    for image_id, paths in by_id.items():
        exact = next((p for p in paths if p.name == f"{image_id}.jpg"), None)
        if len(paths) == 1 or exact is not None:
            images[image_id] = exact or paths[0]
        else:
            ambiguous[image_id] = paths
        if len(paths) > 1 and image_id in listed:
            names = ", ".join(printable(p.name) for p in paths)
            warnings.append(f"{printable(image_id)}: {len(paths)} image files ({names}); " +
                            (f"took {printable(exact.name)}" if exact is not None else
                             f"none is named {printable(image_id)}.jpg, so none is used: keep one"))
    return images, ambiguous, warnings


def _attribution(folder: Path, rows: list[dict]) -> dict:
    """The download's attribution text and licences, carried into audits and run reports."""
    path = folder / "attribution.txt"
    text = path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else ""
    licences = Counter((row.get("copyright_license") or "").strip() for row in rows)
    licences.pop("", None)
    return {"attribution": text, "licenses": dict(sorted(licences.items()))}
