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

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from melanoma.core.errors import RunError
from melanoma.core.text import display_name
from melanoma.runs.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint
from melanoma.runs.layout import BEST, CHECKPOINT_DIR, CONFIG, METRICS, ONNX_FILE, read_run_json

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
    gate: object = None             # the fitted out-of-distribution gate (melanoma.models.ood.OODGate), or None

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
            from melanoma.core.errors import GateError
            from melanoma.models.ood import load_gate_with_notice

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
        from melanoma.models.probabilities import Answers, apply_temperature, outputs_with, torch_forward

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
