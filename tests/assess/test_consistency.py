"""Rendering consistency (a model that reads the file's resolution fails it, a constant model passes), seeded
stress transforms, the acquisition eras' boundaries, external validation's input checks and the paired bootstrap."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import lesion_image, save_image
from PIL import Image

from melanoma.assess.consistency import STRESS_NAMES, copy_consistency, copy_pairs, stress_consistency, stressed
from melanoma.assess.external import external_summary, external_validation, read_external
from melanoma.assess.intervals import paired_auc_difference
from melanoma.core.errors import DataError
from melanoma.data.records import ERAS, acquisition_era

CLASSES = ["melanoma", "nevus"]


def _detail(images: np.ndarray) -> np.ndarray:
    """High-frequency energy: mean |difference| of neighbouring pixels, across and down (so a 90-degree turn or a
    flip leaves it as it is, and a resize or a JPEG re-encode does not)."""
    x = images.astype(np.float64)
    return np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))


def _resolution_reader(cut: float):
    """A model that answers from image detail alone: 'melanoma' (0.9) above ``cut``, else 'nevus' (0.1)."""
    def predict(images: np.ndarray) -> np.ndarray:
        p = np.where(_detail(images) > cut, 0.9, 0.1)
        return np.stack([p, 1 - p], axis=1)
    return predict


def _constant(images: np.ndarray) -> np.ndarray:
    return np.tile([0.3, 0.7], (len(images), 1))


@pytest.fixture
def copies(tmp_path):
    """Four pictures with fine texture, each saved twice: a 256 px file in source 'a', an 80 px one in 'b'."""
    groups = []
    for seed in range(4):
        picture = np.asarray(Image.fromarray(lesion_image(seed, 64)).resize((256, 256)), dtype=np.float64)
        picture = np.clip(picture + np.random.default_rng(seed).normal(0, 20, picture.shape), 0, 255).astype(np.uint8)
        name = f"ISIC_{seed:07d}"
        save_image(tmp_path / "a" / f"{name}.png", picture)
        save_image(tmp_path / "b" / f"{name}.png", np.asarray(Image.fromarray(picture).resize((80, 80))))
        groups.append({"kind": "same-id", "files": [f"b/{name}.png", f"a/{name}.png"], "sources": ["b", "a"],
                       "labels": ["melanoma", "melanoma"]})
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "audit.json").write_text(json.dumps({"duplicate_groups": groups + [
        {"kind": "identical", "files": ["a/x.png", "a/y.png"], "sources": ["a", "a"], "labels": ["nevus", "nevus"]},
        {"kind": "same-id", "files": ["a/gone.png", "b/gone.png"], "sources": ["a", "b"]}]}))  # files since removed
    return tmp_path


def test_a_model_that_reads_the_resolution_fails_copy_consistency_and_a_constant_model_passes(copies):
    pairs = copy_pairs(copies / "audit")
    assert [p["files"] for p in pairs][0] == ["a/ISIC_0000000.png", "b/ISIC_0000000.png"] and len(pairs) == 5
    from melanoma.data.images import build_cache
    from melanoma.data.records import ImageRecord

    sharp, soft = (_detail(build_cache([ImageRecord(copies / f"{s}/ISIC_{i:07d}.png", "x", "") for i in range(4)],
                                       size=128).images) for s in ("a", "b"))
    assert sharp.min() > soft.max()  # at the model's input size the larger file still shows more detail
    reader = _resolution_reader(cut=(sharp.min() + soft.max()) / 2)
    failed = copy_consistency(reader, copies, pairs, 128, CLASSES, threshold=0.5, trained={"a/ISIC_0000001.png"})
    assert failed["pairs"] == 4 and failed["missing"] == 1 and failed["all"]["top_class_changed"] == 1.0
    assert failed["all"]["alert_changed"] == 1.0 and failed["all"]["mean_abs_delta_melanoma"] == pytest.approx(0.8)
    assert failed["not_trained_on"]["n"] == 3
    passed = copy_consistency(_constant, copies, pairs, 128, CLASSES, threshold=0.5)
    assert passed["all"]["top_class_changed"] == 0.0 and passed["all"]["alert_changed"] == 0.0
    assert passed["all"]["mean_abs_delta_melanoma"] == 0.0


def test_stresses_catch_a_model_that_reads_detail_and_spare_a_constant_one():
    rng = np.random.default_rng(0)
    images = np.stack([np.clip(np.asarray(Image.fromarray(lesion_image(s, 64)).resize((128, 128)), dtype=np.float64)
                               + rng.normal(0, 20, (128, 128, 3)), 0, 255).astype(np.uint8) for s in range(6)])

    def detail_reader(batch: np.ndarray) -> np.ndarray:
        p = np.clip(_detail(batch) / 100, 0, 1)
        return np.stack([p, 1 - p], axis=1)

    result = stress_consistency(detail_reader, images, CLASSES, threshold=0.5, limit=None)["stresses"]
    assert result["re-render"]["mean_abs_delta_melanoma"] > 0.02
    assert result["rotate 90"]["mean_abs_delta_melanoma"] == pytest.approx(0)
    assert result["flip horizontal"]["mean_abs_delta_melanoma"] == pytest.approx(0)
    constant = stress_consistency(_constant, images, CLASSES, threshold=0.5, limit=4)
    assert constant["images"] == 4 and set(constant["stresses"]) == set(STRESS_NAMES)
    assert all(s["top_class_changed"] == 0 and s["alert_changed"] == 0 and s["mean_abs_delta_melanoma"] == 0
               for s in constant["stresses"].values())


def test_stress_transforms_are_seeded_per_image_and_keep_the_size():
    images = np.stack([lesion_image(s, 48) for s in range(4)])
    for name in STRESS_NAMES:
        once = stressed(images, name, seed=3)
        assert once.shape == images.shape and once.dtype == np.uint8
        assert np.array_equal(once, stressed(images, name, seed=3))
        assert np.array_equal(once[2:3], stressed(images[2:3], name, seed=3, indices=[2]))  # whatever the subset
    assert not np.array_equal(stressed(images, "re-render", seed=3), stressed(images, "re-render", seed=4))
    assert np.array_equal(stressed(images, "flip horizontal"), images[:, :, ::-1])
    assert np.array_equal(stressed(images, "rotate 90")[0], np.rot90(images[0]))
    assert np.array_equal(stressed(np.full((1, 8, 8, 3), 100, np.uint8), "brightness +20%"),
                          np.full((1, 8, 8, 3), 120, np.uint8))
    with pytest.raises(ValueError, match="unknown stress"):
        stressed(images, "upside down")


def test_acquisition_eras_follow_the_isic_collections():
    assert ERAS == ("2016-17 archive", "HAM10000", "later")
    assert [acquisition_era(f"melanoma/ISIC_{i:07d}.jpg") for i in (0, 10_000, 24_305, 24_306, 34_320, 34_321,
                                                                      53_469)] == \
        ["2016-17 archive"] * 3 + ["HAM10000"] * 2 + ["later"] * 2
    assert acquisition_era("ISIC_0016072_downsampled.jpg") == "2016-17 archive"
    assert acquisition_era("lesion.png") == "later"


def _external(tmp_path, rows: str, files=("melanoma/ISIC_0000001", "nevus/ISIC_0000002")):
    folder = tmp_path / "ext"
    for index, name in enumerate(files):
        save_image(folder / f"{name}.jpg", np.full((20, 20, 3), 40 if "melanoma" in name else 200, np.uint8))
    if rows is not None:
        (folder / "labels.csv").write_text(rows)
    return folder


@pytest.mark.parametrize("rows, message", [
    (None, "labels.csv: not found"),
    ("image_id,diagnosis\nISIC_0000001,melanoma\n", "needs image_id and class columns"),
    ("image_id,class\n", "no images listed"),
    ("image_id,class\nISIC_0000001,\n", "line 2: empty image_id or class"),
    ("image_id,class\nISIC_0000001,melanoma\nISIC_0000001,melanoma\n", "line 3: ISIC_0000001 is listed twice"),
    ("image_id,class\nISIC_0000001,wart\n", "line 2: class 'wart' is not one of the model's classes"),
    ("image_id,class\nISIC_0000009,melanoma\n", "line 2: no image file for ISIC_0000009"),
])
def test_external_validation_refuses_a_missing_or_malformed_labels_csv(tmp_path, rows, message):
    folder = _external(tmp_path, rows)
    with pytest.raises(DataError, match=message) as error:
        read_external(folder, CLASSES)
    assert "\n" not in str(error.value) and "ext" in str(error.value)


def test_external_validation_scores_melanoma_auc_and_the_alert(tmp_path):
    files = [f"melanoma/ISIC_000000{i}" for i in range(4)] + [f"nevus/ISIC_000001{i}" for i in range(4)]
    folder = _external(tmp_path, "image_id,class\n" + "".join(f"{f.split('/')[1]},{f.split('/')[0]}\n"
                                                              for f in files), files)

    def darkness(images: np.ndarray) -> np.ndarray:
        p = 1 - images.mean(axis=(1, 2, 3)) / 255
        return np.stack([p, 1 - p], axis=1)

    result = external_validation(folder, darkness, CLASSES, 16, threshold=0.5, resamples=50)
    assert result["n"] == 8 and result["counts"] == {"melanoma": 4, "nevus": 4}
    assert result["melanoma_auc"]["value"] == 1.0 and result["melanoma_vs_nevus_auc"]["value"] == 1.0
    assert result["melanoma"]["sensitivity"] == 1.0 and result["melanoma"]["specificity"] == 1.0
    # one interval for one number: the AUC's interval is the headline bootstrap's, from the same resamples
    assert {k: result["melanoma_auc"][k] for k in ("value", "low", "high")} == result["ci"]["melanoma_auc"]


def test_paired_bootstrap_tells_a_real_gain_from_none():
    rng = np.random.default_rng(0)
    positive = np.arange(200) < 60
    noise = rng.random(200)
    same = paired_auc_difference(positive, positive, noise, noise.copy(), resamples=200)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0 and not same["outside_noise"]
    better = paired_auc_difference(positive, positive, noise, noise + positive, resamples=200)
    assert better["difference"] > 0.3 and better["low"] > 0 and better["outside_noise"]


def test_a_trained_run_reports_consistency_and_external_validation(tmp_path):
    from conftest import train_tiny_run

    folder = _external(tmp_path, "image_id,class\nISIC_0000001,melanoma\nISIC_0000002,nevus\n")
    _, run = train_tiny_run(tmp_path, external=str(folder), bootstrap=20)
    metrics = json.loads((run / "metrics.json").read_text())
    stresses = metrics["consistency"]["stresses"]
    assert stresses["images"] == metrics["validation"]["n"] and set(stresses["stresses"]) == set(STRESS_NAMES)
    assert metrics["external"]["n"] == 2 and metrics["external"]["melanoma_auc"]["positives"] == 1
    page = (run / "report.html").read_text()
    assert "Rendering consistency" in page and "External validation" in page


def test_a_bad_external_folder_stops_training_before_anything_is_written(tmp_path):
    from conftest import train_tiny_run

    with pytest.raises(DataError, match="labels.csv: not found"):
        train_tiny_run(tmp_path, external=str(_external(tmp_path, None)))
    assert not (tmp_path / "run").exists()


def test_external_validation_reports_each_block_of_isic_ids(tmp_path):
    """The wide-field ISIC_0012000-0015999 images apart from the early archive's, each with n, melanomas and its
    own AUC interval; a block the scores separate perfectly and one they invert are told apart."""
    early = [f"melanoma/ISIC_000000{i}" for i in range(3)] + [f"nevus/ISIC_000001{i}" for i in range(3)]
    wide = [f"melanoma/ISIC_001300{i}" for i in range(3)] + [f"nevus/ISIC_001301{i}" for i in range(3)]
    folder = _external(tmp_path, "image_id,class\n" + "".join(f"{f.split('/')[1]},{f.split('/')[0]}\n"
                                                              for f in early + wide), early + wide)
    for name in wide:  # in the wide-field block the melanomas are the light ones: the dark-means-melanoma rule fails
        save_image(folder / f"{name}.jpg", np.full((20, 20, 3), 200 if "melanoma" in name else 40, np.uint8))

    def darkness(images: np.ndarray) -> np.ndarray:
        p = 1 - images.mean(axis=(1, 2, 3)) / 255
        return np.stack([p, 1 - p], axis=1)

    result = external_validation(folder, darkness, CLASSES, 16, threshold=0.5, resamples=50)
    blocks = result["by_collection"]
    assert list(blocks) == ["ISIC_0000000-0011999", "ISIC_0012000-0015999"]
    assert {name: (b["n"], b["melanomas"]) for name, b in blocks.items()} == {
        "ISIC_0000000-0011999": (6, 3), "ISIC_0012000-0015999": (6, 3)}
    assert blocks["ISIC_0000000-0011999"]["melanoma_auc"]["value"] == 1.0
    assert blocks["ISIC_0012000-0015999"]["melanoma_auc"]["value"] == 0.0
    assert blocks["ISIC_0012000-0015999"]["melanoma_auc"]["high"] == 0.0  # an interval of its own
    assert "external, ids ISIC_0012000-0015999 (n=6, 3 melanomas): melanoma AUC 0.000" in external_summary(result)
