"""``melanoma explain``: Grad-CAM heatmaps (Captum's LayerGradCam) showing where the model looked.

The target layer is chosen automatically: the last convolution of the network (the third conv block of the seed
CNNs, ``conv_head`` of EfficientNet/MobileNet backbones), the deepest layer that still has a spatial map.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from melanoma.core.errors import ExplainError, ImageDecodeError
from melanoma.core.text import display_name
from melanoma.data.images import decode_image
from melanoma.data.transforms import eval_pixels, to_model_input


def grad_cam_layer(model: nn.Module) -> nn.Module:
    """The last 2-D convolution of the model."""
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        raise ExplainError("Grad-CAM needs a convolutional layer; this model has none")
    return convolutions[-1]


@dataclass
class Explanation:
    image: str
    pixels: np.ndarray | None = None     # the input, H x W x 3 uint8
    heatmap: np.ndarray | None = None    # H x W in [0, 1], same size as pixels
    predicted: str | None = None
    probability: float | None = None
    error: str | None = None


def grad_cam(model: nn.Module, pixels: np.ndarray, image_size: int,
             target: int | None = None) -> tuple[np.ndarray, int]:
    """A heatmap in [0, 1] the size of ``pixels`` for class ``target`` (default: the predicted class)."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    batch = to_model_input(eval_pixels(pixels, image_size)[None], channels_last=False).requires_grad_(True)
    if target is None:
        with torch.no_grad():
            target = int(model(batch).argmax(1))
    attribution = LayerGradCam(model, grad_cam_layer(model)).attribute(batch, target=target, relu_attributions=True)
    heat = LayerAttribution.interpolate(attribution, tuple(pixels.shape[:2]), interpolate_mode="bilinear")
    heat = heat[0, 0].detach().float().numpy()
    heat -= heat.min()
    return (heat / heat.max() if heat.max() > 0 else heat), target


def overlay(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    from matplotlib import colormaps

    colours = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.float32)
    return np.clip((1 - alpha) * pixels.astype(np.float32) + alpha * colours, 0, 255).astype(np.uint8)


def explain_files(run, sources: Sequence[tuple[str, str | os.PathLike | bytes]]) -> list[Explanation]:
    """Grad-CAM for each (name, path-or-bytes); unreadable images get an error and the others go on."""
    results = []
    for name, source in sources:
        try:
            pixels = decode_image(source, name=name).pixels
        except (ImageDecodeError, OSError) as exc:
            results.append(Explanation(image=name, error=str(exc)))
            continue
        probabilities = run.probabilities(pixels[None])[0]
        heatmap, target = grad_cam(run.model, pixels, run.image_size, target=int(probabilities.argmax()))
        results.append(Explanation(image=name, pixels=pixels, heatmap=heatmap, predicted=run.classes[target],
                                   probability=float(probabilities[target])))
    return results


def panel_figure(explanation: Explanation):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6))
    views = ((explanation.pixels, "image"), (explanation.heatmap, "Grad-CAM"),
             (overlay(explanation.pixels, explanation.heatmap), "overlay"))
    for position, (image, title) in enumerate(views):
        axes = figure.add_subplot(1, 3, position + 1)
        axes.imshow(image, cmap="jet" if image.ndim == 2 else None, vmin=0, vmax=1 if image.ndim == 2 else None)
        axes.set_title(title)
        axes.axis("off")
    figure.suptitle(f"{explanation.image}: {explanation.predicted} ({explanation.probability:.2f})")
    return figure


def write_explanations(explanations: Sequence[Explanation], out_dir: str | os.PathLike) -> list[Path]:
    from melanoma.core.io import save_figure

    out = Path(out_dir)
    written = []
    taken: set[str] = set()
    for explanation in explanations:
        if explanation.error:
            continue
        written.append(save_figure(panel_figure(explanation), out / _panel_name(explanation.image, taken)))
    return written


def _panel_name(image: str, taken: set[str]) -> str:
    """``STEM_gradcam.png``, numbered when two inputs share a stem (a/ISIC_1.jpg and b/ISIC_1.png), so no panel
    overwrites another."""
    stem = Path(display_name(image)).stem
    name, number = f"{stem}_gradcam.png", 2
    while name in taken:
        name, number = f"{stem}_{number}_gradcam.png", number + 1
    taken.add(name)
    return name
