"""The training loop on Lightning: the LightningModule, the learning-rate schedule, callbacks (freezing, history and
checkpoints, EMA, the progress bar, tracking) and the Trainer that runs them over the in-memory arrays. Training images
are augmented in the DataLoader one at a time, or batched on the training device (``--augment-on``, see
:mod:`melanoma.train.augment`)."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence, Sized

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from melanoma.config import TrainConfig, choices_of
from melanoma.core.errors import RunError
from melanoma.core.hardware import uses_gpu
from melanoma.core.io import write_csv
from melanoma.data.records import acquisition_era
from melanoma.data.transforms import to_model_input, train_transform
from melanoma.models.networks import ModelSpec
from melanoma.runs.checkpoint import save_best
from melanoma.runs.layout import CHECKPOINT_DIR, HISTORY, LAST
from melanoma.train.augment import BatchAugment, epoch_seed, resolve_augment_on
from melanoma.train.balance import balanced_sampler, class_weights, parse_balance
from melanoma.train.distributed import ShardedBatchSampler, is_launch_rank_zero
from melanoma.train.prepare import PreparedData, train_image_names
from melanoma.train.tracking import build_logger, log_epoch, start_tracking


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


def _lightning():
    import lightning.pytorch as pl

    return pl


def seed_everything(seed: int) -> None:
    """Python, numpy and torch seeded, in data-loader workers too."""
    _lightning().seed_everything(seed, workers=True, verbose=False)


def build_lightning_module(model: nn.Module, config: TrainConfig, loss_weights: torch.Tensor | None,
                           train_batches: Sized, batch_augment: BatchAugment | None = None):
    """``train_batches`` is the training batch sampler: its length (batches per epoch on this process) is only known
    once the process group runs, so the LR schedule reads it when the optimizers are made. With ``batch_augment``
    training batches are augmented once they are on the training device."""
    pl = _lightning()

    class LesionClassifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=config.label_smoothing)
            self._sums: dict[str, torch.Tensor] = {}  # stage -> (loss sum, correct, count) on this process

        def forward(self, pixels):
            return self.model(pixels)

        def on_after_batch_transfer(self, batch, dataloader_idx):
            if batch_augment is None or not self.trainer.training:
                return batch
            images, labels = batch
            return batch_augment(images), labels

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
                self.log(name, value, prog_bar=True, sync_dist=True, logger=False)  # tracked per epoch instead
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

    if config.schedule not in choices_of("schedule"):
        raise RunError(f"unknown schedule '{config.schedule}' (constant or cosine)")
    return factor


# ---------------------------------------------------------------------------------------------------------------
# Callbacks: freezing, history, checkpoints


def _callbacks(config: TrainConfig, run_dir: Path, spec: ModelSpec, classes: list[str], history: list[dict],
               generators: Sequence[torch.Generator] = (), train_batches: Sized = (),
               batch_augment: BatchAugment | None = None, tracked: dict | None = None):
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
        """history.csv each epoch, last.ckpt (for --resume) and best.pt (lowest validation loss), all atomic; the same
        rows to the tracking logger, if any."""

        def __init__(self):
            self.best_loss = math.inf
            self.epoch_start = time.perf_counter()
            self.val_metrics: dict[str, float] = {}

        def on_fit_start(self, trainer, module):
            if trainer.is_global_zero:
                start_tracking(trainer.logger, run_dir, tracked or {}, config.resume)

        def on_train_epoch_start(self, trainer, module):
            self.epoch_start = time.perf_counter()
            if trainer.world_size > 1:
                # Each process augments different images, so each needs its own random stream; seeding it from
                # (seed, epoch, rank) also makes a resumed distributed run draw what an uninterrupted one would.
                torch.manual_seed(epoch_seed(config.seed, trainer.current_epoch, trainer.global_rank))
            if batch_augment is not None:  # batched augmentation: its own stream, reseeded the same way
                batch_augment.reseed(config.seed, trainer.current_epoch, trainer.global_rank)

        def on_validation_epoch_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            # Runs before the EMA callback swaps the training weights back: best.pt holds what was validated.
            self.val_metrics = module.epoch_metrics("val")
            if self.val_metrics["val_loss"] < self.best_loss:
                self.best_loss = self.val_metrics["val_loss"]
                if trainer.is_global_zero:
                    save_best(run_dir, module.model, spec, classes, asdict(config), trainer.current_epoch,
                              self.val_metrics)

        def on_train_epoch_end(self, trainer, module):
            metrics = {**module.epoch_metrics("train"), **self.val_metrics}
            self.val_metrics = {}
            row = {"epoch": trainer.current_epoch + 1, **{k: metrics.get(k) for k in HISTORY_METRICS},
                   "lr": trainer.optimizers[0].param_groups[-1]["lr"],
                   "seconds": round(time.perf_counter() - self.epoch_start, 2)}
            history.append(row)
            if trainer.is_global_zero:
                write_csv(run_dir / HISTORY, history, HISTORY_COLUMNS)
                log_epoch(trainer.logger, row)
                if config.progress and not interactive():  # a log file: one line per epoch, not bar redraws
                    print(epoch_line(row, trainer.max_epochs), file=sys.stderr, flush=True)
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
    if config.progress and interactive():
        callbacks.append(_progress_bar())
    return callbacks


def interactive() -> bool:
    """Whether progress goes to a terminal (a redrawn bar) or to a log file (one line per epoch)."""
    return sys.stderr.isatty()


def epoch_line(row: dict, epochs: int) -> str:
    def number(name: str) -> str:
        return "n/a" if row.get(name) is None else f"{row[name]:.3f}"

    return (f"epoch {row['epoch']}/{epochs}: train loss {number('train_loss')} acc {number('train_acc')}, "
            f"val loss {number('val_loss')} acc {number('val_acc')}, {row['seconds']:.0f} s")


def _progress_bar():
    pl = _lightning()
    from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

    class CountingFromOne(pl.callbacks.TQDMProgressBar):
        """Lightning's bar says 'Epoch 0' for the first of 8 epochs; this one says 'Epoch 1/8'."""

        def on_train_epoch_start(self, trainer, *_):
            # Lightning's own method, with our description: calling it and then renaming would print 'Epoch 0'
            # into logs first (pinned lightning; tests/train/test_training.py checks the output)
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


def build_trainer(config: TrainConfig, model, data: PreparedData, run_dir: Path, spec: ModelSpec, history):
    pl = _lightning()
    augment_on = resolve_augment_on(config.augment_on, config.accelerator)
    batch_augment = BatchAugment(config.preset, spec.image_size, rendering=bool(config.rendering)) \
        if augment_on == "device" else None
    # the loader path augments each image as it is fetched; the device path gets the cached uint8 images as they are
    transform = train_transform(config.preset, spec.image_size, bool(config.rendering)) \
        if batch_augment is None else None
    balance = parse_balance(config.balance)
    train_set = ArrayDataset(data.train_images, data.train_labels, transform)
    eras = [acquisition_era(name) for name in train_image_names(data)] if config.era_balance else None
    sampler = balanced_sampler(data.train_labels, len(data.classes), config.seed, balance.power, groups=eras) \
        if balance.mode == "sampler" else None
    generator = torch.Generator().manual_seed(config.seed)
    generators = [generator] + ([sampler.generator] if sampler is not None else [])
    # Every process draws the same epoch order (same seeded generator) and takes its own share of each batch.
    train_batches = ShardedBatchSampler(sampler or RandomSampler(train_set, generator=generator), config.batch_size)
    # page-locked batches copy to the GPU asynchronously
    train_loader = DataLoader(train_set, batch_sampler=train_batches, num_workers=config.num_workers,
                              generator=generator, persistent_workers=config.num_workers > 0,
                              pin_memory=uses_gpu(config.accelerator))
    val_set = ArrayDataset(data.val_images, data.val_labels)
    val_loader = DataLoader(val_set, batch_sampler=ShardedBatchSampler(SequentialSampler(val_set),
                                                                       config.batch_size * 2), num_workers=0)
    weights = class_weights(data.train_labels, len(data.classes)) if balance.mode == "weights" else None
    module = build_lightning_module(model, config, weights, train_batches, batch_augment)
    # only the process that writes the run folder tracks (the MLflow store is opened once, not once per process)
    logger = build_logger(config.logger, config.tracking_uri, run_dir, config.resume) if is_launch_rank_zero() else None
    tracked = {**asdict(config), "augment_path": augment_on}
    trainer = pl.Trainer(
        max_epochs=config.epochs, accelerator=config.accelerator, devices=config.devices,
        num_nodes=config.num_nodes, strategy=config.strategy, precision=config.precision,
        deterministic=True, logger=logger or False, enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=1,  # nothing is logged per step (RunRecorder logs epochs); this only silences a warning
        enable_progress_bar=config.progress and interactive(), num_sanity_val_steps=0, default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # ShardedBatchSampler: Lightning's sampler would repeat samples to pad
        callbacks=_callbacks(config, run_dir, spec, data.classes, history, generators, train_batches, batch_augment,
                             tracked))
    return trainer, module, (train_loader, val_loader)


def quiet_lightning() -> None:
    """Lightning's info lines and the LeafSpec warning off, before a training run prints its own progress."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import; quieten them afterwards)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
