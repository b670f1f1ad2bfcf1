"""Labelled-image discovery (folder trees and CSV manifests), safe image decoding and the in-memory image cache.

Folder layouts understood::

    ROOT/<class>/*.jpg                  one split
    ROOT/{Train,Test}/<class>/*.jpg     several splits (folder names kept as split names)

A CSV manifest has columns ``image`` (a path, relative to the manifest's folder or ``image_root``, or an ISIC id),
``label`` and optionally ``lesion_id`` and ``split``.
"""
from __future__ import annotations

import csv
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation"})
# 50 megapixels is ~10x the largest dermoscopy originals in the ISIC archive; anything bigger is refused before
# decoding so that a crafted file cannot exhaust memory (a "decompression bomb").
DEFAULT_MAX_PIXELS = 50_000_000
_ISIC_ID = re.compile(r"ISIC_\d{7}")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what is wrong."""


class ImageDecodeError(DataError):
    """One image that cannot be decoded."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    rel_path: str
    label: str
    split: str = ""
    image_id: str = ""
    lesion_id: str | None = None

    @property
    def is_test(self) -> bool:
        return self.split.lower() == "test"

    @property
    def is_train(self) -> bool:
        return self.split.lower() == "train"


@dataclass
class DatasetIndex:
    """Every labelled image found, the sorted class list, and problems that did not stop discovery."""

    root: Path
    records: list[ImageRecord]
    classes: list[str]
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records})

    def in_split(self, split: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split.lower() == split.lower()]


def image_id_from_name(name: str) -> str:
    """The ISIC id inside a file name (``ISIC_0025509(1).jpg`` -> ``ISIC_0025509``), else the file stem."""
    match = _ISIC_ID.search(name)
    return match.group(0) if match else Path(name).stem


ARCHIVE_ERA_BELOW = 10_000  # ISIC_0000000-ISIC_0009999: the archive's oldest images (2016-2017 challenge era)
ERAS = ("archive 2016-17", "later")


def acquisition_era(name: str) -> str:
    """'archive 2016-17' for the ISIC archive's oldest images (id below 0010000), else 'later'.

    The oldest images come from other clinics and cameras than the later ones (HAM10000, BCN), and in this dataset
    almost all nevi are old while most melanomas are not, so the era is a shortcut a model can learn for the class.
    """
    digits = image_id_from_name(Path(name).name).removeprefix("ISIC_")[:7]
    return ERAS[0] if digits.isdigit() and int(digits) < ARCHIVE_ERA_BELOW else ERAS[1]


def display_name(path: str | os.PathLike) -> str:
    """A printable file name, with undecodable bytes shown as escapes instead of crashing a print."""
    text = os.fspath(path)
    if not _has_surrogates(text):
        return text
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def load_dataset(source: str | os.PathLike, classes: Sequence[str] | None = None,
                 image_root: str | os.PathLike | None = None) -> DatasetIndex:
    """Discover a dataset from a folder tree or a CSV manifest."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{display_name(source)}: no such file or folder")
    if source.is_dir():
        return discover_folder(source)
    if source.suffix.lower() == ".csv":
        return read_manifest(source, classes=classes, image_root=image_root)
    raise DataError(f"{display_name(source)}: expected a folder of class folders or a .csv manifest")


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
    return DatasetIndex(root=root, records=records, classes=classes, warnings=warnings, skipped=skipped)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(class_dir: Path, root: Path, label: str, split: str, skipped: list[dict],
               warnings: list[str]) -> list[ImageRecord]:
    found = []
    for path in sorted(class_dir.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        if _has_surrogates(path.name):
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


def read_manifest(manifest: str | os.PathLike, classes: Sequence[str] | None = None,
                  image_root: str | os.PathLike | None = None) -> DatasetIndex:
    """Read a CSV manifest, checking every row before returning; any unusable row raises DataError naming it."""
    manifest = Path(manifest)
    base = Path(image_root) if image_root else manifest.parent
    allowed = set(classes) if classes is not None else set(ISIC_CLASSES)
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError as exc:
        raise DataError(f"{display_name(manifest)}: not UTF-8 text ({exc.reason})") from exc
    columns = set(rows[0]) if rows else set()
    for required in ("image", "label"):
        if required not in columns:
            has = ", ".join(sorted(columns)) or "nothing"
            raise DataError(f"{display_name(manifest)}: missing column '{required}' (has: {has})")
    problems: list[str] = []
    records: list[ImageRecord] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        record = _manifest_row(row, line, base, allowed, seen, problems)
        if record is not None:
            records.append(record)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{display_name(manifest)}: {len(problems)} unusable row(s):\n  {shown}")
    if not records:
        raise DataError(f"{display_name(manifest)}: no rows")
    return DatasetIndex(root=base, records=records, classes=sorted({r.label for r in records}))


def _manifest_row(row: dict, line: int, base: Path, allowed: set[str], seen: dict[str, int],
                  problems: list[str]) -> ImageRecord | None:
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
    image_id = image_id_from_name(path.name)
    key = f"{(row.get('split') or '').strip()}/{image_id}"
    if key in seen:
        problems.append(f"{where}: duplicate id '{image_id}' (also on row {seen[key]})")
        return None
    seen[key] = line
    rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
    return ImageRecord(path=path, rel_path=rel, label=label, split=(row.get("split") or "").strip(),
                       image_id=image_id, lesion_id=(row.get("lesion_id") or "").strip() or None)


def _resolve_manifest_image(image: str, base: Path) -> Path | None:
    candidate = Path(image) if Path(image).is_absolute() else base / image
    if candidate.is_file():
        return candidate
    if _ISIC_ID.fullmatch(image):
        for suffix in (".jpg", ".jpeg", ".png"):
            if (base / f"{image}{suffix}").is_file():
                return base / f"{image}{suffix}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Decoding


@dataclass
class DecodedImage:
    pixels: np.ndarray  # H x W x 3 uint8, EXIF orientation applied
    notes: list[str]    # what was done to make it RGB (alpha flattened, 16-bit scaled, ...)
    original_mode: str
    original_size: tuple[int, int]


def decode_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None) -> DecodedImage:
    """Decode any supported image to RGB uint8, or raise ImageDecodeError naming the file and the problem."""
    label = name or (display_name(source) if not isinstance(source, bytes) else "<upload>")
    if not isinstance(source, bytes) and os.path.getsize(source) == 0:
        raise ImageDecodeError(f"{label}: empty file (0 bytes)")
    if isinstance(source, bytes) and not source:
        raise ImageDecodeError(f"{label}: empty file (0 bytes)")
    try:
        with Image.open(_as_file(source)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"{label}: {width}x{height} pixels exceeds the {max_pixels:,}-pixel limit "
                                       "(possible decompression bomb); refused")
            mode = image.mode
            image.load()
            rotated = _was_rotated(image)
            pixels, notes = _to_rgb_uint8(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{label}: too many pixels (possible decompression bomb); refused") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{label}: not an image (unrecognised format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{label}: truncated or corrupt image data ({exc})") from exc
    if rotated:
        notes.append("EXIF orientation applied")
    return DecodedImage(pixels=pixels, notes=notes, original_mode=mode, original_size=(width, height))


def _as_file(source: str | os.PathLike | bytes):
    import io

    return io.BytesIO(source) if isinstance(source, bytes) else source


def _was_rotated(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # a broken EXIF block is not worth failing a decode over
        return False


def _to_rgb_uint8(image: Image.Image) -> tuple[np.ndarray, list[str]]:
    mode = image.mode
    notes: list[str] = []
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 or mode.startswith("I;16") else 1.0
        gray = np.clip(np.round(values / scale), 0, 255).astype(np.uint8)
        notes.append(f"{mode} (16-bit) scaled to 8-bit")
        return np.repeat(gray[..., None], 3, axis=2), notes
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        notes.append("32-bit float image clipped to 8-bit")
        return np.repeat(gray[..., None], 3, axis=2), notes
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        # Flatten on black: dermoscopy borders are dark, so transparent padding looks like the usual vignette.
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
        notes.append(f"{mode} with alpha flattened onto black")
    elif mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy(), notes


def resize_pixels(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 array to ``size`` (square int or (width, height)) with bicubic resampling."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    if pixels.shape[1::-1] == target:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize(target, Image.Resampling.BICUBIC), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# In-memory cache


@dataclass
class ImageCache:
    """All images of a dataset decoded once into one N x H x W x 3 uint8 array (about its raw size in memory)."""

    records: list[ImageRecord]
    images: np.ndarray
    errors: dict[int, str]

    @property
    def ok_indices(self) -> list[int]:
        return [i for i in range(len(self.records)) if i not in self.errors]

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


def build_cache(records: Sequence[ImageRecord], size: int = 180, workers: int | None = None,
                progress: Callable[[Iterable], Iterable] | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCache:
    """Decode every record once with a thread pool (PIL releases the GIL while decoding)."""
    records = list(records)
    images = np.zeros((len(records), size, size, 3), dtype=np.uint8)
    errors: dict[int, str] = {}

    def load(index: int) -> None:
        try:
            images[index] = resize_pixels(decode_image(records[index].path, max_pixels=max_pixels,
                                                       name=records[index].rel_path).pixels, size)
        except ImageDecodeError as exc:
            errors[index] = str(exc)

    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(load, range(len(records)))
        for _ in (progress(results) if progress else results):
            pass
    return ImageCache(records=records, images=images, errors=errors)
