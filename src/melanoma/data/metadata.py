"""Image metadata keyed by ISIC image id (age, sex, anatomic site, skin type, how the diagnosis was confirmed, ...),
read from every source that has it: HAM10000 metadata given as --truth, ISIC Archive downloads' metadata.csv, extra
columns of CSV manifests, and --metadata CSV files for any other data.

Metadata is joined by image id, not by file, so it survives the audit's de-duplication (one record per picture,
whichever copy is kept). Later sources fill in or override earlier ones, in this order: truth files, manifests,
archive downloads, then --metadata files (the user's own word last). A value such as "unknown" or "" counts as not
recorded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from melanoma.core.errors import DataError
from melanoma.core.text import display_name
from melanoma.data.records import image_id_from_name

if TYPE_CHECKING:
    from melanoma.data.records import DatasetIndex

# field -> the column names that carry it (first found wins), across HAM10000, the ISIC Archive and ISIC 2019/2020
ALIASES: dict[str, tuple[str, ...]] = {
    "age": ("age", "age_approx"),
    "sex": ("sex", "gender"),
    "anatomic_site": ("anatomic_site", "anatom_site_general", "anatom_site_general_challenge", "anatom_site_1",
                      "localization", "site"),
    "fitzpatrick": ("fitzpatrick_skin_type", "fitzpatrick", "fitzpatrick_type", "skin_type"),
    "diagnosis_confirmation": ("diagnosis_confirmation", "diagnosis_confirm_type", "dx_type"),
    "image_type": ("image_type",),
    "collection": ("collection", "attribution", "dataset"),
}
FIELDS = tuple(ALIASES)
ID_COLUMNS = ("image_id", "isic_id", "image", "id")
MISSING = frozenset({"", "unknown", "nan", "na", "n/a", "none", "null", "-", "?"})


@dataclass
class Metadata:
    """Metadata per image id, and where it was read from (one entry per file, with counts)."""

    by_id: dict[str, dict[str, str]] = field(default_factory=dict)
    read_from: list[dict] = field(default_factory=list)

    def of(self, image_id: str) -> dict[str, str]:
        return self.by_id.get(image_id, {})

    def add(self, table: dict[str, dict[str, str]]) -> None:
        for image_id, values in table.items():
            self.by_id.setdefault(image_id, {}).update(values)


def id_column(columns: Sequence[str]) -> str | None:
    """The column holding image ids, if any (image_id, isic_id, image or id)."""
    lowered = {c.lower(): c for c in columns}
    return next((lowered[name] for name in ID_COLUMNS if name in lowered), None)


def check_metadata_files(paths: Iterable[str | os.PathLike]) -> None:
    """Refuse a --metadata file that cannot be read or has no image id column, before any work: one line naming it."""
    from melanoma.data.csvfiles import read_csv_rows

    for path in paths:
        path = Path(path)
        if not path.is_file() and not path.is_dir():
            raise DataError(f"{display_name(path)}: --metadata file not found")
        columns, rows = read_csv_rows(path, "--metadata CSV")
        if id_column(columns) is None:
            raise DataError(f"{display_name(path)}: --metadata CSV has no image id column (one of "
                            f"{', '.join(ID_COLUMNS)}; has: {', '.join(c for c in columns if c) or 'no columns'})")
        if not rows:
            raise DataError(f"{display_name(path)}: --metadata CSV has a header but no rows")


def read_metadata_table(path: Path, what: str, id_name: str | None = None) -> tuple[dict[str, dict[str, str]], dict]:
    """(image id -> {field: value}, a description of the file) from one CSV; only the known columns (ALIASES)."""
    from melanoma.data.csvfiles import read_csv_rows

    columns, rows = read_csv_rows(path, what)
    key = id_name or id_column(columns)
    if key is None:
        raise DataError(f"{display_name(path)}: {what} has no image id column (one of {', '.join(ID_COLUMNS)})")
    lowered = {c.lower(): c for c in columns}
    used = {name: next(lowered[a] for a in aliases if a in lowered)
            for name, aliases in ALIASES.items() if any(a in lowered for a in aliases)}
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        raw_id = (row.get(key) or "").strip()
        if not raw_id:
            continue
        values = {name: (row.get(column) or "").strip() for name, column in used.items()}
        table[image_id_from_name(Path(raw_id).name)] = {k: v for k, v in values.items() if v.lower() not in MISSING}
    ignored = sorted(set(columns) - set(used.values()) - {key} - {""})
    return table, {"file": display_name(path), "kind": what, "rows": len(rows), "ids": len(table),
                   "fields": sorted(used), "ignored_columns": ignored}


def load_metadata(index: "DatasetIndex | None", truth: Sequence[str | os.PathLike] = (),
                  extra: Sequence[str | os.PathLike] = ()) -> Metadata:
    """Every source's metadata joined by image id. ``index``: the data sources (manifests' extra columns, archive
    downloads' metadata.csv); ``truth``: --truth files (those with metadata columns, such as HAM10000's, are read);
    ``extra``: --metadata files, whose ids not found in ``index`` are counted (``unknown_ids``), not fatal."""
    from melanoma.data.archive import ARCHIVE_METADATA
    from melanoma.data.csvfiles import read_csv_rows
    from melanoma.data.sources import ISIC_ARCHIVE, MANIFEST

    metadata = Metadata()
    for path in truth:
        columns, _ = read_csv_rows(Path(path), "truth file")
        if id_column(columns) and any(a in {c.lower() for c in columns} for aliases in ALIASES.values()
                                      for a in aliases):
            _add(metadata, Path(path), "truth file")
    for source in (index.sources if index is not None else []):
        if source.get("kind") == MANIFEST:
            _add(metadata, Path(source["path"]), "manifest", id_name="image")
        elif source.get("kind") == ISIC_ARCHIVE:
            _add(metadata, Path(source["path"]) / ARCHIVE_METADATA, "ISIC Archive metadata.csv", id_name="isic_id")
    known = {record.image_id for record in index.records} if index is not None else None
    for path in extra:
        table = _add(metadata, Path(path), "--metadata CSV")
        if known is not None:
            unknown = sorted(set(table) - known)
            metadata.read_from[-1].update(unknown_ids=len(unknown), unknown_examples=unknown[:5])
    return metadata


def _add(metadata: Metadata, path: Path, what: str, id_name: str | None = None) -> dict[str, dict[str, str]]:
    table, described = read_metadata_table(path, what, id_name)
    if described["fields"]:
        metadata.add(table)
    metadata.read_from.append(described)
    return table


def metadata_notes(metadata: Metadata) -> list[str]:
    """One line per --metadata file with ids the data does not have (counted, not fatal)."""
    return [f"{entry['file']}: {entry['unknown_ids']} image id(s) not in the data, ignored "
            f"(e.g. {', '.join(entry['unknown_examples'])})"
            for entry in metadata.read_from if entry.get("unknown_ids")]
