"""What a training run is asked to do: :class:`TrainConfig` and the recipes that fill in its unset fields.

Torch-free, so that the command line, the run folder's config.json check and training all read this one schema
without importing torch; the checks on the values, and the rules of ``--resume``, are in :mod:`melanoma.train.checks`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from melanoma.core.errors import RunError
from melanoma.models.catalog import SEED_MODELS


@dataclass
class TrainConfig:
    data: list[str]                   # data sources: folders, manifests, ISIC Archive downloads (melanoma.data.sources)
    out: str
    model: str = "tf_efficientnet_lite0"
    recipe: str | None = None         # seed | finetune; default: seed for the seed CNNs, finetune otherwise
    # Recipe fields: None means "the recipe's value" (see RECIPES); set one to override it.
    preset: str | None = None
    rendering: bool | None = None     # random re-rendering (white balance, gamma, downscale + JPEG) before the preset
    balance: str | None = None
    era_balance: bool | None = None   # sampler only: equal draws of each acquisition era within a class
    epochs: int | None = None
    image_steps: int | None = None    # training length in images drawn (epochs = round(image_steps / train images))
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
    input_blur: float | None = None   # Gaussian sigma (pixels at image_size) inside the model; 0 = off
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
    image_root: str | None = None     # folder that manifest image paths are relative to (as `audit --image-root`)
    truth: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)  # --metadata CSVs keyed by image id (melanoma.data.metadata)
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
    augment_on: str = "auto"          # loader (per image) | device (batched where the model trains) | auto
    logger: str = "none"              # none | tensorboard | mlflow (see melanoma.train.tracking)
    tracking_uri: str | None = None   # MLflow store; default: MLflow's own
    external: str | None = None       # external validation folder (labels.csv), reported only; default: none

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):  # one source, or a config.json written before several were possible
            self.data = [str(self.data)]

    def resolved(self) -> "TrainConfig":
        """A copy with every recipe field filled in: explicit values win over the recipe's."""
        recipe = self.recipe or ("seed" if self.model in SEED_MODELS else "finetune")
        if recipe not in RECIPES:
            raise RunError(f"unknown recipe '{recipe}' (choose from: {', '.join(RECIPES)})")
        values = {name: getattr(self, name) for name in RECIPES[recipe]}
        filled = {name: RECIPES[recipe][name] if value is None else value for name, value in values.items()}
        # The length is given one way: whichever of epochs / image steps was set explicitly replaces the recipe's
        # length (a resumed run has both, and its epoch count stands).
        if self.image_steps is not None and self.epochs is None:
            filled["epochs"] = None
        elif self.epochs is not None and self.image_steps is None:
            filled["image_steps"] = None
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
    "seed": dict(preset="seed", rendering=False, balance="none", era_balance=False, epochs=20, image_steps=None,
                 batch_size=32, lr=1e-3, optimizer="adam", weight_decay=0.0, label_smoothing=0.0, schedule="constant",
                 warmup_epochs=0.0, freeze_epochs=0, freeze_stages=0, backbone_lr_scale=1.0, ema_decay=0.0, tta=False,
                 weights="none", image_size=180, input_blur=0.0),
    # Fine-tuning an ImageNet backbone on ~2,000 images on a CPU (chosen on the validation split, never on Test):
    "finetune": dict(
        preset="dermoscopy",      # lesions have no orientation; colour varies between dermatoscopes
        # a picture resized and re-saved by another source keeps its answer: cross-source copy agreement 0.77 -> 0.93,
        # external melanoma AUC 0.66 -> 0.70 (docs/results.md, 2026-12-02 rule); --no-rendering turns it off
        rendering=True,
        # batches drawn with class shares proportional to sqrt(class size): rare classes (DF, AK, VASC) are seen far
        # more often than their share, nevus (40 % of the two-source pool) gets about a quarter of each batch. Equal
        # shares raised validation balanced accuracy by 0.034 but cost 0.044 old-era melanoma AUC (docs/results.md)
        balance="sampler:0.5",
        era_balance=False,
        # Length in images drawn, not epochs (a pool of ~6,400 images with isic-extra, 5 epochs; ~1,950 with the
        # course set alone, 18 epochs). 128 px for 28,000 steps won the two-source rule on old-era validation melanoma
        # AUC over 144 and 180 px (docs/results.md); the README main job, install included, took 17.9 minutes with it
        # on the 2-core CPU without bf16
        epochs=None, image_steps=28_000, batch_size=32,
        lr=1e-3,                  # head LR; the backbone gets backbone_lr_scale of it
        optimizer="adamw", weight_decay=0.01,
        label_smoothing=0.1,      # folder labels are noisy (see the audit)
        schedule="cosine", warmup_epochs=1.0,
        freeze_epochs=1,          # head warm-up on a frozen backbone, so random head gradients do not wreck it
        freeze_stages=2,          # stem + first two stages (edges, colours) stay ImageNet: 2-3x faster on a CPU
        backbone_lr_scale=0.3,
        ema_decay=0.99,           # ~100-step horizon, about 2 epochs here
        # 8-view TTA gained +0.019 old-era validation melanoma AUC but costs ~7x the scoring time: over the 20 minutes
        tta=False, weights="package",
        # a Gaussian blur inside the model: isic-extra's files are half as sharp as the course set's copies of the same
        # pictures, and sharpness must not tell the model the source (benchmarks/source_shortcut.py)
        image_size=128, input_blur=0.8),
}


def with_epochs(config: TrainConfig, train_images: int) -> TrainConfig:
    """The epoch count for a length given in image steps, once the training split's size is known (a resumed run
    already has its count)."""
    if config.epochs is not None or config.image_steps is None:
        return config
    return replace(config, epochs=max(1, round(config.image_steps / max(1, train_images))))


def resolve_image_size(config: TrainConfig) -> int:
    return config.image_size or config.resolved().image_size


def split_seed(config: TrainConfig) -> int:
    return config.seed if config.split_seed is None else config.split_seed
