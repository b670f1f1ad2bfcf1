"""Class balancing modes, the Augmentor-style expansion, augmentation presets and lesion-grouped splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from melanoma.core.errors import DataError, PresetError
from melanoma.data.records import acquisition_era
from melanoma.data.transforms import PRESETS, dihedral_views, train_transform
from melanoma.train.balance import (
    augmentor_rotate,
    balanced_sampler,
    class_weights,
    expand,
    parse_balance,
    within_class_group_factor,
)
from melanoma.train.splits import grouped_stratified_split, random_split

LABELS = np.array([0] * 60 + [1] * 30 + [2] * 10)


def test_parse_balance_modes_and_errors():
    assert str(parse_balance("expand:500")) == "expand:500"
    assert parse_balance("sampler").mode == "sampler"
    for bad, message in (("expand:", "positive number"), ("expand:0", "positive number"),
                         ("expand:x", "positive number"), ("oversample", "unknown balancing")):
        with pytest.raises(DataError, match=message):
            parse_balance(bad)


def test_class_weights_equalise_each_class_total():
    weights = class_weights(LABELS, 4).numpy()
    totals = weights[:3] * np.bincount(LABELS)
    assert np.allclose(totals, totals[0])                   # every present class weighs the same in the loss
    assert np.isclose((weights[LABELS]).sum(), len(LABELS))  # and the loss keeps its scale
    assert weights[3] == 0                                  # an absent class gets no weight
    assert weights[2] > weights[1] > weights[0]


def test_sampler_draws_classes_equally():
    sampler = balanced_sampler(np.tile(LABELS, 50), 3, seed=0)
    drawn = np.tile(LABELS, 50)[list(sampler)]
    shares = np.bincount(drawn) / len(drawn)
    assert np.allclose(shares, 1 / 3, atol=0.02)
    assert list(balanced_sampler(LABELS, 3, seed=1)) == list(balanced_sampler(LABELS, 3, seed=1))


def test_era_groups_share_their_class_equally_and_leave_class_shares_alone():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    eras = np.array(["old"] * 50 + ["new"] * 10 + ["old"] * 5 + ["new"] * 25 + ["new"] * 10)
    factor = within_class_group_factor(labels, eras)
    for label in range(3):
        in_class = labels == label
        assert np.isclose(factor[in_class].sum(), in_class.sum())  # the class's total weight is unchanged
        totals = [factor[in_class & (eras == era)].sum() for era in np.unique(eras[in_class])]
        assert np.allclose(totals, totals[0])                      # and split equally between its eras
    draws = np.concatenate([list(balanced_sampler(labels, 3, seed=seed, groups=eras.tolist()))
                            for seed in range(200)])
    old_melanoma, new_melanoma = np.isin(draws, np.arange(50)).mean(), np.isin(draws, np.arange(50, 60)).mean()
    assert abs(old_melanoma - new_melanoma) < 0.02 and abs(old_melanoma + new_melanoma - 1 / 3) < 0.02
    with pytest.raises(ValueError, match="2 group names for 100 images"):
        within_class_group_factor(labels, ["a", "b"])


def test_acquisition_era_from_the_isic_id():
    assert acquisition_era("melanoma/ISIC_0000002.jpg") == "2016-17 archive"
    assert acquisition_era("ISIC_0009999_downsampled.jpg") == "2016-17 archive"
    assert acquisition_era("nevus/ISIC_0024306.jpg") == "HAM10000"
    assert acquisition_era("lesion.png") == "later"


def test_expand_makes_n_copies_per_class_from_that_class():
    images = np.stack([np.full((16, 16, 3), label * 40 + i % 5, dtype=np.uint8) for i, label in enumerate(LABELS)])
    new_images, new_labels, sources = expand(images, LABELS, copies=25, num_classes=4, seed=0)
    assert np.bincount(new_labels, minlength=4).tolist() == [25, 25, 25, 0]
    assert (LABELS[sources] == new_labels).all()
    assert new_images.shape == (75, 16, 16, 3) and new_images.dtype == np.uint8


def test_augmentor_rotation_keeps_size_and_rotates_about_70_percent():
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    outputs = [augmentor_rotate(image, rng) for _ in range(300)]
    assert all(o.shape == image.shape for o in outputs)
    rotated = sum(not np.array_equal(o, image) for o in outputs) / len(outputs)
    assert 0.6 < rotated < 0.8


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_return_uint8_at_size(preset):
    torch.manual_seed(0)
    out = train_transform(preset, 48)(torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8))
    assert out.shape == (3, 48, 48) and out.dtype == torch.uint8


def test_unknown_preset():
    with pytest.raises(PresetError, match="unknown augmentation preset 'fancy'"):
        train_transform("fancy", 32)


def test_dihedral_views_are_the_8_symmetries():
    batch = torch.arange(9.0).view(1, 1, 3, 3)
    views = {tuple(v.flatten().tolist()) for v in dihedral_views(batch)}
    assert len(views) == 8


def test_grouped_split_keeps_groups_together_and_stratifies():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    groups = [f"lesion{label}-{rng.integers(0, 15)}" for label in labels]
    train_idx, val_idx = grouped_stratified_split(labels, groups, 0.2, seed=3)
    assert not {groups[i] for i in train_idx} & {groups[i] for i in val_idx}
    assert set(labels[val_idx]) == {0, 1, 2}
    assert len(train_idx) + len(val_idx) == len(labels)
    again = grouped_stratified_split(labels, groups, 0.2, seed=3)
    assert np.array_equal(again[1], val_idx)


def test_split_refuses_a_class_too_small_to_split():
    labels = np.array([0, 0, 0, 1])
    with pytest.raises(DataError, match="class 1 has 1 independent image"):
        grouped_stratified_split(labels, ["a", "b", "c", "d"], 0.2, seed=0)
    with pytest.raises(DataError, match="at least 2 classes"):
        grouped_stratified_split(np.zeros(5, dtype=int), list("abcde"), 0.2, seed=0)


def test_random_split_is_seeded_and_complete():
    train_idx, val_idx = random_split(100, 0.2, seed=123)
    assert len(val_idx) == 20 and sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(100))
    assert np.array_equal(random_split(100, 0.2, seed=123)[1], val_idx)
