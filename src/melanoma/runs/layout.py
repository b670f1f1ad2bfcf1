"""The run folder's layout: every file name a run holds, and the one reader of each (config.json with the type
of every ``TrainConfig`` field checked, metrics.json, history.csv, split.csv), each failing with one line naming the
file."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import numpy as np

from melanoma.config import TrainConfig
from melanoma.core.errors import RunError
from melanoma.core.io import read_json
from melanoma.core.text import display_name
from melanoma.data.images import build_cache
from melanoma.data.records import ImageRecord

# Every TrainConfig field's annotation as written in melanoma.config (``from __future__ import annotations`` keeps it a
# string such as "int | None"), checked when config.json is read back
CONFIG_FIELD_TYPES: dict[str, str] = {spec.name: spec.type for spec in fields(TrainConfig)}
_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "None": "null",
          "list[str]": "a list of strings", "Any": "any value"}


def value_fits(value, annotation: str) -> bool:
    """Whether a JSON value fits an annotation such as ``int | None`` or ``list[str]``."""
    for kind in annotation.split(" | "):
        if kind == "Any" or (kind == "None" and value is None) or (kind == "str" and isinstance(value, str)) \
                or (kind == "bool" and isinstance(value, bool)) \
                or (kind == "int" and isinstance(value, int) and not isinstance(value, bool)) \
                or (kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value)) \
                or (kind == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return True
    return False


def expected(annotation: str) -> str:
    return " or ".join(_WORDS.get(kind, kind) for kind in annotation.split(" | "))


def config_section_problem(section: dict, prefix: str = "config.") -> str | None:
    """The first TrainConfig field in ``section`` whose value has the wrong type; absent fields take their defaults
    (a run written before the field existed), unknown ones are ignored, but ``data`` and ``out`` must be there."""
    for name in ("data", "out"):
        if name not in section:
            return f"field '{prefix}{name}' is missing"
    data = section["data"]
    if isinstance(data, str):  # one source, as config.json recorded it before several were possible
        data = [data]
    if not value_fits(data, "list[str]") or not data or not all(data):
        return f"field '{prefix}data' is {_shown(section['data'])}, expected a non-empty list of data source paths"
    for name, annotation in CONFIG_FIELD_TYPES.items():
        if name != "data" and name in section and not value_fits(section[name], annotation):
            return f"field '{prefix}{name}' is {_shown(section[name])}, expected {expected(annotation)}"
    return None


def config_json_problem(payload: dict) -> str | None:
    """config.json as ``melanoma train`` writes it: a ``config`` section of TrainConfig fields, the model's name, the
    class names, and (where present) the command, the data fingerprint and the list of resumes."""
    if not isinstance(payload.get("config"), dict):
        return "no 'config' section"
    model = payload.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        return f"field 'model.name' is {_shown(model.get('name') if isinstance(model, dict) else model)}, " \
               "expected the model's name"
    classes = payload.get("classes")
    if not value_fits(classes, "list[str]") or len(classes) < 2 or len(set(classes)) != len(classes):
        return f"field 'classes' is {_shown(classes)}, expected a list of two or more distinct class names"
    for name, kind, word in (("command", str, "a string"), ("data_fingerprint", str, "a string"),
                             ("preprocessing", dict, "an object"), ("resumes", list, "a list")):
        value = payload.get(name)
        if value is not None and not isinstance(value, kind):
            return f"field '{name}' is {_shown(value)}, expected {word}"
    return config_section_problem(payload["config"])


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What a run folder holds (melanoma train writes it; docs/training.md describes each file)
CONFIG = "config.json"            # the resolved TrainConfig, classes, preprocessing, data fingerprint, resumes
DATA = "data.json"                # what the data preparation did: sources, counts, the data root
SPLIT = "split.csv"               # which image trained, validated or was held out (SPLIT_COLUMNS)
SPLIT_COLUMNS = ("path", "label", "role", "source", "key")
HISTORY = "history.csv"
METRICS = "metrics.json"
TEST_PREDICTIONS = "test_predictions.csv"
CURVES = "curves.png"
CONFUSION, ROC, PR, RELIABILITY = "confusion.png", "roc.png", "pr.png", "reliability.png"  # evaluate writes these too
REPORT = "report.html"
AUDIT_DIR = "audit"               # the run's own audit, when it was not given one with --audit
CHECKPOINT_DIR = "checkpoints"
BEST = "best.pt"
LAST = "last.ckpt"
ONNX_FILE = "model.onnx"


def read_run_json(path: Path, require: str | None = None) -> dict:
    """A run's JSON file (config.json, metrics.json, data.json), or a one-line RunError saying what is wrong;
    ``require`` names a section that must be there."""
    if not path.is_file():
        raise RunError(f"{display_name(path)}: not found; is {display_name(path.parent)} a finished run folder?")
    try:
        payload = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(f"{display_name(path)}: not valid JSON ({exc}); the run folder is damaged") from exc
    if not isinstance(payload, dict) or (require is not None and not isinstance(payload.get(require), dict)):
        raise RunError(f"{display_name(path)}: not a melanoma {path.name}"
                       + (f" (no '{require}' section)" if require else ""))
    if path.name == CONFIG and (problem := config_json_problem(payload)):
        raise RunError(f"{display_name(path)}: {problem}; the file is damaged (restore it, or start again with "
                       "--overwrite)")
    return payload


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / HISTORY
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                    for row in csv.DictReader(handle)]
        for row in rows:
            row["epoch"] = int(row["epoch"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        reason = f"no {exc} column" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:120]
        raise RunError(f"{display_name(path)}: not a melanoma {HISTORY} ({reason}); the run folder is damaged") \
            from None
    return rows


# ---------------------------------------------------------------------------------------------------------------
# split.csv and the run's audit


def read_split(run_dir: str | os.PathLike, roles: Sequence[str] | None = None) -> list[dict]:
    """split.csv's rows (of ``roles`` only, when given): the one reader of that file; a one-line RunError where the
    run has none."""
    path = Path(run_dir) / SPLIT
    if not path.is_file():
        raise RunError(f"{display_name(path)}: not found; is {display_name(Path(run_dir))} a finished run folder? (it "
                       "says which images the run trained on)")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return [row for row in csv.DictReader(handle) if roles is None or row.get("role") in roles]


def audit_folder(run_config: dict, run_dir: Path) -> Path:
    """Where a run's audit lies: its --audit folder (or that clean_manifest.csv's folder), else the run's own."""
    given = run_config.get("audit")
    if given:
        path = Path(given)
        return path if path.is_dir() else path.parent
    return Path(run_dir) / AUDIT_DIR


def run_split(run_dir: Path, role: str, image_size: int) -> tuple[list[str], np.ndarray, np.ndarray, Path]:
    """A finished run's images of one split role (``val``, ``train``) from its split.csv and data.json: names,
    label indices, images decoded at ``image_size`` as training decoded them, and the data root."""
    root = Path(read_run_json(Path(run_dir) / DATA).get("root") or ".")
    rows = read_split(run_dir, (role,))
    records = [ImageRecord(path=root / row["path"], rel_path=row["path"], label=row["label"]) for row in rows]
    cache = build_cache(records, size=image_size, workers=min(4, os.cpu_count() or 1))
    if cache.errors:
        raise RunError(f"{display_name(run_dir)}: {len(cache.errors)} {role} image(s) no longer readable, e.g. "
                       f"{next(iter(cache.errors.values()))}")
    return [row["path"] for row in rows], np.array([int(row["label"]) for row in rows]), cache.images, root


def trained_files(run_dir: Path) -> set[str]:
    """The files a run trained on (split.csv role 'train')."""
    return {row["path"] for row in read_split(run_dir, ("train",))}
