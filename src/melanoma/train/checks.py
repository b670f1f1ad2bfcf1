"""The checks on a :class:`~melanoma.config.TrainConfig` before any data is read or anything written, and
the rules of ``--resume``: which settings a resumed run keeps, and which flags may change."""
from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path

from melanoma.config import TrainConfig, choices_of, flag_of, option_of, resolve_image_size
from melanoma.core.errors import PresetError, RunError
from melanoma.core.text import display_name
from melanoma.data.metadata import check_metadata_files
from melanoma.data.transforms import PRESETS
from melanoma.models.catalog import SEED_MODELS
from melanoma.models.networks import ModelSpec, build_model, default_normalization
from melanoma.runs.layout import CONFIG, read_run_json
from melanoma.train.augment import AUGMENT_ON
from melanoma.train.balance import parse_balance
from melanoma.train.tracking import check_tracking


def validate_config(config: TrainConfig) -> None:
    """Every value checked before any data is read or anything written, each with a one-line error."""
    if parse_balance(config.balance).mode != "sampler" and config.era_balance:
        raise RunError(f"--era-balance needs a sampler (--balance sampler or sampler:P), not '{config.balance}'")
    if config.preset not in PRESETS:
        raise PresetError(f"unknown augmentation preset '{config.preset}' (choose from: {', '.join(PRESETS)})")
    if config.epochs is None and config.image_steps is None:
        raise RunError("give the training length as --epochs or --image-steps")
    for spec in fields(TrainConfig):  # None values mean "the recipe's" and are not checked
        if (bounds := option_of(spec).range) is not None:
            check_range(flag_of(spec), getattr(config, spec.name), *bounds)
    if config.colour_constancy and not config.colour_constancy >= 1:
        raise RunError(f"--colour-constancy must be a Minkowski norm >= 1 (6 is usual) or 0 for off, "
                       f"not {config.colour_constancy}")
    if config.protocol not in choices_of("protocol"):
        raise RunError(f"unknown protocol '{config.protocol}' ({' or '.join(choices_of('protocol'))})")
    if config.model in SEED_MODELS and config.weights not in (None, "none"):
        raise RunError(f"--weights applies to ImageNet backbones; '{config.model}' is trained from scratch")
    build_spec(config, num_classes=2)  # unknown model names fail here
    if config.rendering is not None and not isinstance(config.rendering, bool):
        raise RunError(f"--rendering must be true or false, not {config.rendering!r}")
    if config.augment_on not in AUGMENT_ON:
        raise RunError(f"unknown --augment-on '{config.augment_on}' (choose from: {', '.join(AUGMENT_ON)})")
    check_tracking(config.logger, config.tracking_uri)
    if config.external:
        from melanoma.assess.external import read_external

        read_external(config.external)  # a missing or malformed labels.csv stops the run before training
    check_metadata_files(config.metadata)


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
            refused.append(flag_of(spec))
    return refused


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """Input paths as absolute ones, so the config.json that records them can be re-read from any folder."""
    def absolute(path):
        return str(Path(path).expanduser().resolve()) if path else path

    return replace(config, data=[absolute(path) for path in config.data], audit=absolute(config.audit),
                   external=absolute(config.external),
                   truth=[absolute(path) for path in config.truth] if config.truth else config.truth,
                   metadata=[absolute(path) for path in config.metadata])
