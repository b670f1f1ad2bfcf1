"""What a training run is asked to do: :class:`TrainConfig`, the recipes that fill in its unset fields, and the
checks that every value makes sense before any data is read or anything written."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from melanoma.augment import AUGMENT_ON
from melanoma.balance import parse_balance
from melanoma.data import display_name
from melanoma.metadata import check_metadata_files
from melanoma.models import ModelSpec, SEED_MODELS, build_model, default_normalization
from melanoma.run import CONFIG, RunError, read_run_json
from melanoma.tracking import check_tracking
from melanoma.transforms import PRESETS, PresetError


@dataclass
class TrainConfig:
    data: list[str]                   # data sources: folders, manifests, ISIC Archive downloads (see melanoma.sources)
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
    metadata: list[str] = field(default_factory=list)  # --metadata CSVs keyed by image id (melanoma.metadata)
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
    logger: str = "none"              # none | tensorboard | mlflow (see melanoma.tracking)
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


def validate_config(config: TrainConfig) -> None:
    """Every value checked before any data is read or anything written, each with a one-line error."""
    if parse_balance(config.balance).mode != "sampler" and config.era_balance:
        raise RunError(f"--era-balance needs a sampler (--balance sampler or sampler:P), not '{config.balance}'")
    if config.preset not in PRESETS:
        raise PresetError(f"unknown augmentation preset '{config.preset}' (choose from: {', '.join(PRESETS)})")
    if config.epochs is None and config.image_steps is None:
        raise RunError("give the training length as --epochs or --image-steps")
    for name, (low, high, closed_low, closed_high) in _RANGES.items():
        check_range(f"--{_FLAG_NAMES.get(name, name.replace('_', '-'))}", getattr(config, name), low, high,
                    closed_low, closed_high)
    if config.colour_constancy and not config.colour_constancy >= 1:
        raise RunError(f"--colour-constancy must be a Minkowski norm >= 1 (6 is usual) or 0 for off, "
                       f"not {config.colour_constancy}")
    if config.protocol not in ("leak-free", "leaky"):
        raise RunError(f"unknown protocol '{config.protocol}' (leak-free or leaky)")
    if config.model in SEED_MODELS and config.weights not in (None, "none"):
        raise RunError(f"--weights applies to ImageNet backbones; '{config.model}' is trained from scratch")
    build_spec(config, num_classes=2)  # unknown model names fail here
    if config.rendering is not None and not isinstance(config.rendering, bool):
        raise RunError(f"--rendering must be true or false, not {config.rendering!r}")
    if config.augment_on not in AUGMENT_ON:
        raise RunError(f"unknown --augment-on '{config.augment_on}' (choose from: {', '.join(AUGMENT_ON)})")
    check_tracking(config.logger, config.tracking_uri)
    if config.external:
        from melanoma.external import read_external

        read_external(config.external)  # a missing or malformed labels.csv stops the run before training
    check_metadata_files(config.metadata)


# name: (low, high, low included, high included); None values mean "the recipe's" and are not checked
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "epochs": (1, 10_000, True, True), "image_steps": (1, 100_000_000, True, True),
    "batch_size": (1, 4096, True, True), "lr": (0, 10, False, True), "weight_decay": (0, 1, True, True),
    "label_smoothing": (0, 1, True, False), "warmup_epochs": (0, 1000, True, True),
    "freeze_epochs": (0, 10_000, True, True), "freeze_stages": (0, 20, True, True),
    "backbone_lr_scale": (0, 10, True, True), "ema_decay": (0, 1, True, False),
    "colour_constancy": (0, 100, True, True),
    "input_blur": (0, 10, True, True), "image_size": (16, 1024, True, True), "val_fraction": (0, 1, False, False),
    "target_sensitivity": (0, 1, False, True), "bootstrap": (0, 100_000, True, True),
    "early_stopping": (0, 10_000, True, True), "num_workers": (0, 256, True, True), "threads": (1, 1024, True, True),
    "num_nodes": (1, 100_000, True, True),
}
_FLAG_NAMES = {"ema_decay": "ema", "num_workers": "workers"}


def check_range(flag: str, value, low: float, high: float, closed_low: bool = True, closed_high: bool = True) -> None:
    """A finite number within [low, high] (or open ends), else a RunError naming the flag; None passes."""
    if value is None:
        return
    above = value >= low if closed_low else value > low
    below = value <= high if closed_high else value < high
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (above and below):
        bounds = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
        raise RunError(f"{flag} must be a number in {bounds}, not {value}")


def build_spec(config: TrainConfig, num_classes: int) -> ModelSpec:
    mean, std = default_normalization(config.model)
    spec = ModelSpec(name=config.model, num_classes=num_classes, image_size=resolve_image_size(config),
                     mean=tuple(mean), std=tuple(std), colour_constancy=config.colour_constancy,
                     input_blur=config.input_blur or 0.0)
    if not spec.is_seed:
        import timm

        if not timm.is_model(spec.name):
            build_model(spec)  # raises ModelError with suggestions
    return spec


# What --resume may change: the length (to extend a run), where it is now, and how the machine runs it. Every other
# setting is the run's own: given with a different value, it is refused, not silently ignored.
RESUME_MAY_CHANGE = ("epochs", "image_steps", "out", "resume", "overwrite", "num_workers", "threads", "accelerator",
                     "devices", "num_nodes", "strategy", "precision", "progress")


def resumed_config(config: TrainConfig) -> TrainConfig:
    """On --resume the run's own config wins; only the length and runtime knobs may change (RESUME_MAY_CHANGE)."""
    saved = TrainConfig.from_dict(read_run_json(Path(config.out) / CONFIG, require="config")["config"])
    if config.model != saved.model and config.model != TrainConfig.model:
        raise RunError(f"{display_name(config.out)} was trained with model '{saved.model}', not '{config.model}'")
    if refused := settings_changed_on_resume(config, saved):
        raise RunError(f"{display_name(config.out)} continues with its own settings; {', '.join(refused)} cannot "
                       "change on --resume (only --epochs/--image-steps and runtime flags can): drop them, or start "
                       "a new run with another --out")
    if config.image_steps is not None:  # a new length in images: the epoch count follows from the training split
        saved.image_steps, saved.epochs = config.image_steps, config.epochs
    elif config.epochs is not None:  # not given: finish the epochs the run was started with, not the recipe's
        saved.epochs = config.epochs
    for name in ("num_workers", "threads", "accelerator", "devices", "num_nodes", "strategy", "progress"):
        setattr(saved, name, getattr(config, name))
    if config.precision is not None:
        saved.precision = config.precision
    saved.out = config.out  # a copied or moved run resumes where it is now, not where it was made
    saved.resume = True
    return saved


def settings_changed_on_resume(config: TrainConfig, saved: TrainConfig) -> list[str]:
    """The flags given with --resume (any value other than the default) that differ from the run's own."""
    def comparable(name: str, value):
        if name in ("data", "truth", "metadata") and value:
            return [str(Path(path).expanduser().resolve()) for path in value]
        return str(Path(value).expanduser().resolve()) if name == "audit" and value else value

    refused = []
    for spec in fields(TrainConfig):
        name = spec.name
        if name in RESUME_MAY_CHANGE or name == "model":
            continue
        given = getattr(config, name)
        default = spec.default_factory() if callable(spec.default_factory) else spec.default
        if given is None or given == [] or given == default:  # not given
            continue
        if comparable(name, given) != comparable(name, getattr(saved, name)):
            refused.append("--no-clean" if name == "clean" else f"--{_FLAG_NAMES.get(name, name.replace('_', '-'))}")
    return refused


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """Input paths as absolute ones, so the config.json that records them can be re-read from any folder."""
    def absolute(path):
        return str(Path(path).expanduser().resolve()) if path else path

    return replace(config, data=[absolute(path) for path in config.data], audit=absolute(config.audit),
                   external=absolute(config.external),
                   truth=[absolute(path) for path in config.truth] if config.truth else config.truth,
                   metadata=[absolute(path) for path in config.metadata])
