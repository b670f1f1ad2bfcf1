"""Several data sources in one audit and one run: folders, manifests and ISIC Archive downloads, copies counted once,
leaks across sources dropped, repeated ids as findings, unusable rows named."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import lesion_image, save_image
from PIL import Image

from melanoma.audit.audit import run_audit
from melanoma.audit.manifest import ACTION_DROP_DUPLICATE, ACTION_DROP_TRAIN_COPY, ACTION_KEEP
from melanoma.cli.main import main as cli_main
from melanoma.core.errors import DataError
from melanoma.data.archive import archive_class, archive_diagnosis_table
from melanoma.data.sources import load_dataset, read_archive_download

ARCHIVE_HEADER = ("isic_id,attribution,copyright_license,diagnosis_1,diagnosis_2,diagnosis_3,diagnosis_4,image_type,"
                  "lesion_id\n")


def _write_manifest(path: Path, rows: list[dict], columns=("image", "label", "lesion_id", "split",
                                                            "official_label_source")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _wide(pixels: np.ndarray, size=(200, 150)) -> np.ndarray:
    """The same picture at another size and aspect, as isic-extra keeps HAM10000 images."""
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))


@pytest.fixture
def two_sources(tmp_path):
    """A course-like folder (Train/Test, 96x96) and a manifest source (200x150) sharing pictures."""
    course = tmp_path / "course"
    pictures = {seed: lesion_image(seed, 96) for seed in range(1, 12)}
    save_image(course / "Train/nevus/ISIC_0000001.jpg", pictures[1], quality=92)        # also in extra, same id
    save_image(course / "Train/nevus/ISIC_0000002.jpg", pictures[2], quality=92)        # pixel copy, other id
    save_image(course / "Train/melanoma/ISIC_0000003.jpg", pictures[3], quality=92)     # near copy, other id
    save_image(course / "Train/melanoma/ISIC_0000004.jpg", pictures[4], quality=92)     # label differs in extra
    save_image(course / "Train/melanoma/ISIC_0000005.jpg", pictures[5], quality=92)
    save_image(course / "Train/nevus/ISIC_0000006.jpg", pictures[6], quality=92)
    save_image(course / "Test/melanoma/ISIC_0000007.jpg", pictures[7], quality=92)      # its lesion in extra
    save_image(course / "Test/nevus/ISIC_0000008.jpg", pictures[8], quality=92)
    extra = tmp_path / "extra"
    save_image(extra / "images/ISIC_0000001.jpg", _wide(pictures[1]), quality=95)
    shutil.copy(course / "Train/nevus/ISIC_0000002.jpg", extra / "images/ISIC_0020002.jpg")
    save_image(extra / "images/ISIC_0020003.jpg", _wide(pictures[3], (110, 110)), quality=80)
    save_image(extra / "images/ISIC_0000004.jpg", _wide(pictures[4]), quality=95)
    save_image(extra / "images/ISIC_0020009.jpg", pictures[9], quality=92)               # another photo of 7's lesion
    save_image(extra / "images/ISIC_0020010.jpg", pictures[10], quality=92)
    official = "ISIC_2019_Training_GroundTruth.csv"
    manifest = _write_manifest(extra / "manifest.csv", [
        {"image": "images/ISIC_0000001.jpg", "label": "nevus", "official_label_source": official},
        {"image": "images/ISIC_0020002.jpg", "label": "nevus", "official_label_source": official},
        {"image": "images/ISIC_0020003.jpg", "label": "melanoma", "official_label_source": official},
        {"image": "images/ISIC_0000004.jpg", "label": "nevus", "official_label_source": official},
        {"image": "images/ISIC_0020009.jpg", "label": "melanoma", "lesion_id": "HAM_0000007"},
        {"image": "images/ISIC_0020010.jpg", "label": "melanoma", "lesion_id": "HAM_0000010"},
    ])
    truth = tmp_path / "HAM10000_metadata.csv"
    truth.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n"
                     "HAM_0000007,ISIC_0000007,mel,histo,50,male,back\n")
    return course, manifest, truth


def _rows(result) -> dict[str, dict]:
    return {row["path"]: row for row in result.manifest}


def _audit(course, manifest, truth=None):
    from melanoma.data.truth import load_ground_truth

    index = load_dataset([course, manifest])
    return index, run_audit(index, load_ground_truth([truth]) if truth else None)


def test_several_sources_keep_their_names_and_unique_paths(two_sources):
    course, manifest, _ = two_sources
    index = load_dataset([course, manifest])
    assert [s["name"] for s in index.sources] == ["course", "extra/manifest.csv"]
    assert {r.source for r in index.records} == {"course", "extra/manifest.csv"}
    assert len({r.rel_path for r in index.records}) == len(index.records)
    assert all((index.root / r.rel_path).is_file() for r in index.records)


def test_the_same_id_in_two_sources_trains_once_and_the_larger_copy_is_kept(two_sources):
    index, result = _audit(*two_sources)
    rows = _rows(result)
    kept, dropped = rows["extra/images/ISIC_0000001.jpg"], rows["course/Train/nevus/ISIC_0000001.jpg"]
    assert kept["action"] == ACTION_KEEP  # 200x150 = 30,000 pixels against 96x96 = 9,216
    assert dropped["action"] == ACTION_DROP_DUPLICATE
    assert "extra/images/ISIC_0000001.jpg" in dropped["reason"] and "larger image, 200x150" in dropped["reason"]


@pytest.mark.parametrize("course_file, extra_file", [
    ("course/Train/nevus/ISIC_0000002.jpg", "extra/images/ISIC_0020002.jpg"),      # identical bytes, other id
    ("course/Train/melanoma/ISIC_0000003.jpg", "extra/images/ISIC_0020003.jpg"),   # resized, re-encoded, other id
])
def test_a_copy_under_another_id_counts_once(two_sources, course_file, extra_file):
    _, result = _audit(*two_sources)
    rows = _rows(result)
    actions = sorted(rows[f]["action"] for f in (course_file, extra_file))
    assert actions == [ACTION_DROP_DUPLICATE, ACTION_KEEP]
    assert result.summary["across_sources"]["duplicates_dropped"] >= 3


def test_when_labels_differ_the_official_label_wins(two_sources):
    _, result = _audit(*two_sources)
    rows = _rows(result)
    assert rows["extra/images/ISIC_0000004.jpg"]["action"] == ACTION_KEEP
    course = rows["course/Train/melanoma/ISIC_0000004.jpg"]
    assert course["action"] != ACTION_KEEP  # contradicted by the manifest's official label: never trained on
    assert any(set(c["sources"]) == {"course", "extra/manifest.csv"} for c in result.label_conflicts)


def test_a_leak_into_test_through_a_manifest_lesion_id_is_dropped(two_sources):
    _, result = _audit(*two_sources)
    rows = _rows(result)
    assert rows["extra/images/ISIC_0020009.jpg"]["action"] == ACTION_DROP_TRAIN_COPY
    assert rows["course/Test/melanoma/ISIC_0000007.jpg"]["leaked"] == 1
    leak = next(leak for leak in result.cross_split_leaks if leak["image_id"] == "ISIC_0000007")
    assert leak["reason"] == "same-lesion" and leak["train_sources"] == ["extra/manifest.csv"]
    assert result.summary["across_sources"]["leaked_heldout_images"] == 1


def test_a_manifest_official_label_counts_as_official(two_sources):
    _, result = _audit(*two_sources)
    row = _rows(result)["course/Train/melanoma/ISIC_0000004.jpg"]
    assert row["official_label"] == "nevus" and row["official_source"] == "extra/manifest.csv"
    assert result.summary["across_sources"]["truth_disagreements"] == 1


def test_a_folder_and_its_manifest_give_the_same_audit(tmp_path, two_sources):
    course, _, _ = two_sources
    shutil.copy(course / "Train/nevus/ISIC_0000001.jpg", course / "Train/melanoma/ISIC_0000001.jpg")  # 2 classes
    rows = [{"image": p.relative_to(course).as_posix(), "label": p.parent.name, "split": p.parent.parent.name}
            for p in sorted(course.rglob("*.jpg"))]
    manifest = _write_manifest(course / "all.csv", rows, columns=("image", "label", "split"))
    from_folder, from_manifest = run_audit(load_dataset(course)), run_audit(load_dataset(manifest))
    assert from_folder.summary | {"sources": None} == from_manifest.summary | {"sources": None}
    assert [(r["path"], r["action"]) for r in from_folder.manifest] == \
        [(r["path"], r["action"]) for r in from_manifest.manifest]
    assert from_manifest.summary["image_ids_in_several_classes"] == 1


def test_a_repeated_id_under_two_labels_is_a_conflict_not_a_crash(tmp_path):
    save_image(tmp_path / "ISIC_0000001.jpg", lesion_image(1))
    save_image(tmp_path / "ISIC_0000002.jpg", lesion_image(2))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label\nISIC_0000001.jpg,melanoma\nISIC_0000001.jpg,nevus\nISIC_0000002.jpg,nevus\n"
                        "ISIC_0000002.jpg,nevus\n")
    index = load_dataset(manifest)
    assert len(index.records) == 3 and any("row 4 (" in w and "repeated by 1 later row" in w for w in index.warnings)
    result = run_audit(index)
    assert len(result.label_conflicts) == 1 and result.label_conflicts[0]["labels"] == ["melanoma", "nevus"]


def test_a_manifest_with_a_bom_reads(tmp_path):
    save_image(tmp_path / "ISIC_0000001.jpg", lesion_image(1))
    (tmp_path / "m.csv").write_bytes("\ufeffimage,label\nISIC_0000001.jpg,nevus\n".encode("utf-8"))
    assert [r.label for r in load_dataset(tmp_path / "m.csv").records] == ["nevus"]


def test_a_missing_file_names_its_row_and_nothing_is_written(tmp_path, two_sources, capsys):
    course, manifest, _ = two_sources
    with open(manifest, "a", encoding="utf-8") as handle:
        handle.write("images/ISIC_0099999.jpg,melanoma,,,\n")
    out = tmp_path / "audit-out"
    assert cli_main(["audit", str(course), str(manifest), "--out", str(out)]) == 2
    assert "row 8 (images/ISIC_0099999.jpg): file not found" in capsys.readouterr().err
    assert not out.exists()


def test_the_same_source_given_twice_is_refused(two_sources):
    course, _, _ = two_sources
    with pytest.raises(DataError, match="given twice"):
        load_dataset([course, course])


# --- ISIC Archive downloads -----------------------------------------------------------------------------------


def _archive(folder: Path, keep: tuple[int, ...] = (1, 2, 3, 4, 5, 6)) -> Path:
    rows = [
        "ISIC_9000001,Hospital A,CC-BY-NC,Malignant,Malignant melanocytic proliferations (Melanoma),"
        "Melanoma Invasive,\"Melanoma Invasive, Superficial spreading\",dermoscopic,IL_0000001",
        "ISIC_9000002,Hospital A,CC-BY-NC,Benign,Benign melanocytic proliferations,Nevus,\"Nevus, NOS, Compound\","
        "dermoscopic,IL_0000002",
        "ISIC_9000003,Clinic B,CC-BY,Benign,Benign epidermal proliferations,Solar lentigo,,dermoscopic,",
        "ISIC_9000004,Clinic B,CC-BY,Indeterminate,Indeterminate melanocytic proliferations,"
        "Atypical intraepithelial melanocytic proliferation,,dermoscopic,",
        "ISIC_9000005,Clinic B,CC-BY,Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma in situ,,"
        "clinical: close-up,IL_0000005",
        "ISIC_9000006,Anonymous,CC-0,Benign,Benign soft tissue proliferations - Vascular,Hemangioma,"
        "\"Hemangioma, Cherry\",dermoscopic,",
    ]
    folder.mkdir(parents=True)
    rows = [row for number, row in enumerate(rows, start=1) if number in keep]
    (folder / "metadata.csv").write_text(ARCHIVE_HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    for number in keep:
        save_image(folder / f"ISIC_900000{number}.jpg", lesion_image(100 + number, 64))
    (folder / "attribution.txt").write_text("Hospital A\n\nClinic B\n\nAnonymous")
    (folder / "licenses").mkdir()
    for licence in ("CC-0", "CC-BY", "CC-BY-NC"):
        (folder / "licenses" / f"{licence}.txt").write_text(f"{licence} licence text")
    return folder


def test_an_isic_archive_download_is_a_source_as_it_is(tmp_path):
    index = read_archive_download(_archive(tmp_path / "download"))
    assert {r.image_id: r.label for r in index.records} == {
        "ISIC_9000001": "melanoma", "ISIC_9000002": "nevus", "ISIC_9000003": "pigmented benign keratosis",
        "ISIC_9000006": "vascular lesion"}
    assert {r.image_id: r.lesion_id for r in index.records}["ISIC_9000001"] == "IL_0000001"
    source = index.sources[0]
    assert source["kind"] == "isic-archive" and source["rows"] == 6
    assert source["skipped"] == {
        "diagnosis outside the nine classes (atypical intraepithelial melanocytic proliferation)": 1,
        "not dermoscopic (clinical: close-up)": 1}
    assert "Clinic B" in source["attribution"] and source["licenses"] == {"CC-0": 1, "CC-BY": 3, "CC-BY-NC": 2}
    assert all(r.official_source for r in index.records)


def test_the_archive_table_covers_the_legacy_flat_diagnosis_too():
    table = archive_diagnosis_table()
    assert set(table.values()) - {""} <= {"actinic keratosis", "basal cell carcinoma", "dermatofibroma", "melanoma",
                                          "nevus", "pigmented benign keratosis", "seborrheic keratosis",
                                          "squamous cell carcinoma", "vascular lesion"}
    assert archive_class({"diagnosis": "angioma"}, table) == ("vascular lesion", "angioma")
    assert archive_class({"diagnosis_1": "Benign", "diagnosis_3": "A term from a future taxonomy",
                          "diagnosis_2": "Benign melanocytic proliferations"}, table)[0] is None
    assert archive_class({"diagnosis_1": "Malignant", "diagnosis_2": "Malignant melanocytic proliferations "
                          "(Melanoma)", "diagnosis_3": "A newer melanoma subtype"}, table)[0] == "melanoma"


def test_a_download_row_without_its_image_names_the_row(tmp_path):
    folder = _archive(tmp_path / "download")
    (folder / "ISIC_9000002.jpg").unlink()
    with pytest.raises(DataError, match=r"row 3 \(ISIC_9000002\): image file not found"):
        read_archive_download(folder)


def test_the_audit_command_prints_what_each_source_skipped(tmp_path, two_sources, capsys):
    course, manifest, _ = two_sources
    download = _archive(tmp_path / "download")
    assert cli_main(["audit", str(course), str(manifest), str(download), "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "download (isic-archive): 4 images; skipped 1 diagnosis outside the nine classes" in printed
    assert "across sources:" in printed
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert [s["name"] for s in audit["sources"]] == ["course", "extra/manifest.csv", "download"]


def test_a_run_records_every_source_and_carries_the_attribution(tmp_path, two_sources):
    from melanoma.config import TrainConfig
    from melanoma.train.pipeline import train

    course, manifest, _ = two_sources
    download = _archive(tmp_path / "download", keep=(1, 2, 4, 5))  # melanoma, nevus and two skipped rows
    config = TrainConfig(data=[str(course), str(manifest), str(download)], out=str(tmp_path / "run"),
                         model="seed-cnn", epochs=1, batch_size=8, image_size=32, progress=False, threads=1,
                         bootstrap=0, val_fraction=0.3)
    run = train(config, log=lambda *_: None)
    recorded = json.loads((run / "config.json").read_text())["config"]["data"]
    assert recorded == [str(p.resolve()) for p in (course, manifest, download)]
    data = json.loads((run / "data.json").read_text())
    assert [s["name"] for s in data["sources"]] == ["course", "extra/manifest.csv", "download"]
    assert sum(s["train"] + s["val"] for s in data["sources"]) == data["train"] + data["val"]
    split = list(csv.DictReader((run / "split.csv").open()))
    assert {row["source"] for row in split} <= {"course", "extra/manifest.csv", "download"}
    assert "Clinic B" in (run / "report.html").read_text()
