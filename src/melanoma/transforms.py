"""Augmentation presets (train) and the one evaluation transform, side by side.

Images travel as uint8 tensors (C x H x W) straight from the decoded cache; models normalise their own input
(see melanoma.models), so the evaluation path is only "resize to the model's size, make it float". Evaluation,
prediction and serving all call :func:`eval_pixels` / :func:`to_model_input`; nothing else rewrites them. The same
presets also run batched on the training device (:mod:`melanoma.augment`), read from :data:`AUGMENTATIONS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torchvision.transforms import v2

PRESETS = ("none", "seed", "dermoscopy")


class PresetError(ValueError):
    pass


@dataclass(frozen=True)
class Augmentation:
    """One preset's random augmentation, in the order applied. Both augmentation paths read it: the per-image v2
    pipeline of :func:`train_transform` (in the data loader) and the batched one of :mod:`melanoma.augment` (on the
    training device), so the two cannot drift apart."""

    hflip: bool = False                             # RandomHorizontalFlip, p 0.5
    vflip: bool = False                             # RandomVerticalFlip, p 0.5
    degrees: float = 0.0                            # RandomRotation, uniform in +-degrees, bilinear, zero fill
    translate: float = 0.0                          # RandomAffine: shift up to this share of each side (whole
    zoom: tuple[float, float] | None = None         # pixels) and zoom uniform in this range; nearest, zero fill
    crop_scale: tuple[float, float] = (1.0, 1.0)    # RandomResizedCrop: area share and aspect ratio, bilinear
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    jitter: tuple[float, float, float, float] | None = None  # ColorJitter brightness, contrast, saturation, hue

    @property
    def affine(self) -> bool:
        return bool(self.translate) or self.zoom is not None


AUGMENTATIONS: dict[str, Augmentation] = {
    # The course notebook's Keras layers: RandomFlip("horizontal"), RandomRotation(0.1) (= 36 degrees),
    # RandomZoom(0.1), RandomTranslation and a crop.
    "seed": Augmentation(hflip=True, degrees=36, translate=0.1, zoom=(0.9, 1.1), crop_scale=(0.85, 1.0),
                         crop_ratio=(0.9, 1.1)),
    # Lesions have no up or down: every flip and rotation is a valid view; colour varies between dermatoscopes.
    "dermoscopy": Augmentation(hflip=True, vflip=True, degrees=180, crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25),
                               jitter=(0.2, 0.2, 0.15, 0.03)),
}


def augmentation(preset: str) -> Augmentation | None:
    """The random augmentation of ``preset`` (None for 'none': a plain resize)."""
    if preset == "none":
        return None
    if preset not in AUGMENTATIONS:
        raise PresetError(f"unknown augmentation preset '{preset}' (choose from: {', '.join(PRESETS)})")
    return AUGMENTATIONS[preset]


def train_transform(preset: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image random augmentation of a uint8 C x H x W tensor, returning uint8 at ``size`` x ``size``."""
    spec = augmentation(preset)
    if spec is None:
        return v2.Resize((size, size), antialias=True)
    return compose(spec, size)


def compose(spec: Augmentation, size: int) -> v2.Compose:
    """The torchvision v2 pipeline of one :class:`Augmentation` (one set of random parameters per call)."""
    steps: list[Callable] = []
    if spec.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if spec.vflip:
        steps.append(v2.RandomVerticalFlip())
    if spec.degrees:
        steps.append(v2.RandomRotation(spec.degrees, interpolation=v2.InterpolationMode.BILINEAR))
    if spec.affine:
        steps.append(v2.RandomAffine(degrees=0, translate=(spec.translate, spec.translate) if spec.translate else None,
                                     scale=spec.zoom))
    steps.append(v2.RandomResizedCrop(size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True))
    if spec.jitter:
        brightness, contrast, saturation, hue = spec.jitter
        steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue))
    return v2.Compose(steps)


def eval_pixels(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation transform: an H x W x 3 uint8 array (or C x H x W tensor) -> uint8 3 x size x size."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1) if isinstance(image, np.ndarray) else image
    if tuple(tensor.shape[-2:]) != (size, size):
        tensor = v2.functional.resize(tensor, [size, size], antialias=True)
    return tensor


def to_model_input(batch: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32 pixels in [0, 255] (models normalise themselves)."""
    batch = batch.float()
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def dihedral_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and 90-degree rotations of a batch: test-time augmentation views of an orientation-free lesion."""
    views = []
    for flipped in (batch, batch.flip(-1)):
        for turns in range(4):
            views.append(torch.rot90(flipped, turns, dims=(-2, -1)))
    return views
