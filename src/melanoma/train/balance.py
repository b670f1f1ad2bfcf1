"""Class balancing, chosen by flag: ``none``, ``weights``, ``sampler`` (or ``sampler:P``) or ``expand:N`` (the
course's Augmentor recipe).

``sampler`` draws every class equally often; ``sampler:P`` draws class c with probability proportional to n_c^(1-P),
so ``sampler:1`` is full balance and ``sampler:0.5`` gives class shares proportional to sqrt(n_c).

Everything here is computed from the *training* split only, after the split: the course notebook expanded before
splitting, so copies of validation images were trained on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import WeightedRandomSampler

from melanoma.core.errors import DataError


@dataclass(frozen=True)
class Balance:
    mode: str            # none | weights | sampler | expand
    copies: int = 0      # expand: generated images per class
    power: float = 1.0   # sampler: per-image weight 1 / n_c^power

    def __str__(self) -> str:
        if self.mode == "expand":
            return f"expand:{self.copies}"
        return f"sampler:{self.power:g}" if self.mode == "sampler" and self.power != 1.0 else self.mode


def parse_balance(text: str) -> Balance:
    text = text.strip()
    if text in ("none", "weights", "sampler"):
        return Balance(text)
    sampler = re.fullmatch(r"sampler:([0-9.]+)", text)
    if sampler:
        power = float(sampler.group(1)) if re.fullmatch(r"\d*\.?\d+", sampler.group(1)) else -1
        if not 0 < power <= 1:
            raise DataError(f"'{text}': the sampler power must be in (0, 1], e.g. sampler:0.5")
        return Balance("sampler", power=power)
    match = re.fullmatch(r"expand:(\d+)", text)
    if match and int(match.group(1)) > 0:
        return Balance("expand", int(match.group(1)))
    if text.startswith("expand"):
        raise DataError(f"'{text}': expand needs a positive number of copies per class, e.g. expand:500")
    raise DataError(f"unknown balancing '{text}' (choose from: none, weights, sampler, sampler:P, expand:N)")


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels), minlength=num_classes)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """'balanced' loss weights n / (k * n_c), so that every present class contributes equally; absent classes get 0."""
    counts = class_counts(labels, num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampler(labels: np.ndarray, num_classes: int, seed: int, power: float = 1.0,
                     groups: Sequence[str] | None = None) -> WeightedRandomSampler:
    """Draws class c with probability proportional to n_c^(1-power) (power 1: every class equally often), with
    replacement; one epoch = len(labels) draws.

    With ``groups`` (e.g. each image's acquisition era), a class's share is further split equally between the groups
    present in that class, so a group cannot stand in for the class by being over-represented in it.
    """
    labels = np.asarray(labels)
    counts = class_counts(labels, num_classes).astype(np.float64)
    per_sample = 1.0 / counts[labels] ** power
    if groups is not None:
        per_sample = per_sample * within_class_group_factor(labels, groups)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(per_sample, dtype=torch.double), num_samples=len(labels),
                                 replacement=True, generator=generator)


def within_class_group_factor(labels: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Per-image factor n_c / (g_c * n_cg): each of a class's g_c groups gets an equal share of the class's draws,
    and the class's total share is unchanged."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} group names for {len(labels)} images")
    factor = np.ones(len(labels))
    for label in np.unique(labels):
        in_class = labels == label
        names, sizes = np.unique(groups[in_class], return_counts=True)
        for name, size in zip(names, sizes):
            factor[in_class & (groups == name)] = in_class.sum() / (len(names) * size)
    return factor


def augmentor_rotate(image: np.ndarray, rng: np.random.Generator, max_degrees: float = 10.0,
                     probability: float = 0.7) -> np.ndarray:
    """Augmentor's ``rotate(probability=0.7, max_left_rotation=10, max_right_rotation=10)``: rotate, crop the largest
    inner rectangle (no black corners) and resize back."""
    if rng.random() >= probability:
        return image.copy()
    angle = rng.uniform(-max_degrees, max_degrees)
    height, width = image.shape[:2]
    rotated = Image.fromarray(image).rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    radians = np.deg2rad(abs(angle))
    # Largest axis-aligned rectangle inside the rotated original (what Augmentor crops to).
    scale = 1.0 / (np.cos(radians) + np.sin(radians) * max(width, height) / min(width, height))
    crop_w, crop_h = width * scale, height * scale
    cx, cy = rotated.width / 2, rotated.height / 2
    box = (int(round(cx - crop_w / 2)), int(round(cy - crop_h / 2)), int(round(cx + crop_w / 2)),
           int(round(cy + crop_h / 2)))
    return np.asarray(rotated.crop(box).resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def expand(images: np.ndarray, labels: np.ndarray, copies: int, num_classes: int,
           seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``copies`` rotated images per present class, each drawn (with replacement) from that class's ``images``.

    Returns the generated images, their labels and the index in ``images`` each was generated from, so that a test
    can prove no copy of a validation image reaches training.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    generated, generated_labels, sources = [], [], []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) == 0:
            continue
        for source in rng.choice(members, size=copies, replace=True).tolist():
            generated.append(augmentor_rotate(images[source], rng))
            generated_labels.append(label)
            sources.append(source)
    if not generated:
        return images[:0].copy(), labels[:0].copy(), np.zeros(0, dtype=np.int64)
    return np.stack(generated), np.asarray(generated_labels), np.asarray(sources, dtype=np.int64)
