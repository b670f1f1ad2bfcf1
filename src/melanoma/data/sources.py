"""Data sources: where labelled images come from, one source or several in one run.

Three kinds of source are understood, and any mix of them can be given at once::

    ROOT/<class>/*.jpg  or  ROOT/{Train,Test}/<class>/*.jpg    a folder tree (folder names are split and class)
    FILE.csv                                                  a manifest: image, label[, lesion_id, split,
                                                              official_label_source]
    DIR/metadata.csv + DIR/ISIC_*.jpg                         an ISIC Archive download (``isic image download``)

Every record keeps the name of its source. With several sources, record paths are relative to the folder that holds
them all, so they stay unique. A repeated image id within or across sources is not an error: finding and resolving
copies is the audit's job (:mod:`melanoma.audit.audit`). Only rows that cannot be used at all (a missing file, an
unknown label, an empty image cell, a path leading out of the manifest's folder) stop a manifest, all of them named at
once. Class-folder names are read as the nine classes in any case or as ISIC codes (``MEL``, ``NV``, ...), any other
name stops discovery; lesion ids are scoped by their source unless globally meaningful (``HAM_...``, ``IL_...``).

An ISIC Archive download's diagnoses are mapped onto the nine classes by ``tables/isic_archive_diagnoses.csv``
(docs/data_sources.md explains the choices); rows with a diagnosis outside the nine classes and non-dermoscopic
images are skipped and counted.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from melanoma.core.errors import DataError
from melanoma.core.text import display_name, has_surrogates
from melanoma.data.archive import archive_records, is_archive_download
from melanoma.data.csvfiles import listed_problems, printable, read_csv_rows
from melanoma.data.records import (
    IMAGE_SUFFIXES,
    ISIC_CLASSES,
    SPLIT_NAMES,
    DatasetIndex,
    ImageRecord,
    image_id_from_name,
)
from melanoma.data.truth import ACCEPTED_FOLDER_NAMES, folder_class, scoped_lesion_id

FOLDER, MANIFEST, ISIC_ARCHIVE = "folder", "manifest", "isic-archive"


def load_dataset(sources: str | os.PathLike | Sequence[str | os.PathLike], classes: Sequence[str] | None = None,
                 image_root: str | os.PathLike | None = None) -> DatasetIndex:
    """Discover one data source or several (folders, manifests, ISIC Archive downloads) as one dataset.

    Every path is resolved first (symlinks followed, ``..`` removed), so ``data/base``, ``data/base/../base`` and a
    symlinked alias name the same source, with the same record keys, in the audit and in training. Identical repeated
    rows are read once (counted in one warning), split names are checked, and repeated warnings are capped."""
    given = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(s) for s in sources]
    if not given:
        raise DataError("no data source given")
    paths: list[Path] = []
    for path in given:
        resolved = path.resolve()
        if resolved in paths:
            raise DataError(f"{display_name(path)}: data source given twice (as {display_name(resolved)})")
        paths.append(resolved)
    root = Path(image_root).resolve() if image_root else None
    indexes = [_deduplicated(load_source(path, classes=classes, image_root=root)) for path in paths]
    index = indexes[0] if len(indexes) == 1 else combine(indexes)
    _check_split_names(index)
    index.warnings = capped_warnings(index.warnings)
    return index


_REPEAT_FIELDS = ("path", "label", "split", "lesion_id", "official_source")


def _deduplicated(index: DatasetIndex) -> DatasetIndex:
    """One record per distinct (file, label, split, lesion, official source) of a source: a manifest or metadata.csv
    that repeats an identical row lists one image once; the repeats are counted in one warning."""
    seen: set[tuple] = set()
    kept: list[ImageRecord] = []
    repeats = 0
    for record in index.records:
        identity = tuple(getattr(record, name) for name in _REPEAT_FIELDS)
        if identity in seen:
            repeats += 1
            continue
        seen.add(identity)
        kept.append(record)
    if repeats:
        index.warnings.append(f"{repeats} repeated identical row(s) read once")
        index.records = kept
        index.sources = [index.sources[0] | {"images": len(kept), "repeated_rows": repeats}] + index.sources[1:]
    return index


def _check_split_names(index: DatasetIndex) -> None:
    """Only train, test and a validation split (val, valid, validation) mean something; refuse any other."""
    unknown = Counter((record.source, record.split) for record in index.records
                      if record.split and record.split.lower() not in SPLIT_NAMES)
    if unknown:
        (source, split), count = unknown.most_common(1)[0]
        raise DataError(f"{display_name(source)}: unknown split '{display_name(split)}' ({count} image(s)); "
                        f"accepted: Train, Test, Val/Valid/Validation, or none")


_SHOWN_ALIKE = 20


def capped_warnings(warnings: Sequence[str], shown: int = _SHOWN_ALIKE) -> list[str]:
    """The first ``shown`` warnings of each kind (alike but for numbers and names in brackets), then one line
    '... and N more like it'."""
    import re

    def kind(warning: str) -> str:
        return re.sub(r"\d+", "#", re.sub(r"\([^)]*\)", "()", warning))

    counts: Counter = Counter()
    kept: list[str] = []
    for warning in warnings:
        counts[kind(warning)] += 1
        if counts[kind(warning)] <= shown:
            kept.append(warning)
    examples = {kind(w): w for w in reversed(kept)}
    for alike, count in counts.items():
        if count > shown:
            kept.append(f"... and {count - shown} more like '{examples[alike]}'")
    return kept


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
        records += [replace(record, rel_path=(prefix / record.rel_path).as_posix(), source=name,
                            key=f"{name}:{_within_source(record)}")
                    for record in index.records]
        warnings += [f"{name}: {warning}" for warning in index.warnings]
        skipped += [row | {"file": (prefix / row["file"]).as_posix()} if "file" in row else row
                    for row in index.skipped]
        described.append(index.sources[0] | {"name": name})
    classes = sorted({record.label for record in records} | {c for index in indexes for c in index.classes})
    return DatasetIndex(root=root, records=records, classes=classes, warnings=warnings, skipped=skipped,
                        sources=described)


def _within_source(record: ImageRecord) -> str:
    """The part of a record's key after its source's name (its path in the source, and ``#n`` if repeated)."""
    prefix = f"{record.source}:"
    return record.key[len(prefix):] if record.key.startswith(prefix) else record.rel_path


def _relative_name(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path.absolute(), root)).as_posix()


def _describe(kind: str, path: Path, records: list[ImageRecord], **extra) -> dict:
    return {"name": path.name, "kind": kind, "path": str(path.absolute()), "images": len(records),
            "classes": dict(sorted(Counter(r.label for r in records).items()))} | extra


def _named(records: list[ImageRecord], name: str) -> list[ImageRecord]:
    """Records of one source, named by it, each with its key: source name, path in the source, and ``#n`` for the
    n-th record of one path (an image listed twice with different labels)."""
    seen: Counter = Counter()
    named = []
    for record in records:
        seen[record.rel_path] += 1
        suffix = f"#{seen[record.rel_path]}" if seen[record.rel_path] > 1 else ""
        named.append(replace(record, source=name, key=f"{name}:{record.rel_path}{suffix}"))
    return named


# ---------------------------------------------------------------------------------------------------------------
# Folder trees


def discover_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> DatasetIndex:
    """Find ``ROOT/<class>/*`` or ``ROOT/<split>/<class>/*`` images; classes sorted by name.

    Class-folder names are read as the nine classes (or ``classes``) by :func:`melanoma.data.truth.folder_class`: any
    case, ``_``/``-`` for spaces, ISIC 2019 and HAM10000 codes; what was mapped is said in one warning, and any other
    name stops discovery with the accepted names. An audit or run folder inside the tree (one holding audit.json,
    config.json or clean_manifest.csv) is skipped with a warning."""
    root = Path(root)
    warnings: list[str] = []
    subdirs = _visible_dirs(root, warnings)
    if not subdirs:
        raise DataError(f"{display_name(root)}: no class folders inside "
                        "(expected ROOT/<class>/* or ROOT/Train/<class>/*)")
    split_layout = all(d.name.lower() in SPLIT_NAMES for d in subdirs)
    splits = {d.name: _visible_dirs(d, warnings) for d in subdirs} if split_layout else {"": subdirs}
    labels = _class_folder_labels([d for dirs in splits.values() for d in dirs], root, classes)
    records: list[ImageRecord] = []
    skipped: list[dict] = []
    per_split_classes: dict[str, set[str]] = {}
    for split, class_dirs in splits.items():
        per_split_classes[split] = set()
        if not class_dirs:
            warnings.append(f"{display_name(root / split)}: no class folders inside")
        for class_dir in class_dirs:
            found = _images_in(class_dir, root, labels[class_dir], split, skipped, warnings)
            if found:
                per_split_classes[split].add(labels[class_dir])
            else:
                warnings.append(f"{display_name(class_dir)}: class folder '{printable(class_dir.name)}' holds no "
                                "images")
            records.extend(found)
    if not records:
        raise DataError(f"{display_name(root)}: no images found under the class folders")
    found_classes = sorted(set(labels.values()))
    mapped = dict(sorted({d.name: label for d, label in labels.items() if d.name != label}.items()))
    if mapped:
        warnings.append("class folders read as: " + ", ".join(f"'{printable(name)}' -> {label}"
                                                               for name, label in mapped.items()))
    warnings.extend(_class_coverage_warnings(found_classes, per_split_classes))
    records = _named(records, root.name)
    return DatasetIndex(root=root, records=records, classes=found_classes, warnings=warnings, skipped=skipped,
                        sources=[_describe(FOLDER, root, records, skipped=len(skipped),
                                           **({"class_folders_mapped": mapped} if mapped else {}))])


# the audit folder's audit.json and clean_manifest.csv, a run folder's config.json: spelled here because data sits below
# audit and runs in the layer order; tests/runs/test_layout.py keeps them equal to the names those packages own
RUN_FOLDER_FILES = ("audit.json", "config.json", "clean_manifest.csv")


def _visible_dirs(folder: Path, warnings: list[str] | None = None) -> list[Path]:
    """The folder's sub-folders by name, less hidden ones and audit or run folders (those holding one of
    ``RUN_FOLDER_FILES``: an ``audit --out`` or a run placed inside the data), which are skipped with a warning."""
    found = []
    for path in sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                       key=lambda p: p.name):
        marker = next((name for name in RUN_FOLDER_FILES if (path / name).is_file()), None)
        if marker is None:
            found.append(path)
        elif warnings is not None:
            warnings.append(f"{display_name(path)}: holds {marker}, so it is an audit or run folder, not a class "
                            "folder; skipped")
    return found


def _class_folder_labels(class_dirs: list[Path], root: Path, classes: Sequence[str] | None) -> dict[Path, str]:
    """Each class folder's class; a one-line DataError naming every folder that is no known class."""
    labels = {d: folder_class(d.name, classes if classes is not None else ISIC_CLASSES) for d in class_dirs}
    unknown = sorted({d.relative_to(root).as_posix() for d, label in labels.items() if label is None})
    if unknown:
        accepted = ACCEPTED_FOLDER_NAMES if classes is None else ", ".join(classes)
        names = ", ".join(f"'{printable(name)}'" for name in unknown)
        raise DataError(f"{display_name(root)}: class folder(s) {names} not known; accepted: {accepted}")
    return labels  # type: ignore[return-value]


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


def read_manifest(manifest: str | os.PathLike, classes: Sequence[str] | None = None,
                  image_root: str | os.PathLike | None = None) -> DatasetIndex:
    """Read a CSV manifest, checking every row before returning; unusable rows raise one DataError naming them all.

    Image paths are relative to the manifest's folder, or to ``image_root`` when one is given; a path that leads
    outside that folder (absolute, ``..``, or a symlink pointing out) is an unusable row. A repeated image id is kept
    (the audit reports it as a duplicate or a label conflict); the same file listed twice with the same label is read
    once, with a warning. Lesion ids are scoped by the manifest unless globally meaningful
    (:func:`melanoma.data.truth.scoped_lesion_id`)."""
    manifest = Path(manifest)
    base = Path(image_root) if image_root else manifest.parent
    allowed = set(classes) if classes is not None else set(ISIC_CLASSES)
    columns, rows = read_csv_rows(manifest, "CSV manifest")
    for required in ("image", "label"):
        if required not in columns:
            has = printable(", ".join(sorted(c for c in columns if c))) or "no named columns"
            raise DataError(f"{display_name(manifest)}: missing column '{required}' (has: {has})")
    if not rows:
        raise DataError(f"{display_name(manifest)}: a header but no rows")
    problems: list[str] = []
    warnings: list[str] = []
    records: list[ImageRecord] = []
    first_row: dict[str, tuple[int, str]] = {}
    repeats: Counter = Counter()
    scope = display_name(manifest.resolve())
    # a manifest may list one file many times: look each distinct name up on disk once
    locate = functools.lru_cache(maxsize=None)(lambda image: _locate_image(image, base))
    for line, row in enumerate(rows, start=2):
        record = _manifest_row(row, line, base, allowed, problems, scope, locate)
        if record is None:
            continue
        if record.rel_path in first_row:
            earlier, label = first_row[record.rel_path]
            if label == record.label:
                repeats[(earlier, record.rel_path)] += 1
                continue
            record = replace(record, rel_path=f"{record.rel_path}#row{line}")
        first_row.setdefault(record.rel_path, (line, record.label))
        records.append(record)
    if problems:
        raise DataError(f"{display_name(manifest)}: {len(problems)} unusable row(s):\n  " + listed_problems(problems))
    warnings += [f"row {earlier} ({printable(rel_path)}) is repeated by {count} later row(s) with the same label; "
                 "read once" for (earlier, rel_path), count in repeats.items()]
    records = _named(records, manifest.name)
    return DatasetIndex(root=base, records=records, classes=sorted({r.label for r in records}), warnings=warnings,
                        sources=[_describe(MANIFEST, manifest, records)])


def _manifest_row(row: dict, line: int, base: Path, allowed: set[str], problems: list[str], scope: str = "",
                  locate: Callable[[str], tuple[Path | None, str]] | None = None) -> ImageRecord | None:
    image = (row.get("image") or "").strip()
    label = (row.get("label") or "").strip()
    if not image:
        problems.append(f"row {line}: empty 'image'")
        return None
    where = f"row {line} ({printable(image)})"
    if not label:
        problems.append(f"{where}: empty 'label'")
        return None
    if label not in allowed:
        problems.append(f"{where}: unknown label '{printable(label)}' (known: {', '.join(sorted(allowed))})")
        return None
    path, found = (locate or (lambda name: _locate_image(name, base)))(image)
    if path is None:
        problems.append(f"{where}: {found}")
        return None
    return ImageRecord(path=path, rel_path=found, label=label, split=(row.get("split") or "").strip(),
                       image_id=image_id_from_name(path.name), lesion_id=scoped_lesion_id(row.get("lesion_id"), scope),
                       official_source=(row.get("official_label_source") or "").strip())


def _locate_image(image: str, base: Path) -> tuple[Path | None, str]:
    """(the file a manifest's ``image`` cell names, its path relative to ``base``), or (None, why it cannot be
    read)."""
    path = _resolve_manifest_image(image, base)
    if path is not None and not _inside(path, base):
        return None, (f"lies outside {display_name(base)} (an absolute path, '..' or a symlink leading out); a "
                      "manifest reads only files under its own folder or under an explicit --image-root")
    if path is None or not path.exists():
        return None, f"file not found under {display_name(base)}"
    if path.is_dir():
        return None, "is a folder, not an image file"
    return path, Path(os.path.relpath(os.path.abspath(path), os.path.abspath(base))).as_posix()


def _resolve_manifest_image(image: str, base: Path) -> Path | None:
    """The file a manifest's ``image`` cell names: a path (relative to ``base``), or an ISIC id without a suffix.
    A path that leads outside ``base`` is returned as it is, for the caller to refuse before looking at it."""
    candidate = Path(image) if Path(image).is_absolute() else base / image
    if candidate.exists() or not _inside(candidate, base):
        return candidate
    stem = Path(image).name
    if image_id_from_name(stem) == stem:
        for suffix in (".jpg", ".jpeg", ".png"):
            if (base / f"{image}{suffix}").is_file():
                return base / f"{image}{suffix}"
    return None


def _inside(path: Path, base: Path) -> bool:
    """Whether ``path`` lies under ``base`` both as written (no absolute path or ``..`` leading out) and once symlinks
    are followed."""
    return (Path(os.path.abspath(path)).is_relative_to(os.path.abspath(base))
            and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(base)))


# ---------------------------------------------------------------------------------------------------------------
# ISIC Archive downloads (isic-cli)


def _is_archive_download(folder: Path) -> bool:
    return is_archive_download(folder)


def read_archive_download(folder: str | os.PathLike) -> DatasetIndex:
    """An ``isic image download`` folder (:func:`melanoma.data.archive.archive_records`) as one source."""
    folder = Path(folder)
    records, warnings, described = archive_records(folder)
    records = _named(records, folder.name)
    return DatasetIndex(root=folder, records=records, classes=sorted({r.label for r in records}), warnings=warnings,
                        sources=[_describe(ISIC_ARCHIVE, folder, records, **described)])


def source_summary(source: dict) -> str:
    """One line per source for the command line: what it is, how many images, what was skipped."""
    skipped = source.get("skipped")
    if isinstance(skipped, dict) and skipped:
        detail = "; skipped " + ", ".join(f"{count} {reason}" for reason, count in skipped.items())
    elif skipped:
        detail = f"; skipped {skipped} non-image file(s)"
    else:
        detail = ""
    if mapped := source.get("class_folders_mapped"):
        detail += "; class folders read as " + ", ".join(f"{name} -> {label}" for name, label in mapped.items())
    return f"{source['name']} ({source['kind']}): {source['images']} images{detail}"
