"""Guards on a run's files: where a new run or audit may be written (never over its inputs, never replacing
anything but a run folder), and what config.json must hold when read back (the type of every ``TrainConfig`` field),
so that a mistake or a damaged file is one line naming the file and the field, never deleted data or a traceback.

The config.json checks return the problem as text (or None); :func:`melanoma.runs.layout.read_run_json` turns it into a
``RunError`` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from melanoma.audit.report import AUDIT_JSON
from melanoma.core.errors import RunError
from melanoma.core.io import read_json
from melanoma.core.text import display_name
from melanoma.runs.layout import CHECKPOINT_DIR, CONFIG, DATA, METRICS, config_json_problem

# ---------------------------------------------------------------------------------------------------------------
# Where a run or an audit may be written


def is_run_folder(path: Path) -> bool:
    """A folder ``melanoma train`` wrote: its config.json reads back as a run's, beside the run's data record,
    checkpoints folder or metrics. Only such a folder (or an empty one) is ever replaced by --overwrite."""
    try:
        payload = read_json(path / CONFIG)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(payload, dict) or config_json_problem(payload) is not None:
        return False
    return any((path / name).exists() for name in (DATA, CHECKPOINT_DIR, METRICS))


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
    if target.is_dir() and any(target.iterdir()) and not (target / AUDIT_JSON).is_file():
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
