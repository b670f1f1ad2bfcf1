"""Models: output shapes, the normalisation layer, the head/backbone split, and bad model names."""
from __future__ import annotations

import pytest
import torch

from melanoma.core.errors import ModelError
from melanoma.models.catalog import SEED_MODELS
from melanoma.models.networks import ModelSpec, build_model, count_parameters, default_normalization


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
def test_seed_models_map_180px_images_to_nine_logits(name):
    model = build_model(ModelSpec(name, num_classes=9, image_size=180)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 180, 180) * 255).shape == (2, 9)


def test_seed_cnn_matches_the_notebook_layout():
    network = build_model(ModelSpec("seed-cnn", 9, 180)).network
    convs = [m for m in network.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128] and all(c.kernel_size == (3, 3) for c in convs)
    dense = [m for m in network.classifier if isinstance(m, torch.nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(128 * 22 * 22, 128), (128, 9)]
    aug = build_model(ModelSpec("seed-cnn-aug", 9, 180)).network
    assert [c.out_channels for c in aug.features if isinstance(c, torch.nn.Conv2d)] == [64, 128, 256]
    assert isinstance(aug.dropout, torch.nn.Dropout) and aug.dropout.p == 0.2


def test_seed_normalisation_is_the_notebooks_rescaling():
    model = build_model(ModelSpec("seed-cnn", 9, 180))
    pixels = torch.full((1, 3, 4, 4), 255.0)
    assert torch.allclose(model.normalize(pixels), torch.ones(1, 3, 4, 4))


def test_timm_backbone_by_name_with_tf_normalisation():
    mean, std = default_normalization("tf_efficientnet_lite0")
    assert mean == std == (0.5, 0.5, 0.5)
    model = build_model(ModelSpec("tf_efficientnet_lite0", 9, 64, mean, std)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64) * 255).shape == (1, 9)
    assert torch.allclose(model.normalize(torch.full((1, 3, 1, 1), 255.0)), torch.ones(1, 3, 1, 1))
    backbone, head = model.backbone_and_head()
    assert sum(p.numel() for p in head) == 1280 * 9 + 9
    assert sum(p.numel() for p in backbone) + sum(p.numel() for p in head) == count_parameters(model.network)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown model 'resnet-999'"):
        build_model(ModelSpec("resnet-999", 9))


def test_fewer_than_two_classes_is_refused():
    with pytest.raises(ModelError, match="at least 2 classes"):
        build_model(ModelSpec("seed-cnn", 1))


def test_shades_of_gray_removes_a_colour_cast():
    from melanoma.models.networks import ShadesOfGray

    torch.manual_seed(0)
    scene = torch.rand(2, 3, 16, 16) * 200
    cast = torch.tensor([1.0, 0.7, 0.45]).view(1, 3, 1, 1)  # a yellow-orange dermatoscope light
    corrected, corrected_cast = ShadesOfGray(6)(scene), ShadesOfGray(6)(scene * cast)
    # the same scene under two lights gives the same channel balance (up to overall brightness)
    ratio = corrected_cast / corrected
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), rtol=1e-4)
    illuminant = (corrected_cast / 255).pow(6).mean(dim=(2, 3)).pow(1 / 6)
    assert torch.allclose(illuminant, illuminant.mean(dim=1, keepdim=True).expand_as(illuminant), rtol=1e-4)


def test_colour_constancy_travels_in_the_spec_and_old_specs_still_load():
    spec = ModelSpec("seed-cnn", 9, 32, colour_constancy=6.0)
    model = build_model(ModelSpec.from_dict(spec.to_dict()))
    assert model.colour.power == 6.0
    legacy = spec.to_dict()
    del legacy["colour_constancy"]  # checkpoints written before the option existed
    assert isinstance(build_model(ModelSpec.from_dict(legacy)).colour, torch.nn.Identity)
    with pytest.raises(ModelError, match="p >= 1"):
        build_model(ModelSpec("seed-cnn", 9, 32, colour_constancy=0.5))


def test_input_blur_keeps_flat_images_flat_and_spreads_a_point():
    from melanoma.models.networks import GaussianBlur

    blur = GaussianBlur(1.0)
    flat = torch.full((1, 3, 16, 16), 120.0)
    assert torch.allclose(blur(flat), flat, atol=1e-4)
    point = torch.zeros(1, 3, 15, 15)
    point[..., 7, 7] = 255.0
    spread = blur(point)
    assert abs(float(spread.sum()) - 3 * 255.0) < 1e-2  # the low-pass keeps brightness
    assert spread[0, 0, 7, 7] < 0.2 * 255 and spread[0, 0, 7, 8] > 0.05 * 255
    with pytest.raises(ModelError, match="positive sigma"):
        GaussianBlur(0)


def test_input_blur_travels_in_the_spec():
    spec = ModelSpec("seed-cnn", 3, 32, input_blur=1.2)
    assert isinstance(build_model(spec).blur, torch.nn.Module) and ModelSpec.from_dict(spec.to_dict()) == spec
    assert isinstance(build_model(ModelSpec("seed-cnn", 3, 32)).blur, torch.nn.Identity)
