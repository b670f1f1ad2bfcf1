"""Official ISIC ground truth: HAM10000 metadata, ISIC 2019 and ISIC 2017 label files, mapped to the nine classes.

Some official classes are coarser than the folder classes, so a folder label "agrees" with a set:
- BKL ("benign keratosis-like") covers pigmented benign keratosis and seborrheic keratosis;
- HAM10000's ``akiec`` covers actinic keratosis and intraepithelial carcinoma (Bowen's disease, an SCC in situ),
  which ISIC 2019 files as SCC.
When several files know an image, the sets are intersected and the most specific file names the label (ties go to
HAM10000, then ISIC 2019, then ISIC 2017), whatever order the files were given in.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from melanoma.core.errors import DataError
from melanoma.core.text import display_name
from melanoma.data.csvfiles import printable, read_csv_rows
from melanoma.data.records import ISIC_CLASSES

if TYPE_CHECKING:
    from melanoma.data.records import ImageRecord

AK, BCC, DF, MEL, NV = "actinic keratosis", "basal cell carcinoma", "dermatofibroma", "melanoma", "nevus"
PBK, SK, SCC, VASC = "pigmented benign keratosis", "seborrheic keratosis", "squamous cell carcinoma", "vascular lesion"
_BENIGN_KERATOSES = frozenset({PBK, SK})
_AKIEC = frozenset({AK, SCC})
_HAM_DX = {"akiec": AK, "bcc": BCC, "bkl": PBK, "df": DF, "mel": MEL, "nv": NV, "vasc": VASC}
_ISIC2019 = {"MEL": MEL, "NV": NV, "BCC": BCC, "AK": AK, "BKL": PBK, "DF": DF, "VASC": VASC, "SCC": SCC}
_PRECEDENCE = {"ham10000": 0, "isic2019": 1, "isic2017": 2}
_FOLDER_CODES = {code.lower(): label for code, label in _ISIC2019.items()} | _HAM_DX
ACCEPTED_FOLDER_NAMES = (f"the nine class names ({', '.join(ISIC_CLASSES)}) in any case, with '_' or '-' for "
                         "spaces, or the ISIC 2019 / HAM10000 codes "
                         f"{', '.join(sorted(map(str.upper, _FOLDER_CODES)))}")
# Lesion ids that name one lesion wherever they appear: HAM10000 (HAM_0000118), the ISIC Archive (IL_0000123) and
# the MSK collections' ids as isic-extra carries them (MSK4_0000123). Any other lesion id is a source's own number.
_GLOBAL_LESION_ID = re.compile(r"(?:HAM|IL)_\d+|MSK\d*_\d+")


@dataclass(frozen=True)
class OfficialLabel:
    label: str                      # one of the nine folder classes
    source: str                     # the truth file's name
    agrees_with: frozenset[str]     # folder labels that do not contradict it

    def contradicts(self, folder_label: str) -> bool:
        return folder_label not in self.agrees_with


@dataclass
class GroundTruth:
    labels: dict[str, OfficialLabel] = field(default_factory=dict)
    lesion_ids: dict[str, str] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def label_for(self, image_id: str) -> OfficialLabel | None:
        return self.labels.get(image_id)


def official(label: str, source: str, agrees_with: frozenset[str] | None = None) -> OfficialLabel:
    if agrees_with is None:
        agrees_with = _BENIGN_KERATOSES if label in _BENIGN_KERATOSES else frozenset({label})
    return OfficialLabel(label=label, source=source, agrees_with=agrees_with)


def combine(opinions: list[OfficialLabel]) -> OfficialLabel:
    """One label from several files' opinions (given in precedence order): intersect, most specific names it."""
    agreed = frozenset.intersection(*(o.agrees_with for o in opinions))
    if not agreed:  # the files contradict each other: trust the highest-precedence one
        return opinions[0]
    specific = min(opinions, key=lambda o: len(o.agrees_with))
    return OfficialLabel(label=specific.label, source=specific.source, agrees_with=agreed)


def load_ground_truth(paths: Iterable[str | os.PathLike]) -> GroundTruth:
    """Read the given truth files (format detected from the header) into one table."""
    parsed = []
    for path in paths:
        kind, rows = _read_truth_file(Path(path))
        parsed.append((_PRECEDENCE[kind], Path(path).name, kind, rows))
    truth = GroundTruth()
    opinions: dict[str, list[OfficialLabel]] = {}
    for _, name, kind, rows in sorted(parsed, key=lambda item: item[0]):
        truth.sources.append(name)
        for image_id, opinion, lesion_id in _parse_rows(kind, rows, name):
            if lesion_id and image_id not in truth.lesion_ids:
                truth.lesion_ids[image_id] = lesion_id
            if opinion is not None:
                opinions.setdefault(image_id, []).append(opinion)
    truth.labels = {image_id: combine(found) for image_id, found in opinions.items()}
    return truth


def with_record_labels(truth: GroundTruth | None, records: Sequence["ImageRecord"]) -> GroundTruth | None:
    """``truth`` plus the labels that data sources themselves took from official ground truth (a manifest's
    ``official_label_source`` column, an ISIC Archive download's diagnoses), as one more, lowest-precedence opinion
    per image id. None when there is neither."""
    from_records: dict[str, list[OfficialLabel]] = {}
    for record in records:
        if record.official_source and record.image_id:
            from_records.setdefault(record.image_id, []).append(official(record.label, record.source))
    if not from_records:
        return truth
    merged = GroundTruth(labels=dict(truth.labels) if truth else {}, lesion_ids=dict(truth.lesion_ids) if truth else {},
                         sources=list(truth.sources) if truth else [])
    for image_id, opinions in from_records.items():
        known = merged.labels.get(image_id)
        merged.labels[image_id] = combine(([known] if known else []) + opinions)
    merged.sources += sorted({record.source for record in records if record.official_source} - set(merged.sources))
    return merged


def folder_class(name: str, classes: Iterable[str] = ISIC_CLASSES) -> str | None:
    """The class a class-folder name stands for, or None: a class name itself, the same in any case with '_' or '-'
    for spaces (``Melanoma``, ``basal_cell_carcinoma``), or an ISIC 2019 / HAM10000 code (``MEL``, ``nv``,
    ``AKIEC`` -> actinic keratosis, ``BKL`` -> pigmented benign keratosis, as in ../shared/data/README.md)."""
    classes = list(classes)
    if name in classes:
        return name
    key = " ".join(name.replace("_", " ").replace("-", " ").split()).lower()
    label = {c.lower(): c for c in classes}.get(key) or _FOLDER_CODES.get(key.replace(" ", ""))
    return label if label in classes else None


def scoped_lesion_id(lesion_id: str | None, scope: str) -> str | None:
    """A lesion id as it is compared across sources: a globally meaningful one (``HAM_...``, ``IL_...``,
    ``MSKn_...``) as it is, any other prefixed with its source (``scope:id``), so that two manifests that each number
    their lesions 1..n do not make one lesion of two. None for an empty cell."""
    lesion_id = (lesion_id or "").strip()
    if not lesion_id:
        return None
    return lesion_id if _GLOBAL_LESION_ID.fullmatch(lesion_id) else f"{scope}:{lesion_id}"


def _read_truth_file(path: Path) -> tuple[str, list[dict]]:
    if not path.is_file():
        raise DataError(f"{display_name(path)}: truth file not found")
    names, rows = read_csv_rows(path, "truth file")
    columns = set(names)
    if {"lesion_id", "image_id", "dx"} <= columns:
        return "ham10000", rows
    if {"image", "MEL", "NV", "BKL"} <= columns:
        return "isic2019", rows
    if {"image_id", "melanoma", "seborrheic_keratosis"} <= columns:
        return "isic2017", rows
    raise DataError(f"{display_name(path)}: not a known ISIC truth file (columns: "
                    f"{printable(', '.join(sorted(columns)))}); expected HAM10000 metadata, ISIC 2019 or ISIC 2017 "
                    "ground truth")


def _cell(row: dict, column: str) -> str:
    return (row.get(column) or "").strip()


def _score(row: dict, column: str, name: str, line: int) -> float:
    """A one-hot cell of an ISIC 2019 / 2017 truth file as a number (empty = 0), or a one-line error."""
    try:
        return float(_cell(row, column) or 0)
    except ValueError:
        raise DataError(f"{name}: row {line}: '{column}' is not a number ('{printable(_cell(row, column))}')") from None


def _parse_rows(kind: str, rows: list[dict], name: str):
    for line, row in enumerate(rows, start=2):
        if kind == "ham10000":
            dx = _cell(row, "dx")
            if dx not in _HAM_DX:
                raise DataError(f"{name}: row {line}: unknown dx '{printable(dx)}'")
            agrees = _AKIEC if dx == "akiec" else None
            yield _cell(row, "image_id"), official(_HAM_DX[dx], name, agrees), _cell(row, "lesion_id")
        elif kind == "isic2019":
            hot = [column for column in _ISIC2019 if _score(row, column, name, line) >= 0.5]
            yield _cell(row, "image"), official(_ISIC2019[hot[0]], name) if len(hot) == 1 else None, None
        else:
            if _score(row, "melanoma", name, line) >= 0.5:
                label = MEL
            elif _score(row, "seborrheic_keratosis", name, line) >= 0.5:
                label = SK
            else:
                label = NV
            yield _cell(row, "image_id"), official(label, name), None
