"""Random augmentation of whole batches on the training device, each image with its own random parameters.

torchvision's v2 transforms draw one set of parameters per call, so a batch passed through them gets one flip, one
angle and one crop for every image. Here each image gets its own, drawn the way the per-image presets of
:mod:`melanoma.data.transforms` draw them (the same ranges, RandomResizedCrop's 10 tries and centre-crop fallback,
ColorJitter's random order per image), and each step is torchvision's own arithmetic on the batch: the same inverse
affine matrices and sampling grids, ``grid_sample`` with the same zero fill, the same colour blends and the same
rounding to whole uint8 levels between steps. An image given the same parameters comes out as the per-image pipeline
makes it, within one level (tests/train/test_augment.py checks this, and the distributions of the parameters).

The rendering steps (``--rendering``: white balance, gamma, downscale, JPEG, back up; first, as in the loader path)
run per image on the CPU through the loader path's own :func:`melanoma.data.transforms.render` (JPEG is coded one image
at a time anyway), so the same parameters give exactly the same pixels; a GPU batch goes to the CPU and back for them.

Parameters are drawn on the CPU from a generator reseeded per (seed, epoch, process), so a run augments the same
way on a CPU and a GPU, and a resumed run draws what an uninterrupted one would.

    augment = BatchAugment("dermoscopy", size=180)
    augment.reseed(seed=42, epoch=0, rank=0)
    images = augment(images)          # uint8 N x 3 x H x W on any device -> uint8 N x 3 x size x size
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from melanoma.config import choices_of
from melanoma.core.hardware import uses_gpu
from melanoma.data.transforms import Augmentation, augmentation, render, with_rendering

AUGMENT_ON = choices_of("augment_on")
# Where --augment-on auto augments on a CPU. On a busy 2-core EPYC (docs/benchmarks.md) the device path measured 5 %
# faster with one thread and 1.8x with two (many small per-image ops suffer most from other work on the cores); the
# default stays 'loader' until the kill-and-resume test of tests/train/test_training.py, which hooks the per-image
# transform, names its path.
CPU_DEFAULT = "loader"


def resolve_augment_on(choice: str, accelerator: str) -> str:
    """'loader' (per image, in the DataLoader) or 'device' (batched, where the model trains) for --augment-on."""
    if choice not in AUGMENT_ON:
        raise ValueError(f"--augment-on must be one of {', '.join(AUGMENT_ON)}, not '{choice}'")
    if choice != "auto":
        return choice
    return "device" if uses_gpu(accelerator) else CPU_DEFAULT


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one process's random stream in one epoch (the same formula the loader path uses across ranks)."""
    return seed * 1_000_003 + epoch * 1_009 + rank


@dataclass
class AugmentParams:
    """Every image's random parameters (CPU tensors, one row per image)."""

    hflip: torch.Tensor       # bool
    vflip: torch.Tensor       # bool
    angle: torch.Tensor       # degrees, float64
    translate: torch.Tensor   # whole pixels (x, y), float64 N x 2
    zoom: torch.Tensor        # float64
    crop: torch.Tensor        # top, left, height, width: int64 N x 4
    jitter: torch.Tensor      # brightness, contrast, saturation, hue factors: float64 N x 4
    order: torch.Tensor       # ColorJitter's order of the four adjustments per image: int64 N x 4
    # rendering: gain red, green, blue, gamma, scale, JPEG quality (0 = not saved): float64 N x 6; None when off
    render: torch.Tensor | None = None


class BatchAugment:
    """A preset of :mod:`melanoma.data.transforms` applied to uint8 batches, per sample, on the batch's device."""

    def __init__(self, preset: str, size: int, spec: Augmentation | None = None, rendering: bool = False):
        self.size = size
        self.spec = spec if spec is not None else augmentation(preset)
        if rendering:
            self.spec = with_rendering(self.spec)
        self.generator = torch.Generator()

    def reseed(self, seed: int, epoch: int, rank: int) -> None:
        self.generator.manual_seed(epoch_seed(seed, epoch, rank))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.spec is None:  # preset 'none': the plain resize
            return TF.resize(images, [self.size, self.size], antialias=True)
        return self.apply(images, self.sample(len(images), *images.shape[-2:]))

    # -- drawing the parameters, as torchvision's make_params does per image --------------------------------------

    def sample(self, count: int, height: int, width: int) -> AugmentParams:
        spec = self.spec
        ones = torch.ones(count, dtype=torch.float64)
        hflip = self._coin(count) if spec.hflip else torch.zeros(count, dtype=torch.bool)
        vflip = self._coin(count) if spec.vflip else torch.zeros(count, dtype=torch.bool)
        angle = self._uniform(count, -spec.degrees, spec.degrees) if spec.degrees else 0 * ones
        translate = torch.zeros(count, 2, dtype=torch.float64)
        if spec.translate:  # RandomAffine: int(round(uniform(-t * side, t * side))) for x, then y
            translate[:, 0] = self._uniform(count, -spec.translate * width, spec.translate * width).round()
            translate[:, 1] = self._uniform(count, -spec.translate * height, spec.translate * height).round()
        zoom = self._uniform(count, *spec.zoom) if spec.zoom else ones
        crop = self._crop_boxes(count, height, width)
        if spec.jitter:
            brightness, contrast, saturation, hue = spec.jitter
            jitter = torch.stack([self._uniform(count, 1 - brightness, 1 + brightness),
                                  self._uniform(count, 1 - contrast, 1 + contrast),
                                  self._uniform(count, 1 - saturation, 1 + saturation),
                                  self._uniform(count, -hue, hue)], dim=1)
        else:
            jitter = torch.stack([ones, ones, ones, 0 * ones], dim=1)
        order = torch.rand(count, 4, generator=self.generator).argsort(dim=1)  # a uniform random permutation each
        # drawn last, so that without rendering the stream (and every other parameter) is what it always was
        rendering = self._rendering(count) if spec.rendering else None
        return AugmentParams(hflip, vflip, angle, translate, zoom, crop, jitter, order, rendering)

    def _rendering(self, count: int) -> torch.Tensor:
        """The rendering parameters of :class:`melanoma.data.transforms.Render`, one row per image (neutral when
        off)."""
        spec, ones = self.spec, torch.ones(count, dtype=torch.float64)
        gains = self._uniform(count, 1 - spec.white_balance, 1 + spec.white_balance, (3,)) if spec.white_balance \
            else torch.ones(count, 3, dtype=torch.float64)
        gamma = self._uniform(count, 1 - spec.gamma, 1 + spec.gamma) if spec.gamma else ones
        scale = self._uniform(count, *spec.rescale) if spec.rescale else ones
        quality = torch.randint(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1, (count,), generator=self.generator,
                                dtype=torch.float64) if spec.jpeg_quality else 0 * ones
        return torch.cat([gains, gamma[:, None], scale[:, None], quality[:, None]], dim=1)

    def _uniform(self, count: int, low: float, high: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, *shape, generator=self.generator, dtype=torch.float64)

    def _coin(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self.generator) < 0.5

    def _crop_boxes(self, count: int, height: int, width: int) -> torch.Tensor:
        """RandomResizedCrop's boxes: up to 10 tries of (area share, log-uniform aspect ratio); the first box that
        fits wins, placed uniformly; an image with none gets the centre crop of the nearest allowed ratio."""
        (scale_low, scale_high), (ratio_low, ratio_high) = self.spec.crop_scale, self.spec.crop_ratio
        target_area = height * width * self._uniform(count, scale_low, scale_high, (10,))
        aspect = torch.exp(self._uniform(count, math.log(ratio_low), math.log(ratio_high), (10,)))
        tries_w = torch.sqrt(target_area * aspect).round().long()
        tries_h = torch.sqrt(target_area / aspect).round().long()
        fits = (tries_w > 0) & (tries_w <= width) & (tries_h > 0) & (tries_h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)  # index of the first try that fits (0 when none does)
        w, h = tries_w.gather(1, first).squeeze(1), tries_h.gather(1, first).squeeze(1)
        top = (torch.rand(count, generator=self.generator, dtype=torch.float64) * (height - h + 1)).floor().long()
        left = (torch.rand(count, generator=self.generator, dtype=torch.float64) * (width - w + 1)).floor().long()
        found = fits.any(dim=1)
        if not found.all():
            fallback_h, fallback_w = _centre_crop_size(height, width, ratio_low, ratio_high)
            h, w = torch.where(found, h, fallback_h), torch.where(found, w, fallback_w)
            top = torch.where(found, top, (height - fallback_h) // 2)
            left = torch.where(found, left, (width - fallback_w) // 2)
        return torch.stack([top, left, h, w], dim=1)

    # -- applying them, with torchvision's arithmetic ----------------------------------------------------------------

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """uint8 N x 3 x H x W -> uint8 N x 3 x size x size; between steps the pixels stay whole levels in 0..255,
        as they do in the per-image pipeline."""
        spec, device = self.spec, images.device
        if spec.rendering:
            images = _render(images, params.render)
        if spec.hflip:
            images = torch.where(params.hflip.to(device).view(-1, 1, 1, 1), images.flip(-1), images)
        if spec.vflip:
            images = torch.where(params.vflip.to(device).view(-1, 1, 1, 1), images.flip(-2), images)
        pixels = images.float()
        if spec.degrees:
            # RandomRotation: the angle taken modulo 360 and inverted, as rotate_image does
            rotation = _inverse_affine(-(params.angle % 360), torch.zeros_like(params.translate), torch.ones_like(
                params.zoom))
            pixels = _warp(pixels, rotation, "bilinear")
        if spec.affine:
            pixels = _warp(pixels, _inverse_affine(0 * params.angle, params.translate, params.zoom), "nearest")
        if spec.crop:
            pixels = _resized_crop(pixels, params.crop, self.size)
        else:  # preset 'none' with rendering: the plain resize of uint8 levels, as the loader path's v2.Resize
            pixels = TF.resize(pixels.to(torch.uint8), [self.size, self.size], antialias=True).float()
        if spec.jitter:
            pixels = _colour_jitter(pixels, params.jitter, params.order)
        return pixels.to(torch.uint8)


def _render(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each image re-rendered with its row of parameters (see AugmentParams.render), on the CPU."""
    rendered = [render(image, gains=row[:3].tolist(), gamma=row[3].item(), scale=row[4].item(),
                       quality=int(row[5].item()) or None) for image, row in zip(images.cpu(), rows)]
    return torch.stack(rendered).to(images.device)


def _centre_crop_size(height: int, width: int, ratio_low: float, ratio_high: float) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < ratio_low:
        return int(round(width / ratio_low)), width
    if in_ratio > ratio_high:
        return height, int(round(height * ratio_high))
    return height, width


def _inverse_affine(angle: torch.Tensor, translate: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torchvision's _get_inverse_affine_matrix about the image centre, without shear, for each image (float64,
    N x 2 x 3): output pixel -> input pixel, in pixels from the centre."""
    rotation = torch.deg2rad(angle)
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    a, b, c, d = cos, -sin, sin, cos
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    tx, ty = translate[:, 0], translate[:, 1]
    m2 = 0.0 - m0 * tx - m1 * ty
    m5 = 0.0 - m3 * tx - m4 * ty
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3)


def _warp(pixels: torch.Tensor, inverse: torch.Tensor, mode: str) -> torch.Tensor:
    """torchvision's affine_image / rotate_image on float pixels holding uint8 levels, one matrix per image: the same
    grid, grid_sample with a ones channel marking the inside, zero fill, rounding back to whole levels."""
    count, channels, height, width = pixels.shape
    device = pixels.device
    theta = inverse.to(device=device, dtype=torch.float32)
    base = torch.empty(1, height, width, 3, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height,
                                      device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * width, 0.5 * height], device=device))
    grid = base.view(1, height * width, 3).expand(count, -1, -1).bmm(rescaled).view(count, height, width, 2)
    if mode == "nearest":
        # torchvision fills where the sampled ones channel is < 0.5, i.e. where the nearest input pixel is outside:
        # exactly where zero padding already gives 0, so the extra channel is not needed
        return F.grid_sample(pixels, grid, mode=mode, padding_mode="zeros", align_corners=False).round_()
    inside = torch.ones(count, 1, height, width, device=device)
    warped = F.grid_sample(torch.cat([pixels, inside], dim=1), grid, mode=mode, padding_mode="zeros",
                           align_corners=False)
    warped, inside = warped[:, :channels], warped[:, channels:]
    return warped.mul_(inside).round_()  # bilinear: blended towards the zero fill by the share of the input inside


def _resized_crop(pixels: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box (top, left, height, width) resized to size x size, bilinear: sampled at the pixel centres
    that interpolate() uses (clamped to the box's edge pixels). A box larger than ``size`` needs antialiasing and
    goes through torchvision's resized_crop one image at a time."""
    count, _, height, width = pixels.shape
    device = pixels.device
    steps = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    top, left, box_h, box_w = (boxes[:, k:k + 1].double() for k in range(4))
    ys = top + (steps * box_h - 0.5).clamp(min=0).minimum(box_h - 1)   # N x size, in pixels of the full image
    xs = left + (steps * box_w - 0.5).clamp(min=0).minimum(box_w - 1)
    ys, xs = ys * 2 / max(height - 1, 1) - 1, xs * 2 / max(width - 1, 1) - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1).float().to(device)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=True).round_()
    for index in torch.nonzero((boxes[:, 2] > size) | (boxes[:, 3] > size)).flatten().tolist():
        top_i, left_i, h_i, w_i = boxes[index].tolist()
        out[index] = TF.resized_crop(pixels[index], top_i, left_i, h_i, w_i, [size, size], antialias=True).round_()
    return out


# -- ColorJitter, per image: factors and order ----------------------------------------------------------------------


def _grayscale(pixels: torch.Tensor) -> torch.Tensor:
    red, green, blue = pixels.unbind(dim=-3)
    return red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(-3).floor_()


def _blend(pixels: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend on uint8 levels: ratio * a + (1 - ratio) * b, clamped, truncated to a whole level."""
    ratio32, rest32 = ratio.float(), (1.0 - ratio).float()
    return pixels.mul(ratio32).add_(other.mul(rest32)).clamp_(0, 255).trunc_()


def _brightness(pixels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return pixels.mul(factor.float()).clamp_(0, 255).trunc_()


def _contrast(pixels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(pixels, _grayscale(pixels).mean(dim=(-3, -2, -1), keepdim=True), factor)


def _saturation(pixels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(pixels, _grayscale(pixels), factor)


def _hue(pixels: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image's hue shifted by its own amount: torchvision's public adjust_hue, the kernel the loader path's
    ColorJitter runs, called once per image since it takes one factor."""
    scaled = pixels.mul(1.0 / 255)
    rgb = torch.stack([TF.adjust_hue(image, amount) for image, amount in zip(scaled, shift.tolist())])
    return rgb.mul_(255 + 1.0 - 1e-3).trunc_()  # to_dtype(uint8, scale=True)


_ADJUSTMENTS = (_brightness, _contrast, _saturation, _hue)  # ColorJitter's fn_idx 0..3: factor columns 0..3


def _colour_jitter(pixels: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter with each image's own factors and order: in each of the four slots, every adjustment is applied
    at once to the images that have it in that slot. Indices are worked out on the CPU (no device sync) and only
    gathered with (deterministic) index_select, as Trainer(deterministic=True) requires."""
    device = pixels.device
    for slot in range(4):
        by_adjustment = torch.argsort(order[:, slot], stable=True)  # images grouped by their adjustment in this slot
        counts = torch.bincount(order[:, slot], minlength=4).tolist()
        pieces = []
        for adjustment, chosen in enumerate(torch.split(by_adjustment, counts)):
            if len(chosen) == 0:
                continue
            shape = (-1, 1, 1, 1) if adjustment < 3 else (-1,)
            factor = factors[chosen, adjustment].to(device).view(shape)
            pieces.append(_ADJUSTMENTS[adjustment](pixels.index_select(0, chosen.to(device)), factor))
        pixels = torch.cat(pieces).index_select(0, torch.argsort(by_adjustment).to(device))
    return pixels
