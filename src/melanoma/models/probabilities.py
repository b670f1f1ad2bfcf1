"""The one path from images to class probabilities, for validation, Test, prediction and serving.

``outputs_with`` applies the evaluation transform, the optional 8-view test-time augmentation and batching around
any backend's forward function (PyTorch or onnxruntime), and keeps, beside the probabilities, the pooled features and
logits of the plain (unrotated) view that the out-of-distribution gate reads: one model call gives both.
``predict_outputs`` / ``predict_probabilities`` are that loop on a PyTorch model. Nothing else turns evaluation
images into model input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from melanoma.data.transforms import dihedral_views, eval_pixels, to_model_input

EPS = 1e-12


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.log(np.clip(probabilities, EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)

# forward(pixels) -> (probabilities, features or None, logits or None), each N x ...
Forward = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


@dataclass
class ModelOutputs:
    """Probabilities (TTA-averaged when asked) and the plain view's pooled features and logits (None when the
    backend does not give them)."""

    probabilities: np.ndarray
    features: np.ndarray | None = None
    logits: np.ndarray | None = None


def torch_forward(model: torch.nn.Module, device: str | torch.device = "cpu") -> Forward:
    """A PyTorch model as a forward function: softmax probabilities, pooled features and logits in one call."""
    model.eval()
    hook = getattr(model, "features_and_logits", None)

    @torch.no_grad()
    def forward(pixels: torch.Tensor):
        if hook is None:
            logits = model(pixels.to(device)).float()
            return torch.softmax(logits, dim=1).cpu().numpy(), None, logits.cpu().numpy()
        features, logits = hook(pixels.to(device))
        logits = logits.float()
        return (torch.softmax(logits, dim=1).cpu().numpy(), features.float().cpu().numpy(), logits.cpu().numpy())

    return forward


def predict_outputs(model: torch.nn.Module, images: np.ndarray, image_size: int, batch_size: int = 64,
                    tta: bool = False, device: str | torch.device = "cpu") -> ModelOutputs:
    """Probabilities, features and logits of a PyTorch model for N x H x W x 3 uint8 images."""
    return outputs_with(torch_forward(model, device), images, image_size, batch_size, tta)


def predict_probabilities(model: torch.nn.Module, images: np.ndarray, image_size: int, batch_size: int = 64,
                          tta: bool = False, device: str | torch.device = "cpu") -> np.ndarray:
    """Softmax probabilities of a PyTorch model for N x H x W x 3 uint8 images (optionally TTA-averaged)."""
    return predict_outputs(model, images, image_size, batch_size, tta, device).probabilities


def probabilities_with(forward: Callable[[torch.Tensor], np.ndarray], images: np.ndarray, image_size: int,
                       batch_size: int = 64, tta: bool = False) -> np.ndarray:
    """The evaluation loop around a forward function that returns probabilities only."""
    return outputs_with(lambda pixels: (forward(pixels), None, None), images, image_size, batch_size,
                        tta).probabilities


def outputs_with(forward: Forward, images: np.ndarray, image_size: int, batch_size: int = 64,
                 tta: bool = False) -> ModelOutputs:
    """The evaluation loop shared by every backend: eval transform, optional 8-view TTA, batched ``forward``
    (float pixels N x 3 x H x W -> probabilities, features, logits). Features and logits come from the plain view,
    the first of the TTA views, so the gate sees the same input with or without TTA."""
    probabilities, features, logits = [], [], []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([eval_pixels(image, image_size) for image in images[start:start + batch_size]])
        views = dihedral_views(batch) if tta else [batch]
        answers = [forward(to_model_input(v, channels_last=False)) for v in views]
        probabilities.append(sum(a[0] for a in answers) / len(answers))
        features.append(answers[0][1])
        logits.append(answers[0][2])
    if not probabilities:
        return ModelOutputs(np.zeros((0, 0), dtype=np.float32))
    return ModelOutputs(np.concatenate(probabilities),
                        None if any(f is None for f in features) else np.concatenate(features),
                        None if any(x is None for x in logits) else np.concatenate(logits))


@dataclass
class Answers:
    """A run's answers for N images: calibrated probabilities, and (when the run has a gate) each image's
    out-of-distribution score and whether it passes the gate. Sliceable, so the server's batcher can hand each
    request its own rows."""

    probabilities: np.ndarray
    ood_scores: np.ndarray | None = None
    in_distribution: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, rows) -> "Answers":
        return Answers(self.probabilities[rows], None if self.ood_scores is None else self.ood_scores[rows],
                       None if self.in_distribution is None else self.in_distribution[rows])
