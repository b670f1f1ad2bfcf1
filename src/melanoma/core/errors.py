"""The errors a user reads: every one derives from :class:`MelanomaError`, which the CLI prints as one line
(exit code 2); each message names the file, flag or field and what is wrong. Each also keeps the built-in base it
had (``ValueError`` for bad input, ``RuntimeError`` for a state that cannot go on), so callers may catch either."""
from __future__ import annotations

from pathlib import Path

from melanoma.core.text import display_name


class MelanomaError(Exception):
    """A problem the user can fix, told in one line: the CLI prints it and exits with code 2."""


# ---- input that cannot be used


class DataError(MelanomaError, ValueError):
    """Input data that cannot be used; the message names the file and what is wrong."""


class ImageDecodeError(DataError):
    """One image that cannot be decoded."""


class PresetError(MelanomaError, ValueError):
    """An augmentation preset that does not exist."""


class ModelError(MelanomaError, ValueError):
    """A model that cannot be built as asked; the message says why and what would work."""


class WeightsError(MelanomaError, ValueError):
    """Weights that cannot be used for this model; the message names the file, the model and what differs."""


class ServeError(MelanomaError, ValueError):
    """A serving setting that cannot work; the message names the flag."""


# ---- a run, a gate or an artefact that cannot be used as asked


class RunError(MelanomaError, RuntimeError):
    """A run that cannot start, continue or be loaded as asked; nothing already written has been touched."""


class GateError(MelanomaError, RuntimeError):
    """A gate file that cannot be used: damaged, of another model, or fitted on too little; one line."""


class ExportError(MelanomaError, RuntimeError):
    """A model that cannot be exported, or whose export does not match PyTorch."""


class ExplainError(MelanomaError, RuntimeError):
    """A model that Grad-CAM cannot explain (no convolution with a spatial map)."""


# ---- not an error: the user stopped training


class RunInterrupted(Exception):
    """Training stopped by the user (Ctrl-C); the run folder keeps its last finished epoch (exit code 130)."""

    def __init__(self, run_dir: Path):
        super().__init__(f"training interrupted; {display_name(run_dir)} keeps its last finished epoch. Continue "
                         f"with: melanoma train --out {display_name(run_dir)} --resume")
        self.run_dir = run_dir
