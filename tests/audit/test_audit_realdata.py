"""Facts about ../shared/data/isic-9class-180px that can be checked by hand; skipped only where the data is absent."""
from __future__ import annotations

import pytest
from conftest import SHARED_DATA, TRUTH_FILES, requires_shared_data

from melanoma.audit.audit import AuditConfig, run_audit
from melanoma.data.sources import discover_folder
from melanoma.data.truth import load_ground_truth

pytestmark = requires_shared_data


@pytest.fixture(scope="module")
def real():
    index = discover_folder(SHARED_DATA)
    truth = load_ground_truth(TRUTH_FILES)
    return index, truth, run_audit(index, truth, AuditConfig(workers=4))


def test_155_ids_filed_under_two_classes(real):
    _, _, result = real
    assert result.summary["image_ids_in_several_classes"] == 155
    pairs = {tuple(c["labels"]) for c in result.label_conflicts}
    assert pairs == {("actinic keratosis", "nevus"), ("melanoma", "seborrheic keratosis")}


def test_bracket_one_copies_and_identical_pairs_under_different_ids(real):
    _, _, result = real
    identical = [g for g in result.duplicate_groups if g["kind"] == "identical"]
    files = {f for g in identical for f in g["files"]}
    assert "Train/basal cell carcinoma/ISIC_0025509(1).jpg" in files
    assert "Train/basal cell carcinoma/ISIC_0025601(1).jpg" in files
    cross_id = [set(g["image_ids"]) for g in identical if len(set(g["image_ids"])) > 1]
    assert {"ISIC_0000279", "ISIC_0000280"} in cross_id and {"ISIC_0000477", "ISIC_0000512"} in cross_id


def test_all_18_byte_identical_test_images_and_lesion_leaks(real):
    _, _, result = real
    reasons = [leak["reason"] for leak in result.cross_split_leaks]
    assert reasons.count("identical") == 18
    assert reasons.count("same-lesion") > 0
    assert all(leak["lesion_id"] for leak in result.cross_split_leaks if leak["reason"] == "same-lesion")
    assert len(result.cross_split_leaks) > 40


def test_more_than_100_labels_contradicted_by_official_truth(real):
    _, _, result = real
    assert len(result.truth_disagreements) > 100
    assert result.summary["images_without_official_label"] > 0
    assert {d["source"] for d in result.truth_disagreements} <= {f.name for f in TRUTH_FILES}


def test_near_copies_never_join_two_different_lesions(real):
    """No near-copy group holds photos of two different HAM10000 lesions."""
    _, truth, result = real
    near = [g for g in result.duplicate_groups if g["kind"] == "near-identical"]
    assert near, "the shared data holds re-encoded copies under different ids"
    for group in near:
        lesions = {truth.lesion_ids[i] for i in group["image_ids"] if i in truth.lesion_ids}
        assert len(lesions) <= 1, group


def test_a_recropped_recoloured_copy_of_a_test_image_is_a_leak(real):
    """ISIC_0001137 (Train, with a ruler) is ISIC_0010808 (Test) cropped and recoloured: the same hairs. The 256-bit
    pHash missed it; the near-copy search finds it, and training drops it."""
    _, _, result = real
    leak = next(leak for leak in result.cross_split_leaks if leak["image_id"] == "ISIC_0010808")
    assert "Train/melanoma/ISIC_0001137.jpg" in leak["train_files"]
    actions = {row["path"]: row["action"] for row in result.manifest}
    assert actions["Train/melanoma/ISIC_0001137.jpg"] == "drop-train-copy-of-test"


def test_clean_manifest_drops_every_train_copy_of_a_leaked_test_image(real):
    _, _, result = real
    leaked_train = {f for leak in result.cross_split_leaks for f in leak["train_files"]}
    actions = {row["path"]: row["action"] for row in result.manifest}
    assert leaked_train and all(actions[f] == "drop-train-copy-of-test" for f in leaked_train)
    assert all(row["action"] in ("keep", "relabel") for row in result.manifest if row["split"] == "Test")
