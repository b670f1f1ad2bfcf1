"""The fine-tuning recipe's stages: frozen layers really frozen then unfrozen, EMA, TTA, and recipe defaults."""
from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_dataset

from melanoma.config import RECIPES, TrainConfig
from melanoma.models.networks import TF_INPUT, ModelSpec, build_model
from melanoma.models.probabilities import predict_probabilities
from melanoma.models.weights import imagenet_state_dict
from melanoma.train.pipeline import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("recipe") / "data", per_class=8, test_per_class=2)


@pytest.fixture(scope="module")
def imagenet():
    return imagenet_state_dict("tf_efficientnet_lite0", "package")


def _finetune(data, out, **overrides) -> TrainConfig:
    base = TrainConfig(data=str(data), out=str(out), image_size=32, batch_size=8, progress=False, threads=1,
                       ema_decay=0.0, tta=False, epochs=2, freeze_epochs=1, freeze_stages=2)
    return replace(base, **overrides)


def _backbone_state(run) -> dict:
    """The network's weights at the end of training (last.ckpt; best.pt may be an earlier epoch)."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint.get("current_model_state", checkpoint["state_dict"])  # with EMA, state_dict is the average
    return {k.removeprefix("model.network."): v for k, v in state.items() if k.startswith("model.network.")}


def test_head_warm_up_freezes_the_whole_backbone(tiny, tmp_path, imagenet):
    run = train(_finetune(tiny, tmp_path / "warm", epochs=1), log=lambda *_: None)
    trained = _backbone_state(run)
    backbone = [k for k in trained if not k.startswith("classifier.")]
    assert all(torch.equal(trained[k], imagenet[k]) for k in backbone), "a frozen tensor or BN statistic moved"
    assert not torch.equal(trained["classifier.bias"], torch.zeros(3))


def test_after_warm_up_only_the_early_stages_stay_frozen(tiny, tmp_path, imagenet):
    run = train(_finetune(tiny, tmp_path / "full", epochs=2), log=lambda *_: None)
    trained = _backbone_state(run)
    early = [k for k in trained if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    late = [k for k in trained if k.startswith(("blocks.5.", "conv_head.")) and k.endswith("weight")]
    assert early and all(torch.equal(trained[k], imagenet[k]) for k in early)
    assert late and all(not torch.equal(trained[k], imagenet[k]) for k in late)


def test_ema_changes_what_is_validated_not_how_it_trains(tiny, tmp_path):
    plain = train(_finetune(tiny, tmp_path / "plain", freeze_epochs=0, weights="none"), log=lambda *_: None)
    averaged = train(_finetune(tiny, tmp_path / "ema", freeze_epochs=0, weights="none", ema_decay=0.5),
                     log=lambda *_: None)
    def read(run):
        return list(csv.DictReader((run / "history.csv").open()))

    assert [r["train_loss"] for r in read(plain)] == [r["train_loss"] for r in read(averaged)]
    assert read(plain)[-1]["val_loss"] != read(averaged)[-1]["val_loss"]


def test_before_averaging_starts_the_trained_weights_are_validated_and_kept(tiny, tmp_path):
    run = train(_finetune(tiny, tmp_path / "warm-ema", epochs=1, ema_decay=0.5), log=lambda *_: None)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model_state"]
    kept = {k.removeprefix("network."): v for k, v in best.items() if k.startswith("network.")}
    trained = _backbone_state(run)
    assert kept.keys() == trained.keys() and all(torch.equal(kept[k], trained[k]) for k in kept)
    assert not torch.equal(kept["classifier.bias"], torch.zeros(3))


def test_tta_is_invariant_to_flips_and_quarter_turns():
    torch.manual_seed(0)
    model = build_model(ModelSpec("tf_efficientnet_lite0", 3, 32, *TF_INPUT)).eval()
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    views = np.stack([image, np.rot90(image).copy(), image[:, ::-1].copy()])
    with_tta = predict_probabilities(model, views, 32, tta=True)
    without = predict_probabilities(model, views, 32, tta=False)
    assert np.allclose(with_tta[0], with_tta[1], atol=1e-5) and np.allclose(with_tta[0], with_tta[2], atol=1e-5)
    assert not np.allclose(without[0], without[1], atol=1e-5)


def test_default_is_the_finetune_recipe_on_lite0_and_seed_models_get_the_notebooks():
    default = TrainConfig(data="d", out="o").resolved()
    assert (default.model, default.recipe, default.weights, default.preset) == \
        ("tf_efficientnet_lite0", "finetune", "package", "dermoscopy")
    seed = TrainConfig(data="d", out="o", model="seed-cnn").resolved()
    assert (seed.recipe, seed.lr, seed.optimizer, seed.image_size, seed.weights) == ("seed", 1e-3, "adam", 180, "none")
    assert TrainConfig(data="d", out="o", model="seed-cnn", epochs=3).resolved().epochs == 3
    assert set(RECIPES["seed"]) == set(RECIPES["finetune"])
