"""The errors a user reads, gathered from the modules that raised them: each message names the file, flag or field
and what is wrong."""
from __future__ import annotations

from pathlib import Path

from melanoma.core.text import display_name


class RunError(RuntimeError):
    """A run that cannot start, continue or be loaded as asked; nothing already written has been touched."""


class GateError(RuntimeError):
    """A gate file that cannot be used: damaged, of another model, or fitted on too little; one line."""


class ExportError(RuntimeError):
    pass


class PresetError(ValueError):
    pass


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what is wrong."""


class ImageDecodeError(DataError):
    """One image that cannot be decoded."""


class ExplainError(RuntimeError):
    pass


class RunInterrupted(Exception):
    """Training stopped by the user (Ctrl-C); the run folder keeps its last finished epoch."""

    def __init__(self, run_dir: Path):
        super().__init__(f"training interrupted; {display_name(run_dir)} keeps its last finished epoch. Continue "
                         f"with: melanoma train --out {display_name(run_dir)} --resume")
        self.run_dir = run_dir


class WeightsError(ValueError):
    """Weights that cannot be used for this model; the message names the file, the model and what differs."""


class ServeError(ValueError):
    """A serving setting that cannot work; the message names the flag."""


class ModelError(ValueError):
    """A model that cannot be built as asked; the message says why and what would work."""
