"""Every audit detector on small synthetic datasets built in the test."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from conftest import jpeg_bytes, lesion_image, save_image
from PIL import Image, ImageEnhance

from melanoma.audit.audit import AuditConfig, run_audit
from melanoma.audit.copies import fingerprint, near_copy_pairs
from melanoma.audit.report import write_audit
from melanoma.cli.main import main as cli_main
from melanoma.data.records import ImageRecord
from melanoma.data.sources import discover_folder
from melanoma.data.truth import load_ground_truth


def _variants(pixels: np.ndarray):
    image = Image.fromarray(pixels)
    side = pixels.shape[0]
    yield "jpeg q50", np.asarray(Image.open(io.BytesIO(jpeg_bytes(pixels, quality=50))).convert("RGB"))
    yield "resized", np.asarray(image.resize((140, 140), Image.Resampling.BICUBIC))
    yield "4:3 aspect", np.asarray(image.resize((160, 120), Image.Resampling.BICUBIC))
    yield "colour", np.asarray(ImageEnhance.Color(image).enhance(0.85))
    yield "brighter", np.asarray(ImageEnhance.Brightness(image).enhance(1.08))
    yield "cropped 15%", pixels[side * 15 // 100:, side * 15 // 100:]
    yield "cropped, squashed, recoloured", np.asarray(
        ImageEnhance.Color(Image.fromarray(pixels[side // 10:, : side * 9 // 10])).enhance(0.8).resize((120, 90)))


def _near_distances(images: list[np.ndarray], tmp_path) -> dict[tuple[int, int], float]:
    """Near-copy distance of every flagged pair among ``images``, as the audit computes it from files."""
    prints = []
    for position, pixels in enumerate(images):
        path = save_image(tmp_path / f"{position}.png", pixels)
        prints.append(fingerprint(ImageRecord(path=path, rel_path=path.name, label="x")))
    return {(i, j): d for i, j, d in near_copy_pairs(prints, AuditConfig().near_threshold)}


@pytest.mark.parametrize("seed", range(4))
def test_near_copies_survive_recompression_resize_aspect_crop_and_colour(tmp_path, seed):
    original = lesion_image(seed, size=128)
    variants = list(_variants(original))
    flagged = _near_distances([original] + [pixels for _, pixels in variants], tmp_path)
    for position, (name, _) in enumerate(variants, start=1):
        assert (0, position) in flagged, name


def test_distinct_lesions_are_not_copies(tmp_path):
    assert _near_distances([lesion_image(seed, 128) for seed in range(10)], tmp_path) == {}


@pytest.fixture
def dirty(tmp_path):
    """A small dataset with one of each problem, and the truth files that expose the rest."""
    root = tmp_path / "data"
    m1, m2, n1, t_lesion, t_clean = (lesion_image(s, 96) for s in (1, 2, 3, 7, 8))
    save_image(root / "Train/melanoma/ISIC_0000100.jpg", m1, quality=92)
    (root / "Train/melanoma/ISIC_0000101.jpg").write_bytes((root / "Train/melanoma/ISIC_0000100.jpg").read_bytes())
    save_image(root / "Train/melanoma/ISIC_0000002.jpg", m2, quality=92)
    (root / "Train/nevus").mkdir(parents=True)
    (root / "Train/nevus/ISIC_0000002.jpg").write_bytes((root / "Train/melanoma/ISIC_0000002.jpg").read_bytes())
    save_image(root / "Train/nevus/ISIC_0000003.jpg", n1, quality=92)
    save_image(root / "Train/nevus/ISIC_0000004.jpg", lesion_image(4, 96), quality=92)
    save_image(root / "Train/nevus/ISIC_0000005.jpg", lesion_image(5, 96), quality=92)
    m6 = lesion_image(6, 96)
    save_image(root / "Train/melanoma/ISIC_0000006.jpg", m6, quality=92)
    (root / "Train/nevus/ISIC_0000009.jpg").write_bytes(jpeg_bytes(lesion_image(9, 96))[:500])  # truncated
    (root / "Test/melanoma").mkdir(parents=True)
    (root / "Test/melanoma/ISIC_0000003.jpg").write_bytes((root / "Train/nevus/ISIC_0000003.jpg").read_bytes())
    (root / "Test/melanoma/ISIC_0000200.jpg").write_bytes(jpeg_bytes(np.asarray(
        Image.fromarray(m6).resize((120, 120))), quality=60))
    save_image(root / "Test/melanoma/ISIC_0000201.jpg", t_lesion, quality=92)
    save_image(root / "Test/melanoma/ISIC_0000202.jpg", t_clean, quality=92)
    ham = tmp_path / "HAM10000_metadata.csv"
    ham.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"
                   "HAM_1,ISIC_0000201,mel,histo,50,male,back,x\n"
                   "HAM_1,ISIC_0000004,mel,histo,50,male,back,x\n"
                   "HAM_2,ISIC_0000002,mel,histo,50,male,back,x\n")
    isic2019 = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    isic2019.write_text("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
                        "ISIC_0000005,1,0,0,0,0,0,0,0,0\n"
                        "ISIC_0000100,0,0,0,0,0,0,0,0,1\n")
    return root, [ham, isic2019]


@pytest.fixture
def dirty_audit(dirty):
    root, truth_files = dirty
    index = discover_folder(root)
    return index, run_audit(index, load_ground_truth(truth_files), AuditConfig(workers=2))


def test_exact_duplicates_under_different_ids(dirty_audit):
    _, result = dirty_audit
    groups = {tuple(g["files"]): g for g in result.duplicate_groups}
    group = groups[("Train/melanoma/ISIC_0000100.jpg", "Train/melanoma/ISIC_0000101.jpg")]
    assert group["kind"] == "identical"


def test_label_conflict_for_one_picture_in_two_classes(dirty_audit):
    _, result = dirty_audit
    conflict = [c for c in result.label_conflicts if "ISIC_0000002" in c["image_ids"]]
    assert len(conflict) == 1
    assert conflict[0]["labels"] == ["melanoma", "nevus"]
    assert "Train/nevus/ISIC_0000002.jpg" in conflict[0]["files"]
    assert result.summary["image_ids_in_several_classes"] == 2  # ISIC_0000002 and ISIC_0000003 (Train nevus/Test mel)


def test_cross_split_leaks_with_each_reason(dirty_audit):
    _, result = dirty_audit
    reasons = {leak["file"]: leak["reason"] for leak in result.cross_split_leaks}
    assert reasons == {"Test/melanoma/ISIC_0000003.jpg": "identical",
                       "Test/melanoma/ISIC_0000200.jpg": "near-identical",
                       "Test/melanoma/ISIC_0000201.jpg": "same-lesion"}
    lesion_leak = next(leak for leak in result.cross_split_leaks if leak["reason"] == "same-lesion")
    assert lesion_leak["lesion_id"] == "HAM_1" and lesion_leak["train_files"] == ["Train/nevus/ISIC_0000004.jpg"]


def test_truth_disagreements_and_unlabelled_count(dirty_audit):
    _, result = dirty_audit
    found = {(d["file"], d["official_label"], d["source"]) for d in result.truth_disagreements}
    assert found == {("Train/nevus/ISIC_0000002.jpg", "melanoma", "HAM10000_metadata.csv"),
                     ("Train/nevus/ISIC_0000004.jpg", "melanoma", "HAM10000_metadata.csv"),
                     ("Train/nevus/ISIC_0000005.jpg", "melanoma", "ISIC_2019_Training_GroundTruth.csv")}
    # 13 files, 12 readable; labelled: 0002 (twice), 0004, 0005, 0201 (0100 is UNK) -> 7 without
    assert result.summary["images_without_official_label"] == 7


def test_one_unreadable_image_does_not_abort(dirty_audit):
    _, result = dirty_audit
    assert [u["file"] for u in result.unreadable] == ["Train/nevus/ISIC_0000009.jpg"]
    assert "truncated or corrupt" in result.unreadable[0]["error"]
    assert result.summary["images"] == 13


def test_clean_manifest_actions(dirty_audit):
    _, result = dirty_audit
    actions = {row["path"]: row["action"] for row in result.manifest}
    assert actions["Train/nevus/ISIC_0000003.jpg"] == "drop-train-copy-of-test"   # identical to a Test image
    assert actions["Train/melanoma/ISIC_0000006.jpg"] == "drop-train-copy-of-test"  # near copy of Test 0200
    assert actions["Train/melanoma/ISIC_0000002.jpg"] == "keep"                   # the copy truth confirms
    assert actions["Train/nevus/ISIC_0000004.jpg"] == "drop-train-copy-of-test"   # same lesion as Test 0201
    assert actions["Train/nevus/ISIC_0000002.jpg"] == "exclude-conflict"          # the copy truth contradicts
    assert actions["Train/nevus/ISIC_0000005.jpg"] == "relabel"
    assert actions["Train/nevus/ISIC_0000009.jpg"] == "exclude-unreadable"
    assert actions["Train/melanoma/ISIC_0000100.jpg"] == "keep"
    assert all(actions[f"Test/melanoma/ISIC_00002{i:02d}.jpg"] == "keep" for i in range(3))
    leaked = {row["path"] for row in result.manifest if row["leaked"]}
    assert leaked == {"Test/melanoma/ISIC_0000003.jpg", "Test/melanoma/ISIC_0000200.jpg",
                      "Test/melanoma/ISIC_0000201.jpg"}
    group = {row["path"]: row["group"] for row in result.manifest}
    assert group["Train/melanoma/ISIC_0000100.jpg"] == group["Train/melanoma/ISIC_0000101.jpg"]
    assert group["Test/melanoma/ISIC_0000201.jpg"] == group["Train/nevus/ISIC_0000004.jpg"]
    assert group["Test/melanoma/ISIC_0000202.jpg"] != group["Train/nevus/ISIC_0000005.jpg"]


def test_write_audit_outputs_the_contract(dirty_audit, tmp_path):
    index, result = dirty_audit
    written = write_audit(result, index, tmp_path / "out")
    payload = json.loads(written["json"].read_text())
    for key in ("classes", "counts", "duplicate_groups", "label_conflicts", "cross_split_leaks",
                "truth_disagreements", "unreadable"):
        assert isinstance(payload[key], list), key
    assert {"split": "Test", "class": "melanoma", "count": 4} in payload["counts"]
    rows = list(csv.DictReader(written["manifest"].open()))
    assert len(rows) == 13 and rows[0].keys() >= {"path", "split", "folder_label", "official_label", "lesion_id",
                                                   "action"}
    for name in ("class_counts.png", "samples.png", "leaks.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = written["markdown"].read_text()
    assert "Cross-split leaks (3)" in markdown and "![samples.png](samples.png)" in markdown
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_cli_audit_end_to_end(dirty, tmp_path, capsys):
    root, truth_files = dirty
    code = cli_main(["audit", str(root), "--truth", *map(str, truth_files), "--out", str(tmp_path / "cli")])
    assert code == 0
    out = capsys.readouterr().out
    assert "held-out images leaked:      3" in out
    assert (tmp_path / "cli" / "audit.json").is_file()


def test_cli_bad_manifest_stops_before_writing(tmp_path, capsys):
    save_image(tmp_path / "ISIC_0000001.jpg", lesion_image(1))
    (tmp_path / "m.csv").write_text("image,label\nISIC_0000001,not-a-class\n")
    code = cli_main(["audit", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "unknown label 'not-a-class'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_unknown_truth_file_is_refused(dirty, tmp_path, capsys):
    root, _ = dirty
    (tmp_path / "weird.csv").write_text("a,b\n1,2\n")
    code = cli_main(["audit", str(root), "--truth", str(tmp_path / "weird.csv"), "--out", str(tmp_path / "out")])
    assert code == 2 and "not a known ISIC truth file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_manifest_lesion_ids_drive_same_lesion_leaks(tmp_path):
    for split, name, seed in (("Train", "a.jpg", 1), ("Test", "b.jpg", 2), ("Train", "c.jpg", 3)):
        save_image(tmp_path / name, lesion_image(seed, 96))
    (tmp_path / "m.csv").write_text("image,label,lesion_id,split\na.jpg,melanoma,L1,Train\n"
                                    "b.jpg,melanoma,L1,Test\nc.jpg,nevus,L2,Train\n")
    from melanoma.data.sources import read_manifest

    result = run_audit(read_manifest(tmp_path / "m.csv"))
    assert [(leak["file"], leak["reason"]) for leak in result.cross_split_leaks] == [("b.jpg", "same-lesion")]
