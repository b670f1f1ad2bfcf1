"""Grad-CAM: the heatmap's shape, and that its heat lands on a synthetic lesion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from melanoma.assess.explain import grad_cam, grad_cam_layer, overlay
from melanoma.models.networks import Classifier, ModelSpec, build_model


class DarkSpotDetector(nn.Module):
    """Class 0 = 'has a dark spot': a conv that responds to darkness, pooled; class 1 is its negative."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.fill_(-1.0 / 75)
            self.conv.bias.fill_(1.0)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_heat_lands_on_the_synthetic_lesion():
    model = Classifier(ModelSpec("dark-spot", 2, 64), DarkSpotDetector()).eval()
    image = np.full((96, 96, 3), 230, dtype=np.uint8)
    yy, xx = np.mgrid[0:96, 0:96]
    lesion = (yy - 25) ** 2 + (xx - 65) ** 2 < 12 ** 2  # upper right
    image[lesion] = 40
    heat, target = grad_cam(model, image, image_size=64, target=0)
    assert heat.shape == (96, 96) and 0 <= heat.min() and heat.max() == pytest.approx(1.0)
    assert lesion[np.unravel_index(heat.argmax(), heat.shape)]
    assert heat[lesion].mean() > 3 * heat[~lesion].mean()


@pytest.mark.parametrize("name, layer_channels", [("seed-cnn", 128), ("tf_efficientnet_lite0", 1280)])
def test_target_layer_is_chosen_automatically(name, layer_channels):
    model = build_model(ModelSpec(name, 9, 64, (0.5,) * 3, (0.5,) * 3)).eval()
    assert grad_cam_layer(model).out_channels == layer_channels
    heat, target = grad_cam(model, np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8), 64)
    assert heat.shape == (50, 70) and 0 <= target < 9
    assert overlay(np.zeros((50, 70, 3), dtype=np.uint8), heat).shape == (50, 70, 3)
