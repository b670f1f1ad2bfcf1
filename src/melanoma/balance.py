"""Class balancing, chosen by flag: ``none``, ``weights``, ``sampler`` or ``expand:N`` (the course's Augmentor recipe).

Everything here is computed from the *training* split only, after the split: the course notebook expanded before
splitting, so copies of validation images were trained on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import WeightedRandomSampler

from melanoma.data import DataError


@dataclass(frozen=True)
class Balance:
    mode: str            # none | weights | sampler | expand
    copies: int = 0      # expand: generated images per class

    def __str__(self) -> str:
        return f"expand:{self.copies}" if self.mode == "expand" else self.mode


def parse_balance(text: str) -> Balance:
    text = text.strip()
    if text in ("none", "weights", "sampler"):
        return Balance(text)
    match = re.fullmatch(r"expand:(\d+)", text)
    if match and int(match.group(1)) > 0:
        return Balance("expand", int(match.group(1)))
    if text.startswith("expand"):
        raise DataError(f"'{text}': expand needs a positive number of copies per class, e.g. expand:500")
    raise DataError(f"unknown balancing '{text}' (choose from: none, weights, sampler, expand:N)")


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels), minlength=num_classes)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """'balanced' loss weights n / (k * n_c), so that every present class contributes equally; absent classes get 0."""
    counts = class_counts(labels, num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampler(labels: np.ndarray, num_classes: int, seed: int) -> WeightedRandomSampler:
    """Draws each class equally often in expectation (with replacement), one epoch = len(labels) draws."""
    counts = class_counts(labels, num_classes)
    per_sample = 1.0 / counts[np.asarray(labels)]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(per_sample, dtype=torch.double), num_samples=len(labels),
                                 replacement=True, generator=generator)


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
