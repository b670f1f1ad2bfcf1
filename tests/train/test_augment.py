"""Batched augmentation on the training device (melanoma.train.augment) against the per-image torchvision presets of
melanoma.data.transforms: parameters drawn from the same distributions, the same parameters giving the same pixels, and
the augmented images distributed alike (the geometry read back from a coordinate pattern, the colour from patches), each
comparison shown to catch a deliberately wrong preset; reseeding per (seed, epoch, rank), --augment-on, and an exact
resume of the device path after SIGKILL.

The statistical comparisons use fixed seeds, so they are deterministic: a two-sample Kolmogorov-Smirnov p-value above
1e-3 where the pipelines should agree, below 1e-4 for the wrong presets."""
from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_dataset
from scipy.stats import chi2_contingency, ks_2samp
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from melanoma.cli.main import main as cli_main
from melanoma.config import TrainConfig
from melanoma.data.transforms import (
    AUGMENTATIONS,
    Augmentation,
    Render,
    compose,
    render,
    train_transform,
    with_rendering,
)
from melanoma.train.augment import BatchAugment, resolve_augment_on
from melanoma.train.pipeline import train

MATCH, MISMATCH = 1e-3, 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of small per-image transforms: one intra-op thread is fastest (and fair to other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ks(first, second) -> float:
    return ks_2samp(torch.as_tensor(first).double().numpy(), torch.as_tensor(second).double().numpy()).pvalue


def _augment(preset_or_spec, size: int, seed: int = 0) -> BatchAugment:
    spec = AUGMENTATIONS[preset_or_spec] if isinstance(preset_or_spec, str) else preset_or_spec
    augment = BatchAugment("seed", size, spec)
    augment.reseed(seed, 0, 0)
    return augment


# -- the parameters ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, height, width", [("seed", 48, 48), ("dermoscopy", 180, 180),
                                                   ("dermoscopy", 72, 60),    # some images need the fallback
                                                   ("dermoscopy", 40, 400)])  # every image does
def test_crop_boxes_are_drawn_like_random_resized_crop(preset, height, width):
    spec, count = AUGMENTATIONS[preset], 4000
    crop = v2.RandomResizedCrop(32, scale=spec.crop_scale, ratio=spec.crop_ratio)
    torch.manual_seed(0)
    reference = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                              for p in (crop.make_params([torch.empty(3, height, width)]) for _ in range(count))])
    boxes = _augment(preset, 32)._crop_boxes(count, height, width)
    assert ((boxes[:, 0] + boxes[:, 2] <= height) & (boxes[:, 1] + boxes[:, 3] <= width)).all()
    for column in range(4):  # top, left, height, width
        assert _ks(reference[:, column], boxes[:, column]) > MATCH, column
    area = boxes[:, 2] * boxes[:, 3]
    assert _ks(reference[:, 2] * reference[:, 3], area) > MATCH
    if (height, width) != (40, 400):  # the same test tells a crop scale off by 0.05
        wrong = _augment(replace(spec, crop_scale=(spec.crop_scale[0] + 0.05, 1.0)), 32)._crop_boxes(count, height,
                                                                                                     width)
        assert _ks(reference[:, 2] * reference[:, 3], wrong[:, 2] * wrong[:, 3]) < MISMATCH


def test_angles_shifts_zoom_flips_and_jitter_are_drawn_like_torchvision():
    count, size = 4000, 50
    image = [torch.empty(3, size, size)]
    torch.manual_seed(0)
    rotation = v2.RandomRotation(180)
    angles = [rotation.make_params(image)["angle"] for _ in range(count)]
    affine = v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.9, 1.1))
    affines = [affine.make_params(image) for _ in range(count)]
    jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, hue=0.03)
    jitters = [jitter.make_params(image) for _ in range(count)]

    dermoscopy = _augment("dermoscopy", size).sample(count, size, size)
    seed = _augment("seed", size).sample(count, size, size)
    assert _ks(angles, dermoscopy.angle) > MATCH
    assert _ks([a["translate"][0] for a in affines], seed.translate[:, 0]) > MATCH
    assert _ks([a["translate"][1] for a in affines], seed.translate[:, 1]) > MATCH
    assert _ks([a["scale"] for a in affines], seed.zoom) > MATCH
    for column, name in enumerate(("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")):
        assert _ks([j[name] for j in jitters], dermoscopy.jitter[:, column]) > MATCH, name
    # ColorJitter's order: a uniformly random permutation per image, as torch.randperm(4) draws per call
    orders = {perm: k for k, perm in enumerate(sorted({tuple(j["fn_idx"].tolist()) for j in jitters}))}
    table = torch.zeros(2, len(orders))
    for j in jitters:
        table[0, orders[tuple(j["fn_idx"].tolist())]] += 1
    for row in dermoscopy.order.tolist():
        table[1, orders[tuple(row)]] += 1
    assert len(orders) == 24 and chi2_contingency(table.numpy()).pvalue > MATCH
    for flips in (dermoscopy.hflip, dermoscopy.vflip, seed.hflip):  # p 0.5, within 4 standard errors
        assert abs(flips.double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / count)
    assert not seed.vflip.any() and (seed.jitter[:, :3] == 1).all() and (seed.jitter[:, 3] == 0).all()
    assert _ks(angles, _augment(replace(AUGMENTATIONS["dermoscopy"], degrees=150), size).sample(count, size,
                                                                                                size).angle) < MISMATCH


# -- the same parameters give the same pixels -------------------------------------------------------------------------


def _test_images(count: int = 12, size: int = 40) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    noise = torch.randint(0, 256, (count // 2, 3, size, size), dtype=torch.uint8, generator=generator)
    smooth = TF.resize(torch.randint(0, 256, (count - count // 2, 3, 6, 6), dtype=torch.uint8, generator=generator),
                       [size, size], antialias=True)
    return torch.cat([noise, smooth])


def _adjust(image: torch.Tensor, which: int, factor: float) -> torch.Tensor:
    return (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[which](image, factor)


def _per_image(image: torch.Tensor, params, index: int, spec: Augmentation, size: int,
               float_resize: bool = False) -> torch.Tensor:
    """One image through torchvision's functional ops with the batch path's parameters for it; ``float_resize``:
    the crop resized as torchvision does on a GPU (in float) instead of its CPU uint8 kernel."""
    if spec.hflip and params.hflip[index]:
        image = TF.horizontal_flip(image)
    if spec.vflip and params.vflip[index]:
        image = TF.vertical_flip(image)
    if spec.degrees:
        image = TF.rotate(image, float(params.angle[index]), interpolation=InterpolationMode.BILINEAR, fill=0)
    if spec.affine:
        shift = [int(v) for v in params.translate[index].tolist()]
        image = TF.affine(image, angle=0.0, translate=shift, scale=float(params.zoom[index]), shear=[0.0, 0.0],
                          fill=0)
    box = params.crop[index].tolist()
    if float_resize:
        image = TF.resized_crop(image.float(), *box, [size, size], antialias=True).round().to(torch.uint8)
    else:
        image = TF.resized_crop(image, *box, [size, size], antialias=True)
    if spec.jitter:
        for which in params.order[index].tolist():
            image = _adjust(image, which, float(params.jitter[index, which]))
    return image


def test_each_step_is_torchvision_arithmetic_with_the_same_parameters():
    from melanoma.train import augment

    images, size = _test_images(), 40
    pixels = images.float()
    params = _augment("dermoscopy", size).sample(len(images), size, size)
    angles, shifts = params.angle, torch.tensor([[3.0, -5.0]] * len(images), dtype=torch.float64)
    zooms = torch.full((len(images),), 1.07, dtype=torch.float64)
    rotated = augment._warp(pixels, augment._inverse_affine(-(angles % 360), 0 * shifts, 1 + 0 * zooms), "bilinear")
    assert torch.equal(rotated, torch.stack([TF.rotate(image, float(angle), InterpolationMode.BILINEAR, fill=0)
                                             for image, angle in zip(images, angles)]).float())
    shifted = augment._warp(pixels, augment._inverse_affine(0 * angles, shifts, zooms), "nearest")
    assert torch.equal(shifted, torch.stack([TF.affine(image, 0.0, [3, -5], 1.07, [0.0, 0.0], fill=0)
                                             for image in images]).float())
    cropped = augment._resized_crop(pixels, params.crop, 32)  # 40 -> 32 and smaller boxes: down- and upscaled
    float_reference = torch.stack([TF.resized_crop(image.float(), *box.tolist(), [32, 32], antialias=True).round()
                                   for image, box in zip(images, params.crop)])
    assert (cropped - float_reference).abs().max() <= 1 and (cropped == float_reference).float().mean() > 0.99
    for which, adjust in enumerate(augment._ADJUSTMENTS):
        factors = params.jitter[:, which]
        ours = adjust(pixels, factors.view(-1, 1, 1, 1) if which < 3 else factors)
        reference = torch.stack([_adjust(image, which, float(f)) for image, f in zip(images, factors)]).float()
        assert (ours - reference).abs().max() <= 1 and (ours == reference).float().mean() > 0.999, adjust.__name__


@pytest.mark.parametrize("preset", ["seed", "dermoscopy", "dermoscopy-scale"])
def test_the_whole_preset_matches_torchvision_per_image(preset):
    images, size = _test_images(), 32
    augment = _augment(preset, size)
    params = augment.sample(len(images), 40, 40)
    ours = augment.apply(images, params).int()
    as_on_gpu = torch.stack([_per_image(image, params, i, augment.spec, size, float_resize=True)
                             for i, image in enumerate(images)]).int()
    assert (ours == as_on_gpu).float().mean() > 0.99 and (ours - as_on_gpu).abs().float().mean() < 0.02
    reference = torch.stack([_per_image(image, params, i, augment.spec, size) for i, image in enumerate(images)]).int()
    difference = (ours - reference).abs().float()
    # torchvision's CPU uint8 resize rounds its fixed-point weights differently from float by one level, and the
    # colour steps carry such a difference on (a hue shift of a near-grey pixel magnifies it): small, never large
    assert difference.mean() < 0.3 and difference.quantile(0.99) <= (1 if preset == "seed" else 2)
    shuffled = augment.apply(images, replace(params, crop=params.crop.roll(1, 0)))  # another image's box: far off
    assert (shuffled.int() - reference).abs().float().mean() > 5


def test_each_image_gets_its_own_random_parameters():
    image = _test_images(2)[1]
    copies = image.expand(16, -1, -1, -1).contiguous()
    ours = _augment("dermoscopy", 40)(copies)
    assert len({tuple(view.flatten().tolist()) for view in ours}) == 16
    torch.manual_seed(0)
    batched_v2 = compose(AUGMENTATIONS["dermoscopy"], 40)(copies)  # v2 on a batch: one draw for all
    assert len({tuple(view.flatten().tolist()) for view in batched_v2}) == 1


def test_reseeding_repeats_an_epoch_and_separates_epochs_and_processes():
    images = _test_images()
    augment = BatchAugment("dermoscopy", 32)

    def epoch(seed, number, rank):
        augment.reseed(seed, number, rank)
        return torch.cat([augment(images), augment(images)])

    first = epoch(42, 3, 0)
    assert torch.equal(first, epoch(42, 3, 0))
    for other in (epoch(42, 4, 0), epoch(42, 3, 1), epoch(7, 3, 0)):
        assert not torch.equal(first, other)


# -- the augmented images are distributed alike -----------------------------------------------------------------------

PATTERN = 48  # pixels; each pixel's red and green hold 5 x its own column and row


def _coordinate_pattern() -> torch.Tensor:
    rows, columns = torch.meshgrid(torch.arange(PATTERN), torch.arange(PATTERN), indexing="ij")
    return torch.stack([columns * 5, rows * 5, torch.full_like(rows, 200)]).to(torch.uint8)


def _loader_views(spec: Augmentation, image: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    transform = compose(spec, image.shape[-1])
    torch.manual_seed(seed)
    return torch.stack([transform(image) for _ in range(count)])


def _device_views(spec: Augmentation, image: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    augment = _augment(spec, image.shape[-1], seed)
    return torch.cat([augment(image.expand(250, -1, -1, -1).contiguous()) for _ in range(count // 250)])


def _geometry(views: torch.Tensor) -> torch.Tensor:
    """Per view, the affine map from output pixels back to pattern pixels, fitted (least squares) on the pixels
    sampled wholly inside the pattern: (mirrored, angle in degrees, log scale, centre x, centre y)."""
    rows, columns = torch.meshgrid(torch.arange(PATTERN, dtype=torch.float64),
                                   torch.arange(PATTERN, dtype=torch.float64), indexing="ij")
    middle = (PATTERN - 1) / 2
    design = torch.stack([columns.flatten() - middle, rows.flatten() - middle,
                          torch.ones(PATTERN ** 2, dtype=torch.float64)], 1)  # pixels x 3
    pixels = views.double().flatten(2)                                        # views x 3 x pixels
    inside = (pixels[:, 2] == 200).double()                                   # views x pixels
    normal = torch.einsum("pi,np,pj->nij", design, inside, design)
    fit = torch.linalg.solve(normal, torch.einsum("pi,np,nkp->nik", design, inside, pixels[:, :2] / 5))  # n x 3 x 2
    linear = fit[:, :2].transpose(1, 2)                                       # output (x, y) -> pattern (x, y)
    determinant = torch.linalg.det(linear)
    mirrored = determinant < 0
    linear[mirrored, :, 0] *= -1  # undo the mirror, leaving a rotation and scale
    angle = torch.rad2deg(torch.atan2(linear[:, 1, 0], linear[:, 0, 0]))
    return torch.stack([mirrored.double(), angle, 0.5 * determinant.abs().log(), fit[:, 2, 0], fit[:, 2, 1]], 1)


def _agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """The smallest KS p-value over the columns."""
    return min(_ks(first[:, k], second[:, k]) for k in range(first.shape[1]))


@pytest.mark.parametrize("preset", ["seed", "dermoscopy"])
def test_geometry_is_distributed_like_the_loader_path(preset):
    spec, pattern, count = replace(AUGMENTATIONS[preset], jitter=None), _coordinate_pattern(), 1500
    loader = _geometry(_loader_views(spec, pattern, count, seed=1))
    assert 0.4 < loader[:, 0].mean() < 0.6  # half the views mirrored: the fit reads the flips
    assert _agreement(loader, _geometry(_device_views(spec, pattern, count, seed=2))) > MATCH
    # dermoscopy's two flips make any rotation range of +-90 degrees or more look alike (both flips = a half turn)
    fewer_degrees = spec.degrees * (0.7 if preset == "seed" else 0.25)
    wrong = {"no flips": replace(spec, hflip=False, vflip=False), "fewer degrees": replace(spec, degrees=fewer_degrees),
             "crop scale +0.05": replace(spec, crop_scale=(spec.crop_scale[0] + 0.05, 1.0))}
    if preset == "seed":
        wrong |= {"translate 0.08": replace(spec, translate=0.08), "zoom +-0.15": replace(spec, zoom=(0.85, 1.15))}
    for name, other in wrong.items():
        assert _agreement(loader, _geometry(_device_views(other, pattern, count, seed=3))) < MISMATCH, name


def _patches() -> torch.Tensor:
    image = torch.empty(3, 16, 16, dtype=torch.uint8)
    for k, colour in enumerate([(200, 150, 120), (90, 50, 30), (220, 120, 140), (120, 130, 160)]):
        row, column = divmod(k, 2)
        image[:, row * 8:row * 8 + 8, column * 8:column * 8 + 8] = torch.tensor(colour).view(3, 1, 1)
    return image


def _colour(views: torch.Tensor) -> torch.Tensor:
    """Per view, each patch's mean red, green and blue and the hue, saturation and value of that mean."""
    from torchvision.transforms.v2.functional._color import _rgb_to_hsv

    pixels = views.double()
    means = torch.stack([pixels[:, :, r:r + 8, c:c + 8].mean((-2, -1)) for r in (0, 8) for c in (0, 8)], 1)
    hsv = _rgb_to_hsv((means / 255).permute(0, 2, 1).unsqueeze(-1)).squeeze(-1).permute(0, 2, 1)
    return torch.cat([means, hsv], 2).flatten(1)


def test_colour_is_distributed_like_the_loader_path():
    spec, image, count = Augmentation(jitter=AUGMENTATIONS["dermoscopy"].jitter), _patches(), 2000
    loader = _colour(_loader_views(spec, image, count, seed=1))
    assert _agreement(loader, _colour(_device_views(spec, image, count, seed=2))) > MATCH
    brightness, contrast, saturation, hue = spec.jitter
    for name, jitter in {"brightness 0.25": (0.25, contrast, saturation, hue),
                         "contrast 0.25": (brightness, 0.25, saturation, hue),
                         "saturation 0.25": (brightness, contrast, 0.25, hue),
                         "hue 0.04": (brightness, contrast, saturation, 0.04)}.items():
        other = _colour(_device_views(replace(spec, jitter=jitter), image, count, seed=3))
        assert _agreement(loader, other) < MISMATCH, name


# -- rendering (--rendering): first, the same in both paths ---------------------------------------------------------

RENDERED = with_rendering(Augmentation())  # the rendering steps alone, then the whole image as the crop


def test_render_applies_gains_gamma_downscale_and_jpeg():
    flat = torch.full((3, 16, 16), 100, dtype=torch.uint8)
    assert render(flat, [1.05, 1.0, 0.95], 1.0, 1.0, None)[:, 0, 0].tolist() == [105, 100, 95]
    assert render(flat, [1.0] * 3, 0.9, 1.0, None)[0, 0, 0].item() == round(255 * (100 / 255) ** 0.9)  # brighter
    assert torch.equal(render(flat, [1.0] * 3, 1.0, 1.0, None), flat)  # neutral parameters: untouched
    checkerboard = ((torch.arange(16)[:, None] + torch.arange(16)) % 2 * 255).to(torch.uint8).expand(3, -1, -1)
    halved = render(checkerboard, [1.0] * 3, 1.0, 0.5, None)  # a 1-pixel pattern does not survive half the side
    assert halved.shape == checkerboard.shape and (halved.float() - 127.5).abs().max() < 40
    noise = _test_images(2, 32)[0]
    assert (render(noise, [1.0] * 3, 1.0, 1.0, 50).float() - noise.float()).abs().mean() > 10  # JPEG artefacts


def test_rendering_parameters_are_drawn_alike_in_both_paths():
    count = 3000
    torch.manual_seed(0)
    draws = [Render(RENDERED).make_params() for _ in range(count)]
    loader = torch.tensor([[*d["gains"], d["gamma"], d["scale"], d["quality"]] for d in draws], dtype=torch.float64)
    device = _augment(RENDERED, 32).sample(count, 40, 40).render
    for column in range(6):  # gains red, green, blue, gamma, scale, quality
        assert _ks(loader[:, column], device[:, column]) > MATCH, column
    for draws_ in (loader, device):
        assert draws_[:, :3].min() >= 0.95 and draws_[:, :3].max() <= 1.05
        assert draws_[:, 3].min() >= 0.9 and draws_[:, 3].max() <= 1.1
        assert draws_[:, 4].min() >= 0.5 and draws_[:, 4].max() <= 1.0
        assert set(draws_[:, 5].long().tolist()) == set(range(50, 96))  # every quality 50..95, both ends included
    for column, wrong in [(5, replace(RENDERED, jpeg_quality=(55, 95))), (3, replace(RENDERED, gamma=0.13)),
                          (4, replace(RENDERED, rescale=(0.6, 1.0))), (0, replace(RENDERED, white_balance=0.07))]:
        assert _ks(loader[:, column], _augment(wrong, 32).sample(count, 40, 40).render[:, column]) < MISMATCH, column


def test_rendering_with_the_same_parameters_gives_the_same_pixels_in_both_paths():
    images = _test_images(12, 40)
    augment = _augment(with_rendering(AUGMENTATIONS["dermoscopy"]), 32)
    params = augment.sample(len(images), 40, 40)
    ours = augment.apply(images, params).int()

    def per_image(image, index):
        row = params.render[index]
        image = render(image, row[:3].tolist(), row[3].item(), row[4].item(), int(row[5].item()))
        return _per_image(image, params, index, augment.spec, 32, float_resize=True)

    reference = torch.stack([per_image(image, i) for i, image in enumerate(images)]).int()
    assert (ours == reference).float().mean() > 0.99 and (ours - reference).abs().float().mean() < 0.02
    unrendered = torch.stack([_per_image(image, params, i, augment.spec, 32, float_resize=True)
                              for i, image in enumerate(images)]).int()
    assert (ours - unrendered).abs().float().mean() > 3  # the rendering really ran, first
    shuffled = augment.apply(images, replace(params, render=params.render.roll(1, 0))).int()
    assert (shuffled - reference).abs().float().mean() > 3  # another image's rendering: far off


def _rendering_statistics(views: torch.Tensor) -> torch.Tensor:
    """Per view: each channel's mean, the standard deviation, the sharpness (mean step between neighbours) and the
    colour cast (red and blue means less green's)."""
    pixels = views.double()
    sharpness = (pixels[..., 1:] - pixels[..., :-1]).abs().mean((1, 2, 3)) \
        + (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean((1, 2, 3))
    means = pixels.mean((2, 3))
    cast = means[:, [0, 2]] - means[:, 1:2]
    return torch.cat([means, pixels.std((1, 2, 3))[:, None], sharpness[:, None], cast], 1)


def _rendering_image() -> torch.Tensor:
    """32 x 32: coloured noise on top (sharp, JPEG-sensitive), smooth colour below."""
    image = _test_images(2, 32)
    return torch.cat([image[0][:, :16], image[1][:, 16:]], dim=1)


def test_rendering_is_distributed_alike_in_both_paths():
    image, count = _rendering_image(), 750
    loader = _rendering_statistics(_loader_views(RENDERED, image, count, seed=1))
    assert _agreement(loader, _rendering_statistics(_device_views(RENDERED, image, count, seed=2))) > MATCH
    plain = _rendering_statistics(_loader_views(Augmentation(), image, 1, seed=1))
    assert (loader[:, 4] < plain[0, 4]).float().mean() > 0.95  # nearly every view less sharp than the file
    for name, other in {"no JPEG": replace(RENDERED, jpeg_quality=None),
                        "downscale to 0.7-1.0": replace(RENDERED, rescale=(0.7, 1.0)),
                        "white balance +-0.08": replace(RENDERED, white_balance=0.08),
                        "gamma +-0.2": replace(RENDERED, gamma=0.2)}.items():
        wrong = _rendering_statistics(_device_views(other, image, count, seed=3))
        assert _agreement(loader, wrong) < MISMATCH, name


def test_rendering_is_seeded_in_both_paths():
    images = _test_images(6, 40)

    def loader(seed: int, rendering: bool = True) -> torch.Tensor:
        transform = train_transform("dermoscopy", 32, rendering)
        torch.manual_seed(seed)
        return torch.stack([transform(image) for image in images])

    def device(seed: int, rendering: bool = True) -> torch.Tensor:
        augment = BatchAugment("dermoscopy", 32, rendering=rendering)
        augment.reseed(seed, 0, 0)
        return augment(images)

    for path in (loader, device):
        assert torch.equal(path(3), path(3)) and not torch.equal(path(3), path(4))
        assert not torch.equal(path(3), path(3, rendering=False))
    for preset in ("none", "seed"):  # every preset takes it, 'none' too (then a plain resize)
        augment = BatchAugment(preset, 32, rendering=True)
        augment.reseed(0, 0, 0)
        assert augment(images).shape == (6, 3, 32, 32) and train_transform(preset, 32, True)(images[0]).shape == (3, 32,
                                                                                                               32)


def test_rendering_off_leaves_both_paths_as_they_were():
    images = _test_images(6, 40)
    for preset in ("none", "seed", "dermoscopy"):
        torch.manual_seed(0)
        before = [train_transform(preset, 32)(image) for image in images]
        torch.manual_seed(0)
        assert all(torch.equal(a, train_transform(preset, 32, False)(b)) for a, b in zip(before, images))
    assert not any(spec.rendering for spec in AUGMENTATIONS.values())
    assert not any(isinstance(step, Render) for step in compose(AUGMENTATIONS["dermoscopy"], 32).transforms)
    off, on = BatchAugment("dermoscopy", 32), BatchAugment("dermoscopy", 32, rendering=True)
    off.reseed(0, 0, 0)
    on.reseed(0, 0, 0)
    without, with_ = off.sample(6, 40, 40), on.sample(6, 40, 40)
    assert without.render is None and with_.render is not None
    assert torch.equal(without.crop, with_.crop) and torch.equal(without.jitter, with_.jitter)  # the rendering's
    # parameters are drawn after all the others: the stream without it is what it was


def test_the_rendering_flag_reaches_the_config(tmp_path):
    from melanoma.cli.arguments import build_parser, config_from_args
    from melanoma.core.errors import RunError
    from melanoma.train.checks import validate_config

    def config(*flags: str) -> TrainConfig:
        return config_from_args(build_parser().parse_args(["train", "--data", "A", *flags]))

    assert config("--rendering").rendering is True and config("--no-rendering").rendering is False
    assert config().rendering is None
    # on in the fine-tuning recipe (chosen by the 2026-12-02 rule in docs/results.md), off for the course's seed CNNs
    for model, default in (("seed-cnn", False), ("tf_efficientnet_lite0", True)):
        assert TrainConfig(data="A", out="o", model=model).resolved().rendering is default
        assert TrainConfig(data="A", out="o", model=model, rendering=not default).resolved().rendering is not default
    with pytest.raises(RunError, match="--rendering must be true or false"):
        validate_config(replace(TrainConfig(data="A", out="o", model="seed-cnn", rendering=True).resolved(),
                                rendering="yes"))
    data = tiny_dataset(tmp_path / "data", per_class=6, test_per_class=1)
    for augment_on in ("loader", "device"):
        out = train(TrainConfig(data=str(data), out=str(tmp_path / augment_on), model="seed-cnn", epochs=1,
                                batch_size=8, image_size=32, progress=False, preset="none", threads=1,
                                rendering=True, augment_on=augment_on, bootstrap=0), log=lambda *_: None)
        assert json.loads((out / "config.json").read_text())["config"]["rendering"] is True


# -- in training ------------------------------------------------------------------------------------------------------


def test_augment_on_auto_is_the_device_on_a_gpu(monkeypatch):
    assert resolve_augment_on("loader", "gpu") == "loader" and resolve_augment_on("device", "cpu") == "device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_augment_on("auto", "cpu") == "loader" and resolve_augment_on("auto", "gpu") == "loader"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_augment_on("auto", "gpu") == "device" and resolve_augment_on("auto", "cpu") == "loader"
    with pytest.raises(ValueError, match="--augment-on"):
        resolve_augment_on("gpu", "cpu")


def test_a_bad_augment_on_fails_before_anything_is_written(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", per_class=3, test_per_class=1)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--data", str(data), "--out", str(tmp_path / "never"), "--augment-on", "gpu"])
    assert exit_.value.code == 2 and "--augment-on: invalid choice: 'gpu'" in capsys.readouterr().err
    config = TrainConfig(data=str(data), out=str(tmp_path / "never"), model="seed-cnn", epochs=1, augment_on="cuda")
    with pytest.raises(Exception, match="unknown --augment-on 'cuda'"):
        train(config, log=lambda *_: None)
    assert not (tmp_path / "never").exists()


_KILLER = """
import os, signal
import melanoma.train.augment as augment
import melanoma.train.pipeline as training
from melanoma.config import TrainConfig
state = {"epoch": None, "batches": 0}
reseed, call = augment.BatchAugment.reseed, augment.BatchAugment.__call__
def counting_reseed(self, seed, epoch, rank):
    state["epoch"], state["batches"] = epoch, 0
    return reseed(self, seed, epoch, rank)
def dying_call(self, images):
    state["batches"] += 1
    if state["epoch"] == 1 and state["batches"] == 2:  # the second batch of the second epoch
        os.kill(os.getpid(), signal.SIGKILL)
    return call(self, images)
augment.BatchAugment.reseed, augment.BatchAugment.__call__ = counting_reseed, dying_call
training.train(TrainConfig(data=%(data)r, out=%(out)r, model="seed-cnn", epochs=3, batch_size=8, image_size=32,
                           progress=False, preset="dermoscopy", threads=1, augment_on="device"), log=lambda *_: None)
"""


def test_device_augmentation_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    data = tiny_dataset(tmp_path / "data")
    calls = []
    original = BatchAugment.__call__
    monkeypatch.setattr(BatchAugment, "__call__", lambda self, images: calls.append(len(images)) or original(
        self, images))
    settings = dict(data=str(data), model="seed-cnn", epochs=3, batch_size=8, image_size=32, progress=False,
                    preset="dermoscopy", threads=1, augment_on="device")
    reference = train(TrainConfig(out=str(tmp_path / "whole"), **settings), log=lambda *_: None)
    assert calls and sum(calls) == 3 * sum(1 for row in csv.DictReader((reference / "split.csv").open())
                                           if row["role"] == "train")  # every training image, on the device path
    assert json.loads((reference / "config.json").read_text())["config"]["augment_on"] == "device"
    killed = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", _KILLER % {"data": str(data), "out": str(killed)}], cwd=REPO,
                            capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert len(list(csv.DictReader((killed / "history.csv").open()))) == 1
    train(TrainConfig(out=str(killed), resume=True, **settings), log=lambda *_: None)

    def read(run: Path):
        return [(r["epoch"], r["train_loss"], r["val_loss"]) for r in csv.DictReader((run / "history.csv").open())]

    assert read(killed) == read(reference)
    loader_path = train(TrainConfig(out=str(tmp_path / "loader"), **(settings | {"augment_on": "loader"})),
                        log=lambda *_: None)
    assert read(loader_path)[0][1] != read(reference)[0][1]  # another random stream: the device path really ran


# --- zooming out: a lesion smaller than its file shows it -------------------------------------------------------


def _disc(side: int, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    inside = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 <= radius ** 2
    image = torch.full((3, side, side), 220, dtype=torch.uint8)
    image[:, inside] = 40
    return image


def _dark_radius(image: torch.Tensor) -> float:
    """The radius of the dark disc, from its area (dark = below 128 in every channel, the black surround excluded by
    being outside the bright skin: we count the dark pixels inside the bright region's bounding box)."""
    bright = (image > 128).all(dim=0)
    rows, cols = bright.any(dim=1).nonzero(), bright.any(dim=0).nonzero()
    box = image[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return float(((box < 128).all(dim=0).sum() / math.pi) ** 0.5)


@pytest.mark.parametrize("zoom", [0.5, 0.8])
def test_zooming_out_draws_the_lesion_at_the_zoomed_size_in_both_paths(zoom):
    """A disc of radius 16 in a 64 px file, zoomed out by a known factor with no crop, comes out at 16 x zoom in the
    loader path and in the device path alike, inside a black surround."""
    spec = Augmentation(zoom=(zoom, zoom), crop=False)
    image = _disc(64, 16)
    loader = compose(spec, 64)(image)
    device = BatchAugment("dermoscopy", 64, spec=spec)(image[None])[0]
    for view in (loader, device):
        assert abs(_dark_radius(view) - 16 * zoom) < 1.0
        assert (view[:, 0, 0] == 0).all() == (zoom < 1)  # the corner is surround, not skin
    assert (loader.int() - device.int()).abs().float().mean() < 0.5


def test_the_scale_preset_shows_lesions_smaller_and_larger_than_the_plain_one():
    """Over many draws the scale preset's lesion sizes reach below the dermoscopy preset's smallest."""
    image, draws = _disc(96, 20), 300
    sizes = {preset: [_dark_radius(view) for view in _augment(preset, 48)(image.expand(draws, -1, -1, -1))]
             for preset in ("dermoscopy", "dermoscopy-scale")}
    plain, scaled = torch.tensor(sizes["dermoscopy"]), torch.tensor(sizes["dermoscopy-scale"])
    assert torch.quantile(scaled, 0.05) < torch.quantile(plain, 0.05) - 1  # radius 9.3 against 11.3 px
    assert scaled.min() < 0.8 * plain.min() and scaled.max() > plain.max()
