"""Models: the course notebook's seed CNNs and any timm backbone, each behind one input-normalisation layer.

Every model takes float pixels in [0, 255] (N x 3 x H x W) and normalises them itself, with constants stored as
buffers in the checkpoint. Normalisation therefore lives in exactly one place, travels with the weights (and into
ONNX), and cannot be applied twice: the course notebook's failure mode, a second 1/255 rescale at serving time.
For the seed CNNs the layer *is* the notebook's ``Rescaling(1/255)`` (mean 0, std 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from melanoma.core.errors import ModelError
from melanoma.models.catalog import SEED_MODELS

TF_INPUT = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))            # TF ports (EfficientNet-Lite, MobileNetV2 in ../shared)
IMAGENET_INPUT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: stored in every run and checkpoint."""

    name: str
    num_classes: int
    image_size: int = 180
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    timm_kwargs: dict = field(default_factory=dict)
    colour_constancy: float = 0.0   # Shades of Gray Minkowski norm p applied to the input (0 = off)
    input_blur: float = 0.0         # Gaussian sigma in pixels at image_size applied to the input (0 = off)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> "ModelSpec":
        payload = dict(payload)
        payload["mean"] = tuple(payload["mean"])
        payload["std"] = tuple(payload["std"])
        return cls(**payload)

    @property
    def is_seed(self) -> bool:
        return self.name in SEED_MODELS


class InputNormalization(nn.Module):
    """(pixels / 255 - mean) / std, with mean/std as buffers so they are saved with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels / 255.0 - self.mean) / self.std


class ShadesOfGray(nn.Module):
    """Colour constancy (Finlayson & Trezzi 2004; Barata et al. 2015 for dermoscopy): estimate each image's
    illuminant as the Minkowski p-norm mean of each channel and rescale the channels so that it becomes grey.

    Dermatoscopes of different makes and years tint images differently; a model can learn the tint as a shortcut
    for the class. Inside the model it applies identically in training, evaluation, ONNX and serving.
    """

    def __init__(self, power: float = 6.0):
        super().__init__()
        if power < 1:
            raise ModelError(f"colour constancy needs a Minkowski norm p >= 1, not {power}")
        self.power = float(power)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        scaled = pixels.float().clamp(0.0, 255.0) / 255.0
        illuminant = scaled.pow(self.power).mean(dim=(2, 3), keepdim=True).pow(1.0 / self.power).clamp_min(1e-3)
        gain = illuminant.mean(dim=1, keepdim=True) / illuminant
        return (pixels * gain).clamp(0.0, 255.0)


class GaussianBlur(nn.Module):
    """A fixed Gaussian low-pass of the input (sigma in pixels), the same for every image and every data source.

    Sources keep their pictures at different resolutions: the course set's 180x180 files carry about twice the fine
    detail of the same pictures in isic-extra (200x150 and 256x192 files), so sharpness alone would tell a model which
    source an image came from. Blurring every input to the resolution the coarsest source can give removes that cue
    (``benchmarks/source_shortcut.py`` measures it). Inside the model it applies identically in training,
    evaluation, ONNX and serving."""

    def __init__(self, sigma: float):
        super().__init__()
        if not sigma > 0:
            raise ModelError(f"input blur needs a positive sigma in pixels, not {sigma}")
        radius = max(1, int(round(3 * sigma)))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
        self.register_buffer("kernel", (kernel / kernel.sum()).repeat(3, 1, 1, 1), persistent=False)
        self.radius = radius

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # separable: rows, then columns; reflect padding keeps the borders' brightness
        padded = nn.functional.pad(pixels, (self.radius, self.radius, self.radius, self.radius), mode="reflect")
        rows = nn.functional.conv2d(padded, self.kernel.view(3, 1, 1, -1).to(pixels.dtype), groups=3)
        return nn.functional.conv2d(rows, self.kernel.view(3, 1, -1, 1).to(pixels.dtype), groups=3)


class SeedCNN(nn.Module):
    """Conv(3x3, same)+ReLU -> MaxPool, three times; [Dropout]; Flatten -> Dense(128)+ReLU -> Dense(classes)."""

    def __init__(self, num_classes: int, image_size: int = 180, channels: Sequence[int] = (32, 64, 128),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, side = 3, image_size
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding="same"), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            in_channels, side = out_channels, side // 2
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))


class Classifier(nn.Module):
    """Input normalisation followed by a network; the single module that is trained, saved and exported."""

    def __init__(self, spec: ModelSpec, network: nn.Module):
        super().__init__()
        self.spec = spec
        self.colour = ShadesOfGray(spec.colour_constancy) if spec.colour_constancy else nn.Identity()
        self.blur = GaussianBlur(spec.input_blur) if spec.input_blur else nn.Identity()
        self.normalize = InputNormalization(spec.mean, spec.std)
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(self.blur(self.colour(pixels))))

    def features_and_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled penultimate features and the logits of one forward pass (the out-of-distribution gate reads
        the features; in eval mode the logits equal ``forward``'s)."""
        x = self.normalize(self.blur(self.colour(pixels)))
        if self.spec.is_seed:
            network = self.network
            features = network.classifier[:-1](network.dropout(network.features(x)))
            return features, network.classifier[-1](features)
        features = self.network.forward_head(self.network.forward_features(x), pre_logits=True)
        return features, self.network.get_classifier()(features)

    def backbone_and_head(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Parameters of the feature extractor and of the classification head (for freezing and per-group LRs)."""
        if self.spec.is_seed:
            head = list(self.network.classifier.parameters())
        else:
            head = list(self.network.get_classifier().parameters())
        head_ids = {id(p) for p in head}
        return [p for p in self.network.parameters() if id(p) not in head_ids], head


    def early_stage_modules(self, stages: int) -> list[nn.Module]:
        """Stem and the first ``stages`` stages of an EfficientNet/MobileNet-style timm network (for freezing)."""
        if stages <= 0:
            return []
        network = self.network
        if not all(hasattr(network, name) for name in ("conv_stem", "bn1", "blocks")):
            raise ModelError(f"freezing early stages needs an EfficientNet/MobileNet-style timm model; "
                             f"'{self.spec.name}' has no conv_stem/blocks (use --freeze-stages 0)")
        if stages > len(network.blocks):
            raise ModelError(f"'{self.spec.name}' has {len(network.blocks)} stages; cannot freeze {stages}")
        return [network.conv_stem, network.bn1, *network.blocks[:stages]]


def build_model(spec: ModelSpec) -> Classifier:
    """A randomly initialised model for ``spec`` (pretrained weights are loaded by melanoma.models.weights)."""
    if spec.num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {spec.num_classes}")
    if spec.is_seed:
        network = SeedCNN(spec.num_classes, spec.image_size, **SEED_MODELS[spec.name])
    else:
        network = _timm_network(spec)
    return Classifier(spec, network)


def _timm_network(spec: ModelSpec) -> nn.Module:
    import timm

    if not timm.is_model(spec.name):
        close = timm.list_models(f"*{spec.name.split('_')[0]}*")[:8]
        raise ModelError(f"unknown model '{spec.name}': not a seed model ({', '.join(SEED_MODELS)}) and not a timm "
                         f"architecture" + (f" (similar timm names: {', '.join(close)})" if close else ""))
    return timm.create_model(spec.name, pretrained=False, num_classes=spec.num_classes, **spec.timm_kwargs)


def default_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std matching a model's weights: identity-scaled for the seeds, the timm config otherwise."""
    if name in SEED_MODELS:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if name.startswith("tf_") or name.startswith("mobilenetv2"):
        return TF_INPUT
    import timm

    if not timm.is_model(name):
        return IMAGENET_INPUT
    config = timm.get_pretrained_cfg(name)
    if config is None:
        return IMAGENET_INPUT
    return tuple(config.mean), tuple(config.std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
