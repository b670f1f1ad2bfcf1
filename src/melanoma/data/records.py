"""Labelled images: the record of one image and its source, the dataset index, the nine ISIC classes, ISIC ids
and acquisition eras."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

NO_MELANOMA_CLASS = "this run has no melanoma class: no melanoma alert and no p(melanoma) (melanoma_alert left empty)"


def melanoma_notice(classes: Sequence[str]) -> str | None:
    """The one-line notice for a run whose classes lack melanoma (it must not look as if it could alert), else None."""
    return None if MELANOMA in classes else NO_MELANOMA_CLASS

ISIC_CLASSES: tuple[str, ...] = (
    "actinic keratosis",
    "basal cell carcinoma",
    "dermatofibroma",
    "melanoma",
    "nevus",
    "pigmented benign keratosis",
    "seborrheic keratosis",
    "squamous cell carcinoma",
    "vascular lesion",
)
MELANOMA = "melanoma"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
VALIDATION_SPLITS = frozenset({"val", "valid", "validation"})
SPLIT_NAMES = frozenset({"train", "test"}) | VALIDATION_SPLITS
_ISIC_ID = re.compile(r"ISIC_\d{7}")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    rel_path: str                   # unique within the dataset; relative to DatasetIndex.root
    label: str
    split: str = ""                 # "" = a training pool with no split of its own
    image_id: str = ""
    lesion_id: str | None = None
    source: str = ""                # the data source it came from (see melanoma.data.sources)
    official_source: str = ""       # where its label came from when that is official ground truth, else ""
    key: str = ""                   # unique across every source of a run: "<source name>:<path in source>[#n]"

    @property
    def identity(self) -> str:
        """The key that tells this record apart from every other of the run (the path, for a record made by hand)."""
        return self.key or self.rel_path

    @property
    def is_validation(self) -> bool:
        return self.split.lower() in VALIDATION_SPLITS

    @property
    def is_test(self) -> bool:
        return self.split.lower() == "test"

    @property
    def is_train(self) -> bool:
        return self.split.lower() == "train"

    @property
    def in_training_pool(self) -> bool:
        """Train-split images, and images of a source with no splits (a pool to train on, never held out)."""
        return self.is_train or not self.split


@dataclass
class DatasetIndex:
    """Every labelled image found, the sorted class list, and problems that did not stop discovery.

    ``root`` is the folder every ``rel_path`` is relative to: the source itself, or the folder holding all sources.
    ``sources`` describes each source (name, kind, path, counts, what was skipped, attribution)."""

    root: Path
    records: list[ImageRecord]
    classes: list[str]
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records})

    def in_split(self, split: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split.lower() == split.lower()]


def image_id_from_name(name: str) -> str:
    """The ISIC id inside a file name (``ISIC_0025509(1).jpg`` -> ``ISIC_0025509``), else the file stem."""
    match = _ISIC_ID.search(name)
    return match.group(0) if match else Path(name).stem


ARCHIVE_ERA_BELOW = 24_306  # ISIC_0000000-ISIC_0024305: the ISIC archive before HAM10000 (the 2016-17 challenges)
HAM10000_ERA_BELOW = 34_321  # ISIC_0024306-ISIC_0034320: HAM10000 (ViDIR Vienna, Rosendahl Queensland)
ERAS = ("2016-17 archive", "HAM10000", "later")


# Blocks of ISIC ids that are collections of their own (clinic, camera, framing): the early archive; the wide-field
# MSK-type images of the ISIC 2017 challenge (often a small lesion in a wide dermoscope field, a ruler or a sticker),
# where the model is weakest; the rest of the archive before HAM10000; HAM10000's lesion-centred crops; the BCN/MSK
# additions after it. (name, first id of the next block)
ID_BLOCKS: tuple[tuple[str, int | None], ...] = (
    ("ISIC_0000000-0011999", 12_000), ("ISIC_0012000-0015999", 16_000), ("ISIC_0016000-0024305", 24_306),
    ("ISIC_0024306-0034320", 34_321), ("ISIC_0034321 and later", None))
NO_ISIC_ID = "no ISIC id"
COLLECTIONS = tuple(name for name, _ in ID_BLOCKS) + (NO_ISIC_ID,)


def _isic_number(name: str) -> int | None:
    digits = image_id_from_name(Path(name).name).removeprefix("ISIC_")[:7]
    return int(digits) if digits.isdigit() else None


def id_block(name: str) -> str:
    """The collection block (:data:`ID_BLOCKS`) an image belongs to by its ISIC id; :data:`NO_ISIC_ID` without one."""
    number = _isic_number(name)
    if number is None:
        return NO_ISIC_ID
    return next(block for block, below in ID_BLOCKS if below is None or number < below)


def acquisition_era(name: str) -> str:
    """The collection an ISIC image came from, by its id: '2016-17 archive' (ids below 0024306: the archive's
    images of the ISIC 2016 and 2017 challenges), 'HAM10000' (0024306-0034320), else 'later' (the BCN20000 and MSK
    additions of ISIC 2019 and after, and any file without an ISIC id).

    The collections come from different clinics and dermatoscopes, and in this dataset the classes are spread
    unevenly over them (most nevi are old, most melanomas are not), so the era is a shortcut a model can learn for
    the class; validation within one era shows what is left without it.
    """
    number = _isic_number(name)
    if number is None:
        return ERAS[-1]
    return ERAS[0] if number < ARCHIVE_ERA_BELOW else ERAS[1] if number < HAM10000_ERA_BELOW else ERAS[2]
