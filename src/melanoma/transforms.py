"""Augmentation presets (train) and the one evaluation transform, side by side.

Images travel as uint8 tensors (C x H x W) straight from the decoded cache; models normalise their own input
(see melanoma.models), so the evaluation path is only "resize to the model's size, make it float". Evaluation,
prediction and serving all call :func:`eval_pixels` / :func:`to_model_input`; nothing else rewrites them.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torchvision.transforms import v2

PRESETS = ("none", "seed", "dermoscopy")


class PresetError(ValueError):
    pass


def train_transform(preset: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image random augmentation of a uint8 C x H x W tensor, returning uint8 at ``size`` x ``size``."""
    if preset == "none":
        return v2.Resize((size, size), antialias=True)
    if preset == "seed":
        # The course notebook's Keras layers: RandomFlip("horizontal"), RandomRotation(0.1) (= 36 degrees),
        # RandomZoom(0.1), RandomTranslation and a crop.
        return v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(36, interpolation=v2.InterpolationMode.BILINEAR),
            v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
            v2.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
        ])
    if preset == "dermoscopy":
        # Lesions have no up or down: every flip and rotation is a valid view; colour varies between dermatoscopes.
        return v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(180, interpolation=v2.InterpolationMode.BILINEAR),
            v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, hue=0.03),
        ])
    raise PresetError(f"unknown augmentation preset '{preset}' (choose from: {', '.join(PRESETS)})")


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
