"""Creating a run folder safely: a lock against two trainings in one folder, atomic staging and promotion, so
that a crash never leaves a half-written run."""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from melanoma.core.errors import RunError
from melanoma.core.text import display_name
from melanoma.runs.guards import check_replaceable
from melanoma.runs.layout import CONFIG

# ---------------------------------------------------------------------------------------------------------------
# Creating a run folder


def prepare_run_dir(out: str | os.PathLike, resume: bool, overwrite: bool) -> Path:
    """The run folder to write: an existing one only with --resume (it must hold a config) or --overwrite."""
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{display_name(run_dir)} is a file, not a run folder")
    if resume:
        if not (run_dir / CONFIG).is_file():
            raise RunError(f"{display_name(run_dir)}: nothing to resume (no {CONFIG})")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunError(f"{display_name(run_dir)} already exists; pass --overwrite to replace it or --resume to "
                       "continue it")
    check_replaceable(run_dir)
    return run_dir


@contextmanager
def run_folder_lock(run_dir: Path):
    """Only one process writes a run folder at a time: an exclusive lock on ``.NAME.lock`` beside it, held until the
    run ends (the operating system releases it if the process dies). A second writer stops at once. The lock file
    is removed when the run ends, so a finished run leaves nothing beside its folder."""
    lock_path = run_dir.with_name(f".{run_dir.name}.lock")
    handle = _acquire_lock_file(lock_path, run_dir)
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"melanoma train (pid {os.getpid()})")
        handle.flush()
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)  # while still held, so no one else can hold this inode
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _acquire_lock_file(lock_path: Path, run_dir: Path):
    while True:
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a+")
        except OSError as exc:
            raise RunError(f"cannot write the run folder {display_name(run_dir)}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunError(f"{display_name(run_dir)} is being written by {holder}; wait for it to finish or choose "
                           "another --out") from None
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path)):
                return handle
        except FileNotFoundError:
            pass
        handle.close()  # the previous holder removed this file as we opened it: lock the new one


def staging_dir(run_dir: Path) -> Path:
    """A new run is assembled beside its final place, so a failed start never touches an existing folder."""
    staging = run_dir.with_name(f".{run_dir.name}.starting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def promote_staging(staging: Path, run_dir: Path, overwrite: bool) -> Path:
    if run_dir.exists():
        if not overwrite and any(run_dir.iterdir()):
            raise RunError(f"{display_name(run_dir)} appeared while starting; not overwriting it")
        check_replaceable(run_dir)  # it may have changed while the data was read
        shutil.rmtree(run_dir)
    os.replace(staging, run_dir)
    return run_dir
