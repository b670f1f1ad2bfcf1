"""Guards on a run's files: where a new run or audit may be written (never over its inputs, never replacing
anything but a run folder), and what config.json must hold when read back (the type of every ``TrainConfig`` field),
so that a mistake or a damaged file is one line naming the file and the field, never deleted data or a traceback.

The config.json checks return the problem as text (or None); :func:`melanoma.run.read_run_json` turns it into a
``RunError`` naming the file.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from melanoma.data import display_name
from melanoma.io import read_json


class RunError(RuntimeError):
    """A run that cannot start, continue or be loaded as asked; nothing already written has been touched."""


# Every TrainConfig field by its annotation, exactly as written in melanoma.config (tests/test_run_safety.py keeps the
# two in step): a field added there without a line here fails that test, not a user's run.
_FIELDS_BY_TYPE: dict[str, str] = {
    "list[str]": "data truth metadata",
    "str": "out model protocol test_split accelerator strategy augment_on logger",
    "str | None": "recipe preset balance optimizer schedule weights audit precision tracking_uri image_root external",
    "bool": "clean relabel overwrite resume progress",
    "bool | None": "rendering era_balance tta",
    "int": "bootstrap seed early_stopping num_workers num_nodes",
    "int | None": "epochs image_steps batch_size freeze_epochs freeze_stages image_size split_seed threads",
    "float": "colour_constancy val_fraction target_sensitivity",
    "float | None": "lr weight_decay label_smoothing warmup_epochs backbone_lr_scale ema_decay input_blur",
    "Any": "devices",
}
CONFIG_FIELD_TYPES: dict[str, str] = {name: kind for kind, names in _FIELDS_BY_TYPE.items() for name in names.split()}
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


# ---------------------------------------------------------------------------------------------------------------
# Where a run or an audit may be written


def is_run_folder(path: Path) -> bool:
    """A folder ``melanoma train`` wrote: its config.json reads back as a run's, beside the run's data record,
    checkpoints folder or metrics. Only such a folder (or an empty one) is ever replaced by --overwrite."""
    try:  # the names melanoma.run gives these files
        payload = read_json(path / "config.json")
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(payload, dict) or config_json_problem(payload) is not None:
        return False
    return any((path / name).exists() for name in ("data.json", "checkpoints", "metrics.json"))


def check_replaceable(run_dir: Path) -> None:
    """--overwrite replaces a run folder or an empty folder, never anything else (a data folder, sources, notes)."""
    if run_dir.is_dir() and not run_dir.is_symlink() and any(run_dir.iterdir()) and not is_run_folder(run_dir):
        raise RunError(f"--out {display_name(run_dir)} is not a run folder (no config.json written by melanoma train "
                       "beside its checkpoints); --overwrite only replaces a run folder or an empty one, so nothing "
                       "was deleted: choose another --out")


def check_run_output(out: str | os.PathLike, inputs: Sequence[str], overwrite: bool) -> None:
    """A new run's --out, before any work: not a symbolic link (the run replaces the folder it names, so it would
    fail only at the end), apart from every input (not one of them, inside one or holding one), and with --overwrite
    a run folder or an empty one."""
    run_dir = Path(out)
    if run_dir.is_symlink():
        raise RunError(f"--out {display_name(run_dir)} is a symbolic link (to {display_name(os.readlink(run_dir))}); "
                       "a new run needs a real folder name: give the folder it points to, or another --out")
    check_apart_from_inputs(run_dir, inputs)
    if overwrite:
        check_replaceable(run_dir)


def check_audit_output(out: str | os.PathLike, inputs: Sequence[str]) -> None:
    """``melanoma audit --out``, before any work: apart from every input, and either new, empty or an earlier audit
    folder (one with audit.json), whose files it replaces; never a folder holding anything else."""
    target = Path(out)
    check_apart_from_inputs(target, inputs)
    if target.is_dir() and any(target.iterdir()) and not (target / "audit.json").is_file():
        raise RunError(f"--out {display_name(target)} holds other files and is not an audit folder (no audit.json); "
                       "choose a new or empty folder")


def check_apart_from_inputs(out: Path, inputs: Sequence[str]) -> None:
    """An output is never an input, inside an input folder (a data tree would grow a class or lose files) or a
    folder holding an input (replacing it would delete the data)."""
    where = out.expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if where == source or source in where.parents:
            raise RunError(f"--out {display_name(out)} is inside the input {display_name(given)}; write outputs "
                           "outside the data")
        if where in source.parents:
            raise RunError(f"--out {display_name(out)} holds the input {display_name(given)}; write outputs "
                           "outside the data")
