"""Fitting a run's out-of-distribution gate: at the end of training (called by scoring) and for an existing run
(``melanoma fit-ood RUN``, reading the run's data sources and split.csv as ``evaluate`` does), without retraining.

Features are the pooled penultimate features of the training images (no augmentation, the plain view); the
threshold is chosen on the validation images (see :mod:`melanoma.models.ood`)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from melanoma.core.errors import RunError
from melanoma.core.io import write_json
from melanoma.core.text import display_name
from melanoma.models.catalog import DEFAULT_DETECTOR
from melanoma.models.ood import OODGate, fit_gate, save_gate
from melanoma.models.probabilities import predict_outputs
from melanoma.runs.checkpoint import file_sha256
from melanoma.runs.layout import BEST, CHECKPOINT_DIR, METRICS, SPLIT, read_run_json, read_split
from melanoma.runs.run import Run


def fit_run_gate(run_dir: Path, model: torch.nn.Module, image_size: int, train_images: np.ndarray,
                 train_labels: np.ndarray, val_images: np.ndarray, device: str | torch.device = "cpu",
                 detector: str = DEFAULT_DETECTOR, log=print) -> OODGate:
    """Fit the gate on ``train_images``, choose its threshold on ``val_images``, write RUN/ood_gate.npz."""
    train = predict_outputs(model, train_images, image_size, device=device)
    val = predict_outputs(model, val_images, image_size, device=device)
    gate = fit_gate(detector, train.features, np.asarray(train_labels), val.features, val.logits,
                    file_sha256(Path(run_dir) / CHECKPOINT_DIR / BEST))
    path = save_gate(gate, run_dir)
    log(f"out-of-distribution gate ({detector}) fitted on {len(train_labels)} training images; threshold "
        f"{gate.threshold:.4g} passes {gate.info['validation_pass_rate']:.1%} of {len(val_images)} validation "
        f"images; wrote {display_name(path)}")
    return gate


def run_split_images(run: Run, roles: tuple[str, ...] = ("train", "val"),
                     data: str | list[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The run's own images per split.csv role, decoded at the model's size: {role: (images, labels)}. ``data``
    overrides the config's data sources (the same sources, elsewhere)."""
    from melanoma.data.images import build_cache
    from melanoma.data.sources import load_dataset

    rows = read_split(run.path, roles)
    config = run.config["config"]
    index = load_dataset(data or config["data"], image_root=None if data else config.get("image_root"))
    # split.csv names each image by its key across sources (newer runs) or by its path within the data
    by_path = {record.identity if rows and rows[0].get("key") else display_name(record.rel_path): record
               for record in index.records}
    name = "key" if rows and rows[0].get("key") else "path"
    missing = [row[name] for row in rows if row[name] not in by_path]
    if missing:
        raise RunError(f"{len(missing)} image(s) of {display_name(run.path / SPLIT)} are not in the run's data (first: "
                       f"{missing[0]}); pass the data the run was trained on with --data")
    result = {}
    for role in roles:
        chosen = [row for row in rows if row["role"] == role]
        cache = build_cache([by_path[row[name]] for row in chosen], size=run.image_size)
        ok = cache.ok_indices
        result[role] = (cache.images[ok], np.asarray([int(chosen[i]["label"]) for i in ok]))
    return result


def fit_existing_run(run_dir: str | os.PathLike, detector: str = DEFAULT_DETECTOR,
                     data: str | list[str] | None = None, log=print) -> OODGate:
    """``melanoma fit-ood RUN``: the gate for a trained run from its own training and validation images."""
    run = Run.load(run_dir, backend="torch", gate=False)
    images = run_split_images(run, ("train", "val"), data)
    if not len(images["train"][1]) or not len(images["val"][1]):
        raise RunError(f"{display_name(Path(run_dir))}: split.csv names no training or no validation images")
    gate = fit_run_gate(run.path, run.model, run.image_size, *images["train"], images["val"][0], run.device,
                        detector, log)
    _record_gate(run.path, gate, log)
    return gate


def _record_gate(run_dir: Path, gate: OODGate, log=print) -> None:
    """metrics.json's ``ood_gate`` section and MODEL_CARD.md follow the gate now in the run folder."""
    from melanoma.assess.model_card import write_model_card

    metrics_path = run_dir / METRICS
    if not metrics_path.is_file():
        return
    metrics = read_run_json(metrics_path)
    write_json(metrics_path, metrics | {"ood_gate": gate_summary(gate)})
    log(f"updated {display_name(metrics_path)} and {display_name(write_model_card(run_dir))}")


def fit_after_training(run_dir: Path, model: torch.nn.Module, image_size: int, data, device="cpu", log=print) -> dict:
    """Called by scoring at the end of training: the gate from the prepared training images (the originals, not
    the expanded copies of ``--balance expand``) and validation; returns its summary for metrics.json."""
    originals = np.asarray(data.train_sources) < 0
    if not originals.any():  # the leaky protocol keeps no marker of copies: every training image then
        originals = np.ones(len(data.train_labels), dtype=bool)
    gate = fit_run_gate(run_dir, model, image_size, data.train_images[originals], data.train_labels[originals],
                        data.val_images, device, log=log)
    return gate_summary(gate)


def gate_summary(gate: OODGate) -> dict:
    """What metrics.json (and the model card) say about the gate."""
    from melanoma.models.ood import GATE_FILE

    return {"file": GATE_FILE, "detector": gate.detector, "threshold": gate.threshold} | {
        key: gate.info.get(key) for key in ("keep", "n_train", "n_validation", "validation_pass_rate")}
