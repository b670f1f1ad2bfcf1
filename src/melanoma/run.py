"""The run folder: its layout, how it is created and promoted atomically, what a checkpoint holds, and loading a
finished run back (:class:`Run`) for ``predict``, ``evaluate``, ``export``, ``explain``, ``report`` and ``serve``.

A run folder holds everything needed to trace a number back to the command that made it::

    config.json        resolved config, model spec, classes, preprocessing, environment, command line
    data.json          what was dropped / relabelled, split sizes and class counts; split.csv: every image's role
    checkpoints/       last.ckpt (Lightning, for --resume) and best.pt (plain tensors + metadata, for everything else)
    history.csv        per-epoch train/val loss and accuracy; curves.png plots it
    metrics.json       validation and Test ("all" and "clean": not leaked into Train) metrics of the best checkpoint
    model.onnx         written by ``melanoma export`` (onnxruntime backend for predict and serve)
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import math
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from melanoma.data import display_name
from melanoma.io import atomic_write_bytes, read_json
from melanoma.models import ModelSpec, build_model
from melanoma.run_guards import RunError, check_replaceable, config_json_problem

CONFIG = "config.json"
METRICS = "metrics.json"
HISTORY = "history.csv"
CHECKPOINT_DIR = "checkpoints"
BEST = "best.pt"
LAST = "last.ckpt"
ONNX_FILE = "model.onnx"
CHECKPOINT_FORMAT = "melanoma-checkpoint-v1"


class RunInterrupted(Exception):
    """Training stopped by the user (Ctrl-C); the run folder keeps its last finished epoch."""

    def __init__(self, run_dir: Path):
        super().__init__(f"training interrupted; {display_name(run_dir)} keeps its last finished epoch. Continue "
                         f"with: melanoma train --out {display_name(run_dir)} --resume")
        self.run_dir = run_dir


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
# Checkpoints


def save_best(run_dir: Path, model: nn.Module, spec: ModelSpec, classes: list[str], config: dict,
              epoch: int, metrics: dict) -> None:
    """best.pt: plain tensors and metadata (loadable with ``weights_only=True``), written atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "model_state": {k: v.detach().cpu().clone()
                                                            for k, v in model.state_dict().items()},
               "spec": spec.to_dict(), "classes": list(classes), "epoch": int(epoch) + 1,
               "val_metrics": metrics, "config": config}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(run_dir / CHECKPOINT_DIR / BEST, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A best.pt checkpoint, loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{display_name(path)}: checkpoint not found")
    try:
        payload = _torch_load(path)
    except Exception as exc:  # truncated zip, pickle error, not a torch file: all mean the same to the user
        raise RunError(f"{display_name(path)}: not a readable checkpoint (corrupt or truncated?): "
                       f"{torch_load_reason(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{display_name(path)}: not a melanoma checkpoint")
    if not isinstance(payload.get("spec"), dict) or not isinstance(payload.get("model_state"), dict) \
            or not isinstance(payload.get("classes"), list) or not all(isinstance(c, str) for c in payload["classes"]):
        raise RunError(f"{display_name(path)}: not a melanoma checkpoint (its spec, weights or classes are missing)")
    return payload


def _torch_load(path: Path):
    with warnings.catch_warnings():  # torch's pickle-protocol warnings for a foreign file: the error says enough
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def torch_load_reason(exc: BaseException) -> str:
    """One line for why ``torch.load(weights_only=True)`` refused a file, instead of torch's paragraph of advice."""
    text = str(exc)
    if "Weights only load failed" in text:
        return "it holds Python objects, not only tensors (not a checkpoint written by this tool)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


def model_from_checkpoint(payload: dict) -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec.from_dict(payload["spec"])
    model = build_model(spec)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise RunError(f"checkpoint weights do not fit model '{spec.name}': {str(exc)[:300]}") from exc
    return model.eval(), spec


def check_resumable(last: Path) -> None:
    if not last.is_file():
        raise RunError(f"{display_name(last)}: no checkpoint to resume from")
    try:
        _torch_load(last)
    except Exception as exc:
        raise RunError(f"{display_name(last)}: checkpoint is corrupt or truncated ({torch_load_reason(exc)}); "
                       "nothing was changed. Start again with --overwrite") from exc


# ---------------------------------------------------------------------------------------------------------------
# A finished run, loaded back


@dataclass
class Run:
    """A trained run folder, loaded for prediction.

    It carries everything a prediction needs: the model spec (architecture, input size, normalisation), the class
    names, the weights, whether to use test-time augmentation, the calibration temperature and the melanoma alert
    threshold chosen on validation. The threshold is applied outside the model, so it can change without retraining.
    """

    path: Path
    model: object
    image_size: int
    classes: list[str]
    tta: bool
    threshold: float | None
    config: dict
    backend: str = "torch"          # torch | onnx
    session: object = None          # the onnxruntime session when backend == "onnx"
    calibration: dict | None = None
    device: str = "cpu"             # where the PyTorch backend runs ("cuda:1", ...)
    gate: object = None             # the fitted out-of-distribution gate (melanoma.ood.OODGate), or None

    @classmethod
    def load(cls, path: str | os.PathLike, threshold: float | None = None, backend: str = "auto",
             threads: int | None = None, device: str = "cpu", gate: bool = True) -> "Run":
        """Load a run; ``backend`` auto uses onnxruntime when the run has model.onnx (and ``device`` is the CPU),
        PyTorch otherwise. With ``gate`` its out-of-distribution gate is loaded too (a one-line notice when the
        run has none; a RunError when it belongs to another model)."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise RunError(f"{display_name(path)}: not a run folder (no {CONFIG})")
        checkpoint = path / CHECKPOINT_DIR / BEST
        if not checkpoint.is_file():
            raise RunError(f"{display_name(path)}: the run has no checkpoint ({CHECKPOINT_DIR}/{BEST}); "
                           "did training finish an epoch?")
        payload = load_checkpoint(checkpoint)
        model, spec = model_from_checkpoint(payload)
        config = read_run_json(path / CONFIG, require="config")
        metrics = read_run_json(path / METRICS) if (path / METRICS).is_file() else {}
        calibration = _checked_calibration(metrics.get("calibration"), path / METRICS)
        saved_threshold = _checked_threshold((metrics.get("alert") or {}).get("threshold"), path / METRICS)
        run = cls(path=path, model=model.to(device), image_size=spec.image_size, classes=list(payload["classes"]),
                  tta=bool(config["config"].get("tta")), config=config, calibration=calibration,
                  threshold=threshold if threshold is not None else saved_threshold, device=device)
        if run.calibration is None:
            warnings.warn(f"{display_name(path)} has no calibration ({METRICS} without a temperature); "
                          "predicting with uncalibrated probabilities", stacklevel=2)
        checkpoint_sha256 = file_sha256(checkpoint)
        if gate:
            from melanoma.ood import GateError, load_gate_with_notice

            try:
                run.gate = load_gate_with_notice(path, checkpoint_sha256)
            except GateError as exc:
                raise RunError(str(exc)) from exc
        onnx_path = path / ONNX_FILE
        if backend == "onnx" or (backend == "auto" and onnx_path.is_file() and device == "cpu"):
            if not onnx_path.is_file():
                raise RunError(f"{display_name(path)}: no {ONNX_FILE}; run `melanoma export {display_name(path)}`")
            session = load_onnx_session(onnx_path, run.classes, run.image_size, threads,
                                        checkpoint_sha256=checkpoint_sha256)
            if run.gate is not None and "features" not in {o.name for o in session.get_outputs()}:
                message = (f"{display_name(onnx_path)} predates the out-of-distribution gate (no 'features' output); "
                           f"re-export with `melanoma export {display_name(path)}`")
                if backend == "onnx":
                    raise RunError(message)
                warnings.warn(message + "; predicting with PyTorch meanwhile", stacklevel=2)
                return run
            run.session = session
            run.backend = "onnx"
        return run

    @property
    def temperature(self) -> float:
        return float(self.calibration["temperature"]) if self.calibration else 1.0

    def probabilities(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Calibrated class probabilities (the run's temperature applied) from either backend."""
        return self.answers(images, batch_size).probabilities

    def answers(self, images: np.ndarray, batch_size: int = 32):
        """Calibrated probabilities and, with a gate, each image's out-of-distribution score and decision: all from
        the same model call (the gate reads the pooled features of the plain view)."""
        from melanoma.calibration import apply_temperature
        from melanoma.probabilities import Answers, outputs_with, torch_forward

        if self.backend == "onnx":
            names = [output.name for output in self.session.get_outputs()]

            def forward(pixels: torch.Tensor):
                values = dict(zip(names, self.session.run(None, {"pixels": pixels.numpy()})))
                return values["probabilities"], values.get("features"), values.get("logits")

            outputs = outputs_with(forward, images, self.image_size, batch_size=batch_size, tta=self.tta)
        else:
            outputs = outputs_with(torch_forward(self.model, self.device), images, self.image_size,
                                   batch_size=batch_size, tta=self.tta)
        raw = outputs.probabilities
        answers = Answers(apply_temperature(raw, self.temperature) if self.temperature != 1.0 else raw)
        if self.gate is not None and len(raw):
            answers.ood_scores, answers.in_distribution = self.gate.decide(outputs.features, outputs.logits)
        return answers


def _checked_calibration(calibration, source: Path) -> dict | None:
    """The calibration read back from metrics.json: its temperature must be a positive finite number."""
    if calibration is None:
        return None
    temperature = calibration.get("temperature") if isinstance(calibration, dict) else None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or not 0 < temperature <= 1000:
        raise RunError(f"{display_name(source)}: calibration temperature {temperature!r} is not a positive number; "
                       "the file is damaged (re-run `melanoma train` or restore it)")
    return calibration


def _checked_threshold(threshold, source: Path) -> float | None:
    """The alert threshold read back from metrics.json: a probability, or absent."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise RunError(f"{display_name(source)}: alert threshold {threshold!r} is not a probability in [0, 1]; "
                       "the file is damaged")
    return float(threshold)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_onnx_session(path: Path, classes: list[str], image_size: int, threads: int | None = None,
                      checkpoint_sha256: str | None = None):
    """An onnxruntime session for a run's model.onnx, refused if its metadata does not match the run: its classes,
    its input size, and (with ``checkpoint_sha256``) the best.pt it was exported from.

    ``threads``: intra-op threads per inference (serving runs one inference per core, each on one thread, instead of
    letting concurrent inferences fight over every core)."""
    import json

    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RunError(f"{display_name(path)}: not a loadable ONNX model ({exc})") from exc
    metadata = session.get_modelmeta().custom_metadata_map
    onnx_classes = json.loads(metadata.get("classes", "null") or "null")
    if onnx_classes != classes or metadata.get("image_size") != str(image_size):
        raise RunError(f"{display_name(path)} does not match its run (ONNX: classes {onnx_classes}, size "
                       f"{metadata.get('image_size')}; run: classes {classes}, size {image_size}). "
                       "Re-export with `melanoma export RUN`")
    if checkpoint_sha256 is not None and metadata.get("checkpoint_sha256") != checkpoint_sha256:
        raise RunError(f"{display_name(path)} was not exported from this run's {CHECKPOINT_DIR}/{BEST} (checkpoint "
                       "SHA-256 differs or is missing). Re-export with `melanoma export RUN`")
    return session
