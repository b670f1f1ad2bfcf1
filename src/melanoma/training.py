"""Training on Lightning: data preparation (clean, split, balance), the loop, checkpoints and the run folder.

    melanoma train --data ../shared/data/isic-9class-180px --model seed-cnn --preset seed --epochs 20 --out runs/seed

A run folder holds everything needed to trace a number back to the command that made it::

    config.json        resolved config, model spec, classes, preprocessing, environment, command line
    data.json          what was dropped / relabelled, split sizes and class counts; split.csv: every image's role
    checkpoints/       last.ckpt (Lightning, for --resume) and best.pt (plain tensors + metadata, for everything else)
    history.csv        per-epoch train/val loss and accuracy; curves.png plots it
    metrics.json       validation and Test ("all" and "clean": not leaked into Train) metrics of the best checkpoint
"""
from __future__ import annotations

import csv
import io
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence, Sized

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from melanoma.calibration import (apply_temperature, calibration_summary, fit_temperature,
                                  reliability_figure)
from melanoma.balance import Balance, balanced_sampler, class_counts, class_weights, expand, parse_balance
from melanoma.data import (ERAS, MELANOMA, DataError, DatasetIndex, acquisition_era, build_cache, display_name,
                           load_dataset)
from melanoma.distributed import ShardedBatchSampler, is_launch_rank_zero
from melanoma.io import atomic_write_bytes, read_json, save_figure, write_csv, write_json
from melanoma.models import ModelSpec, build_model, default_normalization
from melanoma.splits import (Selection, grouped_stratified_split, random_split, select_heldout,
                             select_training_pool)
from melanoma.transforms import PRESETS, PresetError, to_model_input, train_transform

CHECKPOINT_DIR = "checkpoints"
BEST = "best.pt"
LAST = "last.ckpt"


class RunError(RuntimeError):
    """A run that cannot start or continue as asked; nothing already written has been touched."""


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "tf_efficientnet_lite0"
    recipe: str | None = None         # seed | finetune; default: seed for the seed CNNs, finetune otherwise
    # Recipe fields: None means "the recipe's value" (see RECIPES); set one to override it.
    preset: str | None = None
    balance: str | None = None
    era_balance: bool | None = None   # sampler only: equal draws of each acquisition era within a class
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None      # adam | adamw
    weight_decay: float | None = None
    label_smoothing: float | None = None
    schedule: str | None = None       # constant | cosine (linear warm-up, then cosine to 0)
    warmup_epochs: float | None = None
    freeze_epochs: int | None = None  # epochs with the whole backbone frozen (head warm-up)
    freeze_stages: int | None = None  # stem + this many early stages stay frozen throughout (small-data fine-tuning)
    backbone_lr_scale: float | None = None  # backbone LR = lr * scale (discriminative learning rates)
    ema_decay: float | None = None    # 0 = off; else EMA of weights, used for validation and the saved model
    tta: bool | None = None           # 8 dihedral views at evaluation
    weights: str | None = None        # pretrained weights: 'package', 'timm', a state-dict path, or 'none'
    colour_constancy: float = 0.0     # Shades of Gray norm p inside the model (e.g. 6); 0 = off
    image_size: int | None = None
    val_fraction: float = 0.2
    target_sensitivity: float = 0.9   # the melanoma alert threshold is chosen on validation to reach this
    bootstrap: int = 1000             # stratified bootstrap resamples for the Test confidence intervals (0 = none)
    protocol: str = "leak-free"       # leak-free: split, then balance | leaky: expand, then split (the course bug)
    seed: int = 42
    split_seed: int | None = None     # seed of the train/validation split; default: seed. Fix it to compare seeds
    clean: bool = True                # apply the audit's clean_manifest.csv actions
    relabel: bool = False             # train on official-truth labels where the audit found a contradiction
    audit: str | None = None          # an audit folder (or clean_manifest.csv); default: audit now, into the run
    truth: list[str] = field(default_factory=list)
    test_split: str = "Test"
    early_stopping: int = 0           # patience in epochs on validation loss; 0 = off
    num_workers: int = 0
    threads: int | None = None
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None      # default: bf16-mixed where the CPU/GPU does bf16 natively, else 32-true
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with every recipe field filled in: explicit values win over the recipe's."""
        from melanoma.models import SEED_MODELS

        recipe = self.recipe or ("seed" if self.model in SEED_MODELS else "finetune")
        if recipe not in RECIPES:
            raise RunError(f"unknown recipe '{recipe}' (choose from: {', '.join(RECIPES)})")
        values = {name: getattr(self, name) for name in RECIPES[recipe]}
        filled = {name: RECIPES[recipe][name] if value is None else value for name, value in values.items()}
        if filled["weights"] == "package" and self.model not in _PACKAGED_WEIGHTS:
            filled["weights"] = "none"
        return replace(self, recipe=recipe, **filled)

    @classmethod
    def from_dict(cls, payload: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in known})


_PACKAGED_WEIGHTS = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")
RECIPES: dict[str, dict] = {
    # The course notebook: Keras defaults (Adam 1e-3, batch 32), no schedule, 180 px, trained from scratch.
    "seed": dict(preset="seed", balance="none", era_balance=False, epochs=20, batch_size=32, lr=1e-3, optimizer="adam",
                 weight_decay=0.0, label_smoothing=0.0, schedule="constant", warmup_epochs=0.0, freeze_epochs=0,
                 freeze_stages=0, backbone_lr_scale=1.0, ema_decay=0.0, tta=False, weights="none", image_size=180),
    # Fine-tuning an ImageNet backbone on ~2,000 images on a CPU (chosen on the validation split, never on Test):
    "finetune": dict(
        preset="dermoscopy",      # lesions have no orientation; colour varies between dermatoscopes
        # batches drawn with class shares proportional to sqrt(class size): rare classes (DF, AK, VASC) are seen far
        # more often than their share, without repeating a class of a handful of images (cleaning leaves 2 SK) 1/9 of
        # every batch
        balance="sampler:0.5",
        era_balance=False,
        # 8 epochs at the images' own 180 px: 15 min on a 2-core CPU without bf16 where 15 epochs at 224 px took 39
        # (validation loss bottomed out at epoch 8 there); validation scores within seed noise (README "Results")
        epochs=8, batch_size=32,
        lr=1e-3,                  # head LR; the backbone gets backbone_lr_scale of it
        optimizer="adamw", weight_decay=0.01,
        label_smoothing=0.1,      # folder labels are noisy (see the audit)
        schedule="cosine", warmup_epochs=1.0,
        freeze_epochs=1,          # head warm-up on a frozen backbone, so random head gradients do not wreck it
        freeze_stages=2,          # stem + first two stages (edges, colours) stay ImageNet: 2-3x faster on a CPU
        backbone_lr_scale=0.3,
        ema_decay=0.99,           # ~100-step horizon, about 2 epochs here
        tta=True, weights="package", image_size=180),
}


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class PreparedData:
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_leaked: np.ndarray
    test_names: list[str]
    split_rows: list[dict]
    summary: dict
    train_sources: np.ndarray       # for expanded copies: the index in pool_names each came from; -1 for originals
    pool_names: list[str]           # every image of the training pool (before the train/validation split)


class ArrayDataset(Dataset):
    """uint8 H x W x 3 images from the in-memory cache -> (uint8 3 x H x W tensor, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def load_clean_manifest(config: TrainConfig, index: DatasetIndex, run_dir: Path | None) -> list[dict]:
    """The audit's per-image actions: read from --audit, or made now by auditing the data into the run folder.

    Even with --no-clean the audit is used, to mark which Test images leaked into Train ("clean" Test scores).
    """
    if config.audit:
        path = Path(config.audit)
        path = path / "clean_manifest.csv" if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"{display_name(path)}: no clean_manifest.csv there; run `melanoma audit` first")
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    from melanoma.audit import AuditConfig, run_audit, write_audit
    from melanoma.truth import load_ground_truth

    truth = load_ground_truth(config.truth) if config.truth else None
    result = run_audit(index, truth, AuditConfig())
    if run_dir is not None:
        write_audit(result, index, run_dir / "audit")
    return result.manifest


def prepare_data(config: TrainConfig, run_dir: Path | None = None, log=print) -> PreparedData:
    """Discover, clean, decode once, split (grouped and stratified) and balance; all seeded."""
    config = config.resolved()
    index = load_dataset(config.data)
    manifest = load_clean_manifest(config, index, run_dir)
    pool = select_training_pool(index, manifest if config.clean else None, relabel=config.relabel)
    classes = sorted(set(index.classes))
    _check_labels_known(pool, classes)
    size = resolve_image_size(config)
    pool_cache = build_cache(pool.records, size=size)
    keep = [i for i in range(len(pool.records)) if i not in pool_cache.errors]
    images = pool_cache.images[keep]
    labels = np.asarray([classes.index(pool.labels[i]) for i in keep])
    groups = [pool.groups[i] for i in keep]
    names = [display_name(pool.records[i].rel_path) for i in keep]
    balance = parse_balance(config.balance)
    if config.protocol == "leaky":
        split = _leaky_expand_then_split(images, labels, names, balance, len(classes), config)
    elif config.protocol == "leak-free":
        split = _split_then_expand(images, labels, groups, names, balance, classes, config)
    else:
        raise RunError(f"unknown protocol '{config.protocol}' (leak-free or leaky)")
    test = select_heldout(index, config.test_split, manifest) if config.test_split else None
    test_part = _decode_heldout(test, classes, size)
    prepared = PreparedData(classes=classes, **split, **test_part, pool_names=names,
                            summary=_data_summary(index, pool, manifest, classes, split, test_part, config))
    _log_data_summary(prepared.summary, log)
    return prepared


def train_image_names(data: PreparedData) -> list[str]:
    """The file each training image is (or, for an expanded copy, was made from), in training order."""
    names = [row["path"] for row in data.split_rows if row["role"] == "train"]
    return names + [data.pool_names[source] for source in data.train_sources[len(names):]]


def _check_labels_known(pool: Selection, classes: list[str]) -> None:
    unknown = sorted(set(pool.labels) - set(classes))
    if unknown:
        raise DataError(f"labels not among the dataset's classes: {', '.join(unknown)}")


def resolve_image_size(config: TrainConfig) -> int:
    return config.image_size or config.resolved().image_size


def split_seed(config: TrainConfig) -> int:
    return config.seed if config.split_seed is None else config.split_seed


def _split_then_expand(images, labels, groups, names, balance: Balance, classes: list[str], config: TrainConfig):
    num_classes = len(classes)
    train_idx, val_idx = grouped_stratified_split(labels, groups, config.val_fraction, split_seed(config), classes)
    train_images, train_labels = images[train_idx], labels[train_idx]
    sources = np.full(len(train_idx), -1, dtype=np.int64)
    rows = [{"path": names[i], "label": int(labels[i]), "role": "train"} for i in train_idx]
    rows += [{"path": names[i], "label": int(labels[i]), "role": "val"} for i in val_idx]
    if balance.mode == "expand":
        new_images, new_labels, new_sources = expand(train_images, train_labels, balance.copies, num_classes,
                                                     config.seed)
        train_images = np.concatenate([train_images, new_images])
        train_labels = np.concatenate([train_labels, new_labels])
        sources = np.concatenate([sources, train_idx[new_sources]])
    return {"train_images": train_images, "train_labels": train_labels, "val_images": images[val_idx],
            "val_labels": labels[val_idx], "split_rows": rows, "train_sources": sources}


def _leaky_expand_then_split(images, labels, names, balance: Balance, num_classes: int, config: TrainConfig):
    """The course notebook's protocol, kept to measure its leak: expand the whole pool, *then* split at random."""
    sources = np.arange(len(labels))
    if balance.mode == "expand":
        new_images, new_labels, new_sources = expand(images, labels, balance.copies, num_classes, config.seed)
        images, labels = np.concatenate([images, new_images]), np.concatenate([labels, new_labels])
        sources = np.concatenate([sources, new_sources])
    train_idx, val_idx = random_split(len(labels), config.val_fraction, split_seed(config))
    origin = [names[s] + ("" if i < len(names) else " (expanded copy)") for i, s in enumerate(sources)]
    rows = [{"path": origin[i], "label": int(labels[i]), "role": "train"} for i in train_idx]
    rows += [{"path": origin[i], "label": int(labels[i]), "role": "val"} for i in val_idx]
    train_sources = np.where(np.arange(len(labels))[train_idx] >= len(names), sources[train_idx], -1)
    return {"train_images": images[train_idx], "train_labels": labels[train_idx], "val_images": images[val_idx],
            "val_labels": labels[val_idx], "split_rows": rows, "train_sources": train_sources}


def _decode_heldout(test: Selection | None, classes: list[str], size: int) -> dict:
    empty = np.zeros((0, size, size, 3), dtype=np.uint8)
    if test is None or not test.records:
        return {"test_images": empty, "test_labels": np.zeros(0, dtype=np.int64),
                "test_leaked": np.zeros(0, dtype=bool), "test_names": []}
    unknown = sorted(set(test.labels) - set(classes))
    if unknown:
        raise DataError(f"held-out classes missing from training: {', '.join(unknown)}")
    cache = build_cache(test.records, size=size)
    keep = [i for i in range(len(test.records)) if i not in cache.errors]
    return {"test_images": cache.images[keep],
            "test_labels": np.asarray([classes.index(test.labels[i]) for i in keep], dtype=np.int64),
            "test_leaked": np.asarray([test.leaked[i] for i in keep], dtype=bool),
            "test_names": [display_name(test.records[i].rel_path) for i in keep]}


def _data_summary(index, pool: Selection, manifest, classes, split, test_part, config) -> dict:
    def counts(labels):
        return dict(zip(classes, class_counts(labels, len(classes)).tolist()))

    return {"data": display_name(index.root), "cleaned": config.clean, "dropped": dict(pool.dropped),
            "relabelled": pool.relabelled, "protocol": config.protocol, "balance": config.balance,
            "train": len(split["train_labels"]), "expanded_copies": int((split["train_sources"] >= 0).sum()),
            "val": len(split["val_labels"]), "test": len(test_part["test_labels"]),
            "test_clean": int((~test_part["test_leaked"]).sum()),
            "train_counts": counts(split["train_labels"]), "val_counts": counts(split["val_labels"]),
            "test_counts": counts(test_part["test_labels"])}


def _log_data_summary(summary: dict, log) -> None:
    if summary["cleaned"]:
        dropped = ", ".join(f"{v} {k}" for k, v in summary["dropped"].items()) or "nothing"
        log(f"clean manifest: dropped {dropped}; relabelled {summary['relabelled']}")
    else:
        log("--no-clean: training on the folders as they are")
    log(f"train {summary['train']} (of which {summary['expanded_copies']} expanded copies), val {summary['val']}, "
        f"test {summary['test']} ({summary['test_clean']} not leaked into Train)")


# ---------------------------------------------------------------------------------------------------------------
# The Lightning module


def _lightning():
    import lightning.pytorch as pl

    return pl


def build_lightning_module(model: nn.Module, config: TrainConfig, loss_weights: torch.Tensor | None,
                           train_batches: Sized):
    """``train_batches`` is the training batch sampler: its length (batches per epoch on this process) is only known
    once the process group runs, so the LR schedule reads it when the optimizers are made."""
    pl = _lightning()

    class LesionClassifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=config.label_smoothing)
            self._sums: dict[str, torch.Tensor] = {}  # stage -> (loss sum, correct, count) on this process

        def forward(self, pixels):
            return self.model(pixels)

        def training_step(self, batch, _):
            images, labels = batch
            logits = self.model(to_model_input(images))
            loss = self.criterion(logits, labels)
            self._accumulate("train", loss.detach() * len(labels), logits, labels)
            self.log("loss", loss, on_step=True, on_epoch=False, prog_bar=True, logger=False)
            return loss

        def validation_step(self, batch, _):
            images, labels = batch
            logits = self.model(to_model_input(images))
            # Unweighted loss on validation: comparable across balancing modes.
            self._accumulate("val", nn.functional.cross_entropy(logits.float(), labels, reduction="sum"), logits,
                             labels)

        def _accumulate(self, stage: str, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
            batch = torch.stack([loss_sum.detach().double(), (logits.argmax(1) == labels).sum().double(),
                                 torch.tensor(len(labels), dtype=torch.float64, device=labels.device)])
            self._sums[stage] = self._sums.get(stage, torch.zeros_like(batch)) + batch

        def epoch_metrics(self, stage: str) -> dict[str, float]:
            """Loss and accuracy of this epoch's ``stage`` over every process's samples, each counted once, and
            logged (for the progress bar and early stopping). Every process must call it: it is a collective.

            Lightning's own ``sync_dist`` mean is not used: it averages the per-process sample counts as integers,
            which is wrong when processes hold different numbers of samples."""
            local = self._sums.pop(stage, torch.zeros(3, dtype=torch.float64, device=self.device))
            loss_sum, correct, count = self.trainer.strategy.reduce(local, reduce_op="sum").tolist()
            metrics = {f"{stage}_loss": loss_sum / max(count, 1), f"{stage}_acc": correct / max(count, 1)}
            for name, value in metrics.items():
                # identical on every process, so the sync only keeps Lightning from warning
                self.log(name, value, prog_bar=True, sync_dist=True)
            return metrics

        def configure_optimizers(self):
            backbone, head = self.model.backbone_and_head()
            groups = [{"params": backbone, "lr": config.lr * config.backbone_lr_scale},
                      {"params": head, "lr": config.lr}]
            if config.optimizer == "adamw":
                optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
            elif config.optimizer == "adam":
                optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
            else:
                raise RunError(f"unknown optimizer '{config.optimizer}' (adam or adamw)")
            schedule = lr_schedule(config, len(train_batches))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return LesionClassifier()


def lr_schedule(config: TrainConfig, steps_per_epoch: int):
    """Multiplier of the base LR at each step: full LR for the head warm-up (frozen backbone), then a linear
    warm-up as the backbone unfreezes, then constant or cosine decay to zero."""
    frozen = config.freeze_epochs * steps_per_epoch
    total = max(1, config.epochs * steps_per_epoch - frozen)
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < frozen:
            return 1.0
        step -= frozen
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    if config.schedule not in ("constant", "cosine"):
        raise RunError(f"unknown schedule '{config.schedule}' (constant or cosine)")
    return factor


# ---------------------------------------------------------------------------------------------------------------
# Callbacks: freezing, history, checkpoints


def _callbacks(config: TrainConfig, run_dir: Path, spec: ModelSpec, classes: list[str], history: list[dict],
               generators: Sequence[torch.Generator] = (), train_batches: Sized = ()):
    pl = _lightning()

    class FreezeBackbone(pl.Callback):
        """Head warm-up: the whole backbone is frozen for the first ``freeze_epochs``; the stem and first
        ``freeze_stages`` stages stay frozen throughout. Frozen means no gradients and fixed BatchNorm statistics."""

        def on_train_epoch_start(self, trainer, module):
            model = module.model
            warming_up = trainer.current_epoch < config.freeze_epochs
            backbone, _ = model.backbone_and_head()
            for parameter in backbone:
                parameter.requires_grad_(not warming_up)
            frozen_modules = [model.network] if warming_up else model.early_stage_modules(config.freeze_stages)
            for frozen in frozen_modules:
                for parameter in frozen.parameters():
                    if frozen is not model.network:
                        parameter.requires_grad_(False)
                for layer in frozen.modules():
                    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                        layer.eval()

    class RunRecorder(pl.Callback):
        """history.csv each epoch, last.ckpt (for --resume) and best.pt (lowest validation loss), all atomic."""

        def __init__(self):
            self.best_loss = math.inf
            self.epoch_start = time.perf_counter()
            self.val_metrics: dict[str, float] = {}

        def on_train_epoch_start(self, trainer, module):
            self.epoch_start = time.perf_counter()
            if trainer.world_size > 1:
                # Each process augments different images, so each needs its own random stream; seeding it from
                # (seed, epoch, rank) also makes a resumed distributed run draw what an uninterrupted one would.
                torch.manual_seed(config.seed * 1_000_003 + trainer.current_epoch * 1_009 + trainer.global_rank)

        def on_validation_epoch_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            # Runs before the EMA callback swaps the training weights back: best.pt holds what was validated.
            self.val_metrics = module.epoch_metrics("val")
            if self.val_metrics["val_loss"] < self.best_loss:
                self.best_loss = self.val_metrics["val_loss"]
                if trainer.is_global_zero:
                    save_best(run_dir, module.model, spec, classes, config, trainer.current_epoch, self.val_metrics)

        def on_train_epoch_end(self, trainer, module):
            metrics = {**module.epoch_metrics("train"), **self.val_metrics}
            self.val_metrics = {}
            row = {"epoch": trainer.current_epoch + 1, **{k: metrics.get(k) for k in HISTORY_METRICS},
                   "lr": trainer.optimizers[0].param_groups[-1]["lr"],
                   "seconds": round(time.perf_counter() - self.epoch_start, 2)}
            history.append(row)
            if trainer.is_global_zero:
                write_csv(run_dir / "history.csv", history, HISTORY_COLUMNS)
            save_last(trainer, run_dir)

        def state_dict(self):
            # RNG states make a resumed run draw the same augmentations and batches as an uninterrupted one.
            return {"best_loss": self.best_loss, "torch_rng": torch.get_rng_state(),
                    "generators": [g.get_state() for g in generators]}

        def load_state_dict(self, state):
            self.best_loss = state["best_loss"]
            torch.set_rng_state(state["torch_rng"])
            for generator, saved in zip(generators, state.get("generators", [])):
                generator.set_state(saved)

    callbacks = [FreezeBackbone(), RunRecorder()]
    if config.early_stopping:
        callbacks.append(pl.callbacks.EarlyStopping(monitor="val_loss", patience=config.early_stopping))
    if config.ema_decay:
        callbacks.append(_ema_callback(config, train_batches))
    if config.progress:
        callbacks.append(_progress_bar())
    return callbacks


def _progress_bar():
    pl = _lightning()
    from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

    class CountingFromOne(pl.callbacks.TQDMProgressBar):
        """Lightning's bar says 'Epoch 0' for the first of 8 epochs; this one says 'Epoch 1/8'."""

        def on_train_epoch_start(self, trainer, *_):
            # Lightning's own method, with our description: calling it and then renaming would print 'Epoch 0'
            # into logs first (pinned lightning; tests/test_training.py checks the output)
            if self._leave:
                self.train_progress_bar = self.init_train_tqdm()
            self.train_progress_bar.reset()
            self.train_progress_bar.total = convert_inf(self.total_train_batches)
            self.train_progress_bar.initial = 0
            self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    return CountingFromOne()


def _ema_callback(config: TrainConfig, train_batches: Sized):
    pl = _lightning()

    class EMAAfterWarmUp(pl.callbacks.EMAWeightAveraging):
        """Averaging starts after the head warm-up, so the random initial head does not linger in the average."""

        def setup(self, trainer, module, stage):
            super().setup(trainer, module, stage)
            self.update_starting_at_step = config.freeze_epochs * len(train_batches)  # batches per process

        # Until the first update the average is the initial model (random head): validate, keep and finish with the
        # weights being trained instead, or the warm-up epoch would be scored (and a 1-epoch run saved) untrained.
        def _started(self) -> bool:
            return self._average_model is not None and int(self._average_model.n_averaged) > 0

        def on_validation_epoch_start(self, trainer, module):
            self._swapped = self._started()
            if self._swapped:
                super().on_validation_epoch_start(trainer, module)

        def on_validation_epoch_end(self, trainer, module):
            if getattr(self, "_swapped", False):
                super().on_validation_epoch_end(trainer, module)
            self._swapped = False

        def on_train_end(self, trainer, module):
            if self._started():
                super().on_train_end(trainer, module)

    return EMAAfterWarmUp(decay=config.ema_decay)


HISTORY_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")
HISTORY_COLUMNS = ("epoch", *HISTORY_METRICS, "lr", "seconds")


def save_last(trainer, run_dir: Path) -> None:
    """Lightning checkpoint for --resume, written to a temporary file and renamed (a kill never leaves half a file)."""
    final = run_dir / CHECKPOINT_DIR / LAST
    temporary = final.with_suffix(".ckpt.tmp")
    trainer.save_checkpoint(temporary, weights_only=False)
    if trainer.is_global_zero:
        os.replace(temporary, final)


def save_best(run_dir: Path, model: nn.Module, spec: ModelSpec, classes: list[str], config: TrainConfig,
              epoch: int, metrics: dict) -> None:
    payload = {"format": "melanoma-checkpoint-v1", "model_state": {k: v.detach().cpu().clone()
                                                                   for k, v in model.state_dict().items()},
               "spec": spec.to_dict(), "classes": list(classes), "epoch": int(epoch) + 1,
               "val_metrics": metrics, "config": asdict(config)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(run_dir / CHECKPOINT_DIR / BEST, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A best.pt checkpoint, loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{display_name(path)}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle error, not a torch file: all mean the same to the user
        raise RunError(f"{display_name(path)}: not a readable checkpoint (corrupt or truncated?): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != "melanoma-checkpoint-v1":
        raise RunError(f"{display_name(path)}: not a melanoma checkpoint")
    return payload


def model_from_checkpoint(payload: dict) -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec.from_dict(payload["spec"])
    model = build_model(spec)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise RunError(f"checkpoint weights do not fit model '{spec.name}': {str(exc)[:300]}") from exc
    return model.eval(), spec


# ---------------------------------------------------------------------------------------------------------------
# Running


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""  # not Linux: no model name, no known bf16 flags


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast trains ~2.4x faster."""
    flags = _cpuinfo()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none), for benchmark records."""
    lines = _cpuinfo().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def resolve_precision(config: TrainConfig) -> str:
    if config.precision:
        return config.precision
    if uses_gpu(config):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def uses_gpu(config: TrainConfig) -> bool:
    return config.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def evaluation_device(config: TrainConfig) -> str:
    """Where rank 0 scores the best checkpoint after training: the first GPU of a GPU run, else the CPU."""
    return "cuda" if uses_gpu(config) else "cpu"


def environment() -> dict:
    import lightning
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "lightning": lightning.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count()}


def prepare_run_dir(config: TrainConfig) -> Path:
    run_dir = Path(config.out)
    if config.resume:
        if not (run_dir / "config.json").is_file():
            raise RunError(f"{display_name(run_dir)}: nothing to resume (no config.json)")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not config.overwrite:
        raise RunError(f"{display_name(run_dir)} already exists; pass --overwrite to replace it or --resume to "
                       "continue it")
    return run_dir


def validate_config(config: TrainConfig) -> None:
    """Every flag checked before any data is read or anything written."""
    if parse_balance(config.balance).mode != "sampler" and config.era_balance:
        raise RunError(f"--era-balance needs a sampler (--balance sampler or sampler:P), not '{config.balance}'")
    if config.preset not in PRESETS:
        raise PresetError(f"unknown augmentation preset '{config.preset}' (choose from: {', '.join(PRESETS)})")
    if config.epochs < 1 or config.batch_size < 1:
        raise RunError("--epochs and --batch-size must be at least 1")
    if config.colour_constancy and not config.colour_constancy >= 1:
        raise RunError(f"--colour-constancy must be a Minkowski norm >= 1 (6 is usual) or 0 for off, "
                       f"not {config.colour_constancy}")
    if config.protocol not in ("leak-free", "leaky"):
        raise RunError(f"unknown protocol '{config.protocol}' (leak-free or leaky)")
    build_spec(config, num_classes=2)  # unknown model names fail here


def build_spec(config: TrainConfig, num_classes: int) -> ModelSpec:
    mean, std = default_normalization(config.model)
    spec = ModelSpec(name=config.model, num_classes=num_classes, image_size=resolve_image_size(config),
                     mean=tuple(mean), std=tuple(std), colour_constancy=config.colour_constancy)
    if not spec.is_seed:
        import timm

        if not timm.is_model(spec.name):
            build_model(spec)  # raises ModelError with suggestions
    return spec


def resumed_config(config: TrainConfig) -> TrainConfig:
    """On --resume the run's own config wins; only the epoch budget and runtime knobs may change."""
    saved = TrainConfig.from_dict(read_json(Path(config.out) / "config.json")["config"])
    if config.model != saved.model and config.model != TrainConfig.model:
        raise RunError(f"{display_name(config.out)} was trained with model '{saved.model}', not '{config.model}'")
    if config.epochs is not None:  # not given: finish the epochs the run was started with, not the recipe's
        saved.epochs = config.epochs
    for name in ("num_workers", "threads", "accelerator", "devices", "num_nodes", "strategy", "progress"):
        setattr(saved, name, getattr(config, name))
    saved.resume = True
    return saved


def train(config: TrainConfig, log=print) -> Path:
    """Train one model and write its run folder; returns the folder."""
    if config.resume:
        config = resumed_config(config)
    config = _with_absolute_paths(config.resolved())
    config.precision = resolve_precision(config)
    validate_config(config)
    # In a distributed run every process runs this function; only the first may create or change the run folder.
    writer = is_launch_rank_zero()
    if not writer:
        log = _silent
    run_dir = prepare_run_dir(config) if writer else Path(config.out)
    last = run_dir / CHECKPOINT_DIR / LAST
    if config.resume:
        _check_resumable(last)
    pl = _lightning()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    if config.threads:
        torch.set_num_threads(config.threads)
    pretrained = _pretrained_state(config)  # a bad weights file fails here, before anything is written
    # where this process writes while starting: nowhere (not rank 0), the run (resume), or a staging folder
    staging = None if not writer else run_dir if config.resume else _staging_dir(run_dir)
    data = prepare_data(config, staging, log=log)
    spec = build_spec(config, num_classes=len(data.classes))
    model = build_model(spec)
    model.early_stage_modules(config.freeze_stages)  # an impossible --freeze-stages fails before training
    if pretrained is not None:
        from melanoma.weights import load_pretrained

        load_pretrained(model, pretrained, source=config.weights, log=log)
        # A zero head starts from uniform predictions (loss ln K) instead of confident random ones (loss ~7 here).
        for parameter in model.backbone_and_head()[1]:
            nn.init.zeros_(parameter)
    model = model.to(memory_format=torch.channels_last)
    if writer and not config.resume:
        _write_run_header(staging, config, spec, data)
        _promote_staging(staging, run_dir, config.overwrite)
    history = _read_history(run_dir) if config.resume else []
    trainer, module, loaders = _build_trainer(config, model, data, run_dir, spec, history)
    trainer.fit(module, *loaders, ckpt_path=str(last) if config.resume else None,
                weights_only=True if config.resume else None)
    if trainer.is_global_zero:
        finish_run(run_dir, data, config, history, log)
    return run_dir


def _with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """Input paths as absolute ones, so the config.json that records them can be re-read from any folder."""
    def absolute(path):
        return str(Path(path).expanduser().resolve()) if path else path

    return replace(config, data=absolute(config.data), audit=absolute(config.audit),
                   truth=[absolute(path) for path in config.truth] if config.truth else config.truth)


def _silent(*_args, **_kwargs) -> None:
    pass


def _pretrained_state(config: TrainConfig):
    if not config.weights or config.weights == "none" or config.resume:
        return None
    from melanoma.weights import imagenet_state_dict

    return imagenet_state_dict(config.model, config.weights)


def _check_resumable(last: Path) -> None:
    if not last.is_file():
        raise RunError(f"{display_name(last)}: no checkpoint to resume from")
    try:
        torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(f"{display_name(last)}: checkpoint is corrupt or truncated ({exc}); nothing was changed. "
                       "Start again with --overwrite") from exc


def _staging_dir(run_dir: Path) -> Path:
    """A new run is assembled beside its final place, so a failed start never touches an existing folder."""
    staging = run_dir.with_name(f".{run_dir.name}.starting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _promote_staging(staging: Path, run_dir: Path, overwrite: bool) -> Path:
    if run_dir.exists():
        if not overwrite and any(run_dir.iterdir()):
            raise RunError(f"{display_name(run_dir)} appeared while starting; not overwriting it")
        shutil.rmtree(run_dir)
    os.replace(staging, run_dir)
    return run_dir


def _write_run_header(run_dir: Path, config: TrainConfig, spec: ModelSpec, data: PreparedData) -> None:
    write_json(run_dir / "config.json", {
        "config": asdict(config), "model": spec.to_dict(), "classes": data.classes,
        "preprocessing": {"image_size": spec.image_size, "input": "RGB uint8 resized (bicubic/antialiased) to "
                          f"{spec.image_size}x{spec.image_size}, as float pixels in [0, 255]",
                          "normalization_inside_model": {"mean": spec.mean, "std": spec.std}},
        "environment": environment(), "command": " ".join(sys.argv)})
    write_json(run_dir / "data.json", data.summary)
    write_csv(run_dir / "split.csv", data.split_rows, ["path", "label", "role"])
    (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)


def _read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(handle)]
    for row in rows:
        row["epoch"] = int(row["epoch"])
    return rows


def _build_trainer(config: TrainConfig, model, data: PreparedData, run_dir: Path, spec: ModelSpec, history):
    pl = _lightning()
    transform = train_transform(config.preset, spec.image_size)
    balance = parse_balance(config.balance)
    train_set = ArrayDataset(data.train_images, data.train_labels, transform)
    eras = [acquisition_era(name) for name in train_image_names(data)] if config.era_balance else None
    sampler = balanced_sampler(data.train_labels, len(data.classes), config.seed, balance.power, groups=eras) \
        if balance.mode == "sampler" else None
    generator = torch.Generator().manual_seed(config.seed)
    generators = [generator] + ([sampler.generator] if sampler is not None else [])
    # Every process draws the same epoch order (same seeded generator) and takes its own share of each batch.
    train_batches = ShardedBatchSampler(sampler or RandomSampler(train_set, generator=generator), config.batch_size)
    train_loader = DataLoader(train_set, batch_sampler=train_batches, num_workers=config.num_workers,
                              generator=generator, persistent_workers=config.num_workers > 0,
                              pin_memory=uses_gpu(config))  # page-locked batches copy to the GPU asynchronously
    val_set = ArrayDataset(data.val_images, data.val_labels)
    val_loader = DataLoader(val_set, batch_sampler=ShardedBatchSampler(SequentialSampler(val_set),
                                                                       config.batch_size * 2), num_workers=0)
    weights = class_weights(data.train_labels, len(data.classes)) if balance.mode == "weights" else None
    module = build_lightning_module(model, config, weights, train_batches)
    trainer = pl.Trainer(
        max_epochs=config.epochs, accelerator=config.accelerator, devices=config.devices,
        num_nodes=config.num_nodes, strategy=config.strategy, precision=config.precision,
        deterministic=True, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=config.progress, num_sanity_val_steps=0, default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # ShardedBatchSampler: Lightning's sampler would repeat samples to pad
        callbacks=_callbacks(config, run_dir, spec, data.classes, history, generators, train_batches))
    return trainer, module, (train_loader, val_loader)


def finish_run(run_dir: Path, data: PreparedData, config: TrainConfig, history: list[dict], log=print) -> dict:
    """Score the best checkpoint on validation and Test (all / clean), write metrics.json and curves.png."""
    from melanoma.calibration import apply_temperature, calibration_summary
    from melanoma.evaluation import bootstrap_ci, compute_metrics, predict_probabilities
    from melanoma.plots import training_curves_figure

    payload = load_checkpoint(run_dir / CHECKPOINT_DIR / BEST)
    model, spec = model_from_checkpoint(payload)
    device = evaluation_device(config)
    model.to(device)
    raw_val_probs = predict_probabilities(model, data.val_images, spec.image_size, tta=config.tta, device=device)
    calibration = _calibrate(run_dir, raw_val_probs, data.val_labels)
    val_probs = apply_temperature(raw_val_probs, calibration["temperature"])
    alert = _alert_threshold(data, val_probs, config.target_sensitivity)
    threshold = alert["threshold"] if alert else None
    metrics = {"best_epoch": payload["epoch"], "epochs_run": len(history), "tta": config.tta,
               "final_epoch": history[-1] if history else {}, "alert": alert, "calibration": calibration,
               "validation": compute_metrics(data.val_labels, val_probs, data.classes, threshold)}
    by_era = validation_by_era(data, val_probs, threshold)
    if by_era:
        metrics["validation_by_era"] = by_era
    if len(data.test_labels):
        raw_test_probs = predict_probabilities(model, data.test_images, spec.image_size, tta=config.tta,
                                               device=device)
        test_probs = apply_temperature(raw_test_probs, calibration["temperature"])
        calibration["test_before"] = calibration_summary(raw_test_probs, data.test_labels)
        calibration["test_after"] = calibration_summary(test_probs, data.test_labels)
        metrics["test"] = {}
        for subset, mask in (("all", np.ones(len(data.test_labels), dtype=bool)), ("clean", ~data.test_leaked)):
            scores = compute_metrics(data.test_labels[mask], test_probs[mask], data.classes, threshold)
            if config.bootstrap and mask.any():
                scores["ci"] = bootstrap_ci(data.test_labels[mask], test_probs[mask], data.classes, threshold,
                                            resamples=config.bootstrap, seed=config.seed)
            metrics["test"][subset] = scores
        write_csv(run_dir / "test_predictions.csv", _prediction_rows(data, test_probs),
                  ["image", "label", "predicted", "leaked", *data.classes])
    write_json(run_dir / "metrics.json", metrics)
    if history:
        save_figure(training_curves_figure(history, title=f"{config.model} ({config.protocol}, {config.balance})"),
                    run_dir / "curves.png")
    from melanoma.report import write_run_report

    write_run_report(run_dir)
    _log_metrics(metrics, log)
    return metrics


def validation_by_era(data: PreparedData, val_probs: np.ndarray, threshold: float | None) -> dict:
    """Validation metrics per acquisition era (see melanoma.data.acquisition_era), where both eras are present.

    A score over all validation images rewards telling the eras apart, which here also tells most nevi from most
    melanomas; within one era that shortcut is no use, so these are the figures to watch for new images."""
    from melanoma.evaluation import compute_metrics

    names = [row["path"] for row in data.split_rows if row["role"] == "val"]
    eras = np.array([acquisition_era(name) for name in names])
    if len(set(eras)) < 2:
        return {}
    return {era: compute_metrics(data.val_labels[eras == era], val_probs[eras == era], data.classes, threshold)
            for era in ERAS if (eras == era).any()}


def _calibrate(run_dir: Path, val_probs: np.ndarray, val_labels: np.ndarray) -> dict:
    """Temperature scaling on validation, with its before/after measures and a reliability diagram."""
    temperature = fit_temperature(val_probs, val_labels)
    after = apply_temperature(val_probs, temperature)
    save_figure(reliability_figure(val_probs, after, val_labels, temperature), run_dir / "reliability.png")
    return {"temperature": temperature, "fitted_on": "validation",
            "validation_before": calibration_summary(val_probs, val_labels),
            "validation_after": calibration_summary(after, val_labels)}


def _alert_threshold(data: PreparedData, val_probs: np.ndarray, target: float) -> dict | None:
    from melanoma.evaluation import threshold_for_sensitivity

    if MELANOMA not in data.classes:
        return None
    index = data.classes.index(MELANOMA)
    chosen = threshold_for_sensitivity(data.val_labels == index, val_probs[:, index], target)
    return chosen | {"chosen_on": "validation"}


def _prediction_rows(data: PreparedData, probs: np.ndarray) -> list[dict]:
    rows = []
    for name, label, leaked, row in zip(data.test_names, data.test_labels, data.test_leaked, probs):
        rows.append({"image": name, "label": data.classes[label], "predicted": data.classes[int(row.argmax())],
                     "leaked": int(leaked), **{c: f"{p:.6f}" for c, p in zip(data.classes, row)}})
    return rows


def _log_metrics(metrics: dict, log) -> None:
    val = metrics["validation"]
    log(f"best epoch {metrics['best_epoch']}: validation accuracy {val['accuracy']:.3f}, "
        f"balanced accuracy {val['balanced_accuracy']:.3f}")
    for era, m in metrics.get("validation_by_era", {}).items():
        mel = m.get("melanoma", {})
        auc = f"{mel['auc']:.3f}" if mel.get("auc") is not None else "n/a"
        melanomas = m["per_class"].get(MELANOMA, {}).get("support", 0)
        log(f"  validation, {era} images (n={m['n']}, {melanomas} melanomas): balanced accuracy "
            f"{m['balanced_accuracy']:.3f}, melanoma AUC {auc}")
    for subset in ("all", "clean"):
        if "test" in metrics:
            m = metrics["test"][subset]
            mel = m.get("melanoma", {})
            auc = f"{mel['auc']:.3f}" if mel.get("auc") is not None else "n/a"
            sens = f", sensitivity {mel['sensitivity']:.2f} / specificity {mel['specificity']:.2f} at the alert" \
                if mel.get("sensitivity") is not None and mel.get("specificity") is not None else ""
            log(f"test ({subset}, n={m['n']}): accuracy {m['accuracy']:.3f}, balanced accuracy "
                f"{m['balanced_accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, melanoma AUC {auc}{sens}")
