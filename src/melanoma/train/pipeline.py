"""``melanoma train``: one model trained and its run folder written, start to finish.

    melanoma train --data ../shared/data/isic-9class-180px --model seed-cnn --preset seed --epochs 20 --out runs/seed

Where each step lives: the config and recipes in :mod:`melanoma.config`, data preparation (clean, split, balance,
decode) in :mod:`melanoma.train.prepare`, the Lightning loop in :mod:`melanoma.train.loop`, the run folder and
checkpoints in :mod:`melanoma.runs.run`, precision and devices in :mod:`melanoma.core.hardware`, and the scoring after
training (calibration, alert threshold, Test metrics, report) in :mod:`melanoma.train.scoring`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from melanoma.audit.manifest import manifest_file
from melanoma.config import TrainConfig, with_epochs
from melanoma.core.errors import RunError, RunInterrupted
from melanoma.core.hardware import environment, resolve_precision
from melanoma.core.io import write_csv, write_json
from melanoma.models.networks import Classifier, ModelSpec, build_model
from melanoma.runs.checkpoint import check_resumable, file_sha256
from melanoma.runs.folder import prepare_run_dir, promote_staging, run_folder_lock, staging_dir
from melanoma.runs.guards import check_run_output
from melanoma.runs.layout import CHECKPOINT_DIR, CONFIG, DATA, LAST, SPLIT, SPLIT_COLUMNS, read_history, read_run_json
from melanoma.train.checks import build_spec, resumed_config, validate_config, with_absolute_paths
from melanoma.train.distributed import is_launch_rank_zero
from melanoma.train.loop import build_trainer, seed_everything
from melanoma.train.prepare import PreparedData, prepare_data
from melanoma.train.scoring import finish_run


def train(config: TrainConfig, log=print) -> Path:
    """Train one model and write its run folder; returns the folder."""
    if config.resume:
        config = resumed_config(config)
    config = with_absolute_paths(config.resolved())
    config.precision = resolve_precision(config.precision, config.accelerator)
    validate_config(config)
    # In a distributed run every process runs this function; only the first may create or change the run folder.
    writer = is_launch_rank_zero()
    run_dir = Path(config.out)
    if writer and not config.resume:
        check_run_output(run_dir, input_paths(config), config.overwrite)
    with run_folder_lock(run_dir) if writer else nullcontext():
        if writer:
            prepare_run_dir(run_dir, config.resume, config.overwrite)
        _train_into(run_dir, config, writer, log if writer else _silent)
    return run_dir


def _train_into(run_dir: Path, config: TrainConfig, writer: bool, log) -> None:
    last = run_dir / CHECKPOINT_DIR / LAST
    if config.resume:
        check_resumable(last)
    fingerprint = data_fingerprint(config) if writer else None
    if writer and config.resume:
        check_same_data(run_dir, fingerprint, log)
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    pretrained = _pretrained_state(config)  # a bad weights file fails here, before anything is written
    # where this process writes while starting: nowhere (not rank 0), the run (resume), or a staging folder
    staging = None if not writer else run_dir if config.resume else staging_dir(run_dir)
    try:
        data = prepare_data(config, staging, log=log)
        config = with_epochs(config, len(data.train_labels))
        spec = build_spec(config, num_classes=len(data.classes))
        model = _initial_model(spec, config, pretrained, log)
        if writer and not config.resume:
            _write_run_header(staging, config, spec, data, fingerprint)
            promote_staging(staging, run_dir, config.overwrite)
        elif writer:
            record_resume(run_dir, config, fingerprint)
    except BaseException:
        if staging is not None and not config.resume:
            shutil.rmtree(staging, ignore_errors=True)  # a failed start leaves nothing behind
        raise
    history = read_history(run_dir) if config.resume else []
    trainer, module, loaders = build_trainer(config, model, data, run_dir, spec, history)
    try:
        trainer.fit(module, *loaders, ckpt_path=str(last) if config.resume else None,
                    weights_only=True if config.resume else None)
    except SystemExit:  # Lightning turns Ctrl-C into exit 1 after saving nothing more
        if trainer.interrupted:
            raise RunInterrupted(run_dir) from None
        raise
    if trainer.is_global_zero:
        finish_run(run_dir, data, config, history, log)
        if config.logger != "none":
            from melanoma.train.tracking import log_run_artifacts

            log_run_artifacts(run_dir)


def _silent(*_args, **_kwargs) -> None:
    pass


def _pretrained_state(config: TrainConfig):
    if not config.weights or config.weights == "none" or config.resume:
        return None
    from melanoma.models.weights import imagenet_state_dict

    return imagenet_state_dict(config.model, config.weights)


def _initial_model(spec: ModelSpec, config: TrainConfig, pretrained, log) -> Classifier:
    model = build_model(spec)
    model.early_stage_modules(config.freeze_stages)  # an impossible --freeze-stages fails before training
    if pretrained is not None:
        from melanoma.models.weights import load_pretrained

        load_pretrained(model, pretrained, source=config.weights, log=log)
        # A zero head starts from uniform predictions (loss ln K) instead of confident random ones (loss ~7 here).
        for parameter in model.backbone_and_head()[1]:
            nn.init.zeros_(parameter)
    return model.to(memory_format=torch.channels_last)


def _write_run_header(run_dir: Path, config: TrainConfig, spec: ModelSpec, data: PreparedData,
                      fingerprint: str | None) -> None:
    write_json(run_dir / CONFIG, {
        "config": asdict(config), "model": spec.to_dict(), "classes": data.classes,
        "preprocessing": {"image_size": spec.image_size, "input": "RGB uint8 resized (bicubic/antialiased) to "
                          f"{spec.image_size}x{spec.image_size}, as float pixels in [0, 255]",
                          "normalization_inside_model": {"mean": spec.mean, "std": spec.std}},
        "environment": environment(), "command": " ".join(sys.argv), "data_fingerprint": fingerprint})
    write_json(run_dir / DATA, data.summary)
    write_csv(run_dir / SPLIT, data.split_rows, list(SPLIT_COLUMNS))
    (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# What the run reads, and the same data on --resume


def input_paths(config: TrainConfig) -> list[str]:
    """Every file or folder the run reads: data sources, the audit it follows and the truth files."""
    return [*config.data, *([config.audit] if config.audit else []), *(config.truth or [])]


def data_fingerprint(config: TrainConfig) -> str:
    """SHA-256 over what the run is made from: every image's name, label, split and file bytes (so a copied data
    folder keeps its fingerprint, an edited, added, moved or relabelled image changes it), and the bytes of the audit
    manifest and truth files it follows."""
    from melanoma.data.sources import load_dataset

    index = load_dataset(config.data, image_root=config.image_root)
    entries = sorted((record.rel_path, record.label, record.split, _content_hash(record.path))
                     for record in index.records)
    digest = hashlib.sha256(json.dumps(entries).encode("utf-8", errors="surrogateescape"))
    extra = [manifest_file(config.audit)] \
        if config.audit else []
    for path in [*extra, *(Path(p) for p in config.truth or [])]:
        if path.is_file():
            digest.update(f"{path.name}:{file_sha256(path)}".encode("utf-8", errors="surrogateescape"))
    return digest.hexdigest()


def _content_hash(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:  # an unreadable image is skipped by training, and counts as such here
        return f"unreadable: {exc.strerror or exc}"


def check_same_data(run_dir: Path, fingerprint: str | None, log) -> None:
    """--resume continues on the data the run started with, or not at all (split.csv would describe other data)."""
    saved = read_run_json(run_dir / CONFIG, require="config").get("data_fingerprint")
    if saved is None:
        log(f"note: {run_dir} predates data fingerprints; its data cannot be checked for changes")
    elif fingerprint != saved:
        raise RunError(f"{run_dir}: the data changed since this run started (images, labels, audit or truth files "
                       "differ from its data fingerprint); nothing was changed. Start a new run with another --out")


def record_resume(run_dir: Path, config: TrainConfig, fingerprint: str | None) -> None:
    """config.json after --resume: the settings it now runs with, the command, and one entry per resume saying when,
    how and what changed."""
    header = read_run_json(run_dir / CONFIG, require="config")
    before, after = header["config"], asdict(config)
    changed = {name: {"from": before.get(name), "to": value} for name, value in after.items()
               if before.get(name) != value and name != "resume"}
    command = " ".join(sys.argv)
    header.setdefault("first_command", header.get("command", ""))
    header.update(config=after, command=command)
    if header.get("data_fingerprint") is None:  # a run from before fingerprints gains one now
        header["data_fingerprint"] = fingerprint
    header["resumes"] = [*header.get("resumes", []), {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                      "command": command, "changed": changed}]
    write_json(run_dir / CONFIG, header)
