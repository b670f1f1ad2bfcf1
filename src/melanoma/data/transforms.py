"""Augmentation presets (train) and the one evaluation transform, side by side.

Images travel as uint8 tensors (C x H x W) straight from the decoded cache; models normalise their own input
(see melanoma.models.networks), so the evaluation path is only "resize to the model's size, make it float". Evaluation,
prediction and serving all call :func:`eval_pixels` / :func:`to_model_input`; nothing else rewrites them. The same
presets also run batched on the training device (:mod:`melanoma.train.augment`), read from :data:`AUGMENTATIONS`.

``--rendering`` (:data:`RENDERING`) adds, before a preset's steps, a random re-rendering of the file: white balance,
gamma, a downscale saved as JPEG and decoded back up to the file's size. It comes first because it imitates how the
file was made (a camera's colour processing, then a resize and a JPEG save by whoever published it), at the file's
own resolution; the preset's rotations, crops and colour jitter then act on the picture as the loader decodes it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from melanoma.core.errors import PresetError

PRESETS = ("none", "seed", "dermoscopy", "dermoscopy-scale")


@dataclass(frozen=True)
class Augmentation:
    """One preset's random augmentation, in the order applied. Both augmentation paths read it: the per-image v2
    pipeline of :func:`train_transform` (in the data loader) and the batched one of :mod:`melanoma.train.augment` (on
    the training device), so the two cannot drift apart."""

    hflip: bool = False                             # RandomHorizontalFlip, p 0.5
    vflip: bool = False                             # RandomVerticalFlip, p 0.5
    degrees: float = 0.0                            # RandomRotation, uniform in +-degrees, bilinear, zero fill
    translate: float = 0.0                          # RandomAffine: shift up to this share of each side (whole
    zoom: tuple[float, float] | None = None         # pixels) and zoom uniform in this range; nearest, zero fill
    crop_scale: tuple[float, float] = (1.0, 1.0)    # RandomResizedCrop: area share and aspect ratio, bilinear
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    jitter: tuple[float, float, float, float] | None = None  # ColorJitter brightness, contrast, saturation, hue
    crop: bool = True                               # False: a plain resize instead of the crop (preset 'none')
    # Rendering, applied before everything above at the file's own size (see :func:`render`): all off by default.
    white_balance: float = 0.0                      # per-channel gain, each uniform in 1 +- this
    gamma: float = 0.0                              # gamma exponent uniform in 1 +- this
    rescale: tuple[float, float] | None = None      # downscale each side by a factor uniform in this range...
    jpeg_quality: tuple[int, int] | None = None     # ...save as JPEG at an integer quality uniform in this range
                                                    # (inclusive), decode, and resize back up to the file's size

    @property
    def affine(self) -> bool:
        return bool(self.translate) or self.zoom is not None

    @property
    def rendering(self) -> bool:
        return bool(self.white_balance) or bool(self.gamma) or self.rescale is not None \
            or self.jpeg_quality is not None


AUGMENTATIONS: dict[str, Augmentation] = {
    # The course notebook's Keras layers: RandomFlip("horizontal"), RandomRotation(0.1) (= 36 degrees),
    # RandomZoom(0.1), RandomTranslation and a crop.
    "seed": Augmentation(hflip=True, degrees=36, translate=0.1, zoom=(0.9, 1.1), crop_scale=(0.85, 1.0),
                         crop_ratio=(0.9, 1.1)),
    # Lesions have no up or down: every flip and rotation is a valid view; colour varies between dermatoscopes.
    "dermoscopy": Augmentation(hflip=True, vflip=True, degrees=180, crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25),
                               jitter=(0.2, 0.2, 0.15, 0.03)),
    # dermoscopy that also shows a lesion smaller than its file does (issue #31): a zoom out to 0.6-1.0 of the side
    # within a black surround, as the wide-field dermoscope images show theirs, then crops down to 0.35 of the area
    # (Perez et al. 2018: affine scale 0.8-1.2, RandomResizedCrop 0.4-1.0). A candidate, not a default (results.md)
    "dermoscopy-scale": Augmentation(hflip=True, vflip=True, degrees=180, zoom=(0.6, 1.0), crop_scale=(0.35, 1.0),
                                     crop_ratio=(0.8, 1.25), jitter=(0.2, 0.2, 0.15, 0.03)),
}


# --rendering: the spread of renderings of one picture across sources (180x180 course files, 200x150 or 256x192
# isic-extra JPEGs) and dermatoscopes; issue 25's scratch run with the resolution chain and JPEG cut the disagreement
# between the two files of one picture from 22 % to 8.5 %.
RENDERING = dict(white_balance=0.05, gamma=0.1, rescale=(0.5, 1.0), jpeg_quality=(50, 95))


def with_rendering(spec: Augmentation | None) -> Augmentation:
    """``spec`` (None: preset 'none', a plain resize) with the :data:`RENDERING` steps in front."""
    return replace(spec if spec is not None else Augmentation(crop=False), **RENDERING)


def augmentation(preset: str) -> Augmentation | None:
    """The random augmentation of ``preset`` (None for 'none': a plain resize)."""
    if preset == "none":
        return None
    if preset not in AUGMENTATIONS:
        raise PresetError(f"unknown augmentation preset '{preset}' (choose from: {', '.join(PRESETS)})")
    return AUGMENTATIONS[preset]


def train_transform(preset: str, size: int, rendering: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image random augmentation of a uint8 C x H x W tensor, returning uint8 at ``size`` x ``size``;
    ``rendering``: with the :data:`RENDERING` steps first."""
    spec = augmentation(preset)
    if rendering:
        spec = with_rendering(spec)
    if spec is None:
        return v2.Resize((size, size), antialias=True)
    return compose(spec, size)


def compose(spec: Augmentation, size: int) -> v2.Compose:
    """The torchvision v2 pipeline of one :class:`Augmentation` (one set of random parameters per call)."""
    steps: list[Callable] = [Render(spec)] if spec.rendering else []
    if spec.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if spec.vflip:
        steps.append(v2.RandomVerticalFlip())
    if spec.degrees:
        steps.append(v2.RandomRotation(spec.degrees, interpolation=v2.InterpolationMode.BILINEAR))
    if spec.affine:
        steps.append(v2.RandomAffine(degrees=0, translate=(spec.translate, spec.translate) if spec.translate else None,
                                     scale=spec.zoom))
    if spec.crop:
        steps.append(v2.RandomResizedCrop(size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True))
    else:
        steps.append(v2.Resize((size, size), antialias=True))
    if spec.jitter:
        brightness, contrast, saturation, hue = spec.jitter
        steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue))
    return v2.Compose(steps)


class Render:
    """The rendering steps of one :class:`Augmentation` for one image, its parameters drawn from torch's global
    generator as the v2 transforms draw theirs (so the loader's seeding covers them)."""

    def __init__(self, spec: Augmentation):
        self.spec = spec

    def make_params(self) -> dict:
        """scale, quality, gamma and gains: neutral (1, None, 1, 1s) for the steps the spec leaves off."""
        spec = self.spec

        def uniform(low: float, high: float, count: int = 1) -> list[float]:
            return (low + (high - low) * torch.rand(count, dtype=torch.float64)).tolist()

        gains = uniform(1 - spec.white_balance, 1 + spec.white_balance, 3) if spec.white_balance else [1.0] * 3
        gamma = uniform(1 - spec.gamma, 1 + spec.gamma)[0] if spec.gamma else 1.0
        scale = uniform(*spec.rescale)[0] if spec.rescale else 1.0
        quality = int(torch.randint(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1, ()).item()) \
            if spec.jpeg_quality else None
        return dict(gains=gains, gamma=gamma, scale=scale, quality=quality)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return render(image, **self.make_params())


def render(image: torch.Tensor, gains: Sequence[float], gamma: float, scale: float,
           quality: int | None) -> torch.Tensor:
    """One uint8 C x H x W image re-rendered, as a file is made: each channel times its gain and the levels raised to
    ``gamma`` (in 0..1, rounded to whole levels), then resized to ``scale`` of each side, saved as JPEG at
    ``quality`` (None: not saved), decoded and resized back to H x W. Both augmentation paths call this, on the CPU."""
    image = image.cpu()
    if gamma != 1.0 or any(gain != 1.0 for gain in gains):
        levels = image.float().mul_(torch.tensor(gains, dtype=torch.float32).view(-1, 1, 1)).div_(255).clamp_(0, 1)
        image = levels.pow_(gamma).mul_(255).round_().to(torch.uint8)
    height, width = image.shape[-2:]
    small = [max(1, round(height * scale)), max(1, round(width * scale))]
    if small != [height, width]:
        image = v2.functional.resize(image, small, antialias=True)
    if quality is not None:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image coding in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_jpeg(encode_jpeg(image.contiguous(), quality=quality))
    if small != [height, width]:
        image = v2.functional.resize(image, [height, width], antialias=True)
    return image


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
