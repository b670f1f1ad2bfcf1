"""The one path from images to class probabilities, for validation, Test, prediction and serving.

``probabilities_with`` applies the evaluation transform, the optional 8-view test-time augmentation and batching
around any backend's forward function (PyTorch or onnxruntime); ``predict_probabilities`` is that loop on a PyTorch
model. Nothing else turns evaluation images into model input.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from melanoma.transforms import dihedral_views, eval_pixels, to_model_input


def predict_probabilities(model: torch.nn.Module, images: np.ndarray, image_size: int, batch_size: int = 64,
                          tta: bool = False, device: str | torch.device = "cpu") -> np.ndarray:
    """Softmax probabilities of a PyTorch model for N x H x W x 3 uint8 images (optionally TTA-averaged)."""
    model.eval()

    @torch.no_grad()
    def forward(pixels: torch.Tensor) -> np.ndarray:
        return torch.softmax(model(pixels.to(device)).float(), dim=1).cpu().numpy()

    return probabilities_with(forward, images, image_size, batch_size, tta)


def probabilities_with(forward: Callable[[torch.Tensor], np.ndarray], images: np.ndarray, image_size: int,
                       batch_size: int = 64, tta: bool = False) -> np.ndarray:
    """The evaluation loop shared by every backend: eval transform, optional 8-view TTA, batched ``forward``
    (float pixels N x 3 x H x W -> probabilities)."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([eval_pixels(image, image_size) for image in images[start:start + batch_size]])
        views = dihedral_views(batch) if tta else [batch]
        outputs.append(sum(forward(to_model_input(v, channels_last=False)) for v in views) / len(views))
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)
