"""Metrics per subgroup: the groupings, the metadata join (sources, --metadata, unknown ids), the tables in
metrics.json, report.html and `melanoma evaluate`, and bad --metadata files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, lesion_image, save_image, train_tiny_run

from melanoma.assess.evaluate import evaluate_run
from melanoma.assess.intervals import bootstrap_ci
from melanoma.assess.metrics import compute_metrics
from melanoma.assess.subgroups import UNKNOWN, age_band, fitzpatrick_band, image_groups, subgroup_metrics
from melanoma.cli.main import main as cli_main
from melanoma.core.errors import DataError
from melanoma.data.metadata import check_metadata_files, load_metadata
from melanoma.data.sources import load_dataset

METRIC_NAMES = ("balanced_accuracy", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def _write_metadata(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _tiny_metadata(path: Path) -> Path:
    """Age, sex and site for the tiny dataset's first images of each class (train and Test), plus two ids it lacks."""
    rows = []
    for index in range(len(CLASSES)):
        for i in (0, 1, 2, 3, 500, 501):
            rows.append({"image_id": f"ISIC_{1000 * index + i:07d}", "age_approx": str(25 + 10 * i % 60),
                         "sex": "female" if i % 2 else "male", "anatom_site_general": "posterior torso"})
    rows += [{"image_id": "ISIC_9999990", "age_approx": "40", "sex": "male", "anatom_site_general": "palms/soles"},
             {"image_id": "ISIC_9999991", "age_approx": "", "sex": "", "anatom_site_general": ""}]
    return _write_metadata(path, rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("subgroups")
    metadata = _tiny_metadata(root / "metadata.csv")
    data, run = train_tiny_run(root, per_class=10, test_per_class=3, bootstrap=20, metadata=[str(metadata)])
    return data, run, metadata


def test_age_and_skin_type_bands():
    assert [age_band(v) for v in ("0", "29.9", "30", "49", "50", "69", "70", "95")] == \
        ["<30", "<30", "30-49", "30-49", "50-69", "50-69", ">=70", ">=70"]
    assert [age_band(v) for v in ("", "abc", "-5", "200")] == [UNKNOWN] * 4
    assert [fitzpatrick_band(v) for v in ("I", "ii", "III", "4", "Type V", "VI")] == \
        ["I-II", "I-II", "III-IV", "III-IV", "V-VI", "V-VI"]
    assert fitzpatrick_band("VII") == fitzpatrick_band("") == UNKNOWN


def test_metadata_joins_every_source_by_image_id(tmp_path):
    archive = tmp_path / "archive"
    for i in range(3):
        save_image(archive / f"ISIC_00{i}0000.jpg", lesion_image(i, 16))
    _write_metadata(archive / "metadata.csv", [
        {"isic_id": f"ISIC_00{i}0000", "diagnosis_1": "Malignant", "diagnosis_3": "Melanoma, NOS",
         "image_type": "dermoscopic", "age_approx": str(20 + 30 * i), "sex": "female",
         "anatom_site_1": "Head and neck", "fitzpatrick_skin_type": ["I", "IV", ""][i],
         "diagnosis_confirm_type": "histopathology", "attribution": "Clinic A"} for i in range(3)])
    truth = _write_metadata(tmp_path / "ham.csv", [
        {"lesion_id": "HAM_1", "image_id": "ISIC_0010000", "dx": "mel", "dx_type": "follow_up", "age": "80",
         "sex": "male", "localization": "back", "dataset": "rosendahl"}])
    extra = _write_metadata(tmp_path / "extra.csv", [{"isic_id": "ISIC_0020000", "sex": "male"},
                                                     {"isic_id": "ISIC_7777777", "sex": "female"}])
    index = load_dataset(archive)
    metadata = load_metadata(index, truth=[truth], extra=[extra])
    assert metadata.of("ISIC_0000000")["fitzpatrick"] == "I"
    # the truth file gives ISIC_0010000 its age; the archive's later metadata.csv overrides it; --metadata comes last
    assert metadata.of("ISIC_0010000")["age"] == "50" and metadata.of("ISIC_0020000")["sex"] == "male"
    assert metadata.read_from[-1]["unknown_ids"] == 1
    assert metadata.read_from[-1]["unknown_examples"] == ["ISIC_7777777"]
    groups = image_groups([r.rel_path for r in index.records], [r.source for r in index.records], metadata)
    assert groups["age band"] == ["<30", "50-69", ">=70"]
    assert groups["Fitzpatrick type"] == ["I-II", "III-IV", UNKNOWN]
    assert groups["anatomic site"] == ["head/neck"] * 3
    assert groups["diagnosis confirmation"] == ["histopathology"] * 3
    assert groups["data source"] == ["archive"] * 3


def test_subgroup_metrics_use_the_one_evaluation_path_and_mark_small_groups():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 40)
    probs = 0.6 * rng.dirichlet(np.ones(3), 120) + 0.4 * np.eye(3)[labels]
    group = np.where(np.arange(120) % 4 == 0, "a", "b").tolist()
    group[5] = UNKNOWN
    table = subgroup_metrics(labels, probs, list(CLASSES), 0.4, {"sex": group}, resamples=50, seed=3)["sex"]
    assert [g["group"] for g in table["groups"]] == ["b", "a", UNKNOWN] and table["recorded"] == 119
    big = table["groups"][0]
    mask = np.asarray(group) == "b"
    expected = compute_metrics(labels[mask], probs[mask], list(CLASSES), 0.4)
    assert big["n"] == mask.sum() and big["melanomas"] == int((labels[mask] == 0).sum()) and not big["too_small"]
    assert big["balanced_accuracy"]["value"] == expected["balanced_accuracy"]
    assert big["melanoma_auc"]["value"] == expected["melanoma"]["auc"]
    ci = bootstrap_ci(labels[mask], probs[mask], list(CLASSES), 0.4, resamples=50, seed=3)
    assert big["melanoma_auc"]["low"] == ci["melanoma_auc"]["low"] and big["melanoma_auc"]["high"] is not None
    assert table["groups"][1]["too_small"] is False and table["groups"][1]["n"] == 30
    assert table["groups"][2] == table["groups"][2] | {"n": 1, "too_small": True}
    assert subgroup_metrics(labels, probs, list(CLASSES), 0.4, {"sex": [UNKNOWN] * 120}, 0)["sex"]["groups"] == []


def test_training_writes_subgroup_tables(trained):
    _, run, _ = trained
    section = json.loads((run / "metrics.json").read_text())["subgroups"]
    assert section["min_images"] == 30 and section["min_melanomas"] == 5 and section["resamples"] == 20
    extra = [entry for entry in section["metadata"] if entry["kind"] == "--metadata CSV"]
    assert extra[0]["unknown_ids"] == 2
    for split in ("validation", "test"):
        table = section[split]
        assert set(table) >= {"age band", "sex", "anatomic site", "data source", "acquisition era"}
        assert table["Fitzpatrick type"] == {"recorded": 0, "groups": []}
        names = [g["group"] for g in table["sex"]["groups"]]
        assert UNKNOWN in names and names[-1] == UNKNOWN
        for group in (g for part in table.values() for g in part["groups"]):
            assert group["n"] > 0 and group["too_small"]  # a tiny run: every group is too small to read
            assert all(set(group[m]) == {"value", "low", "high"} for m in METRIC_NAMES)
        assert sum(g["n"] for g in table["sex"]["groups"]) == sum(g["n"] for g in table["data source"]["groups"])
        assert any(g["balanced_accuracy"]["low"] is not None for g in table["sex"]["groups"])
    test_sex = {g["group"]: g["n"] for g in section["test"]["sex"]["groups"]}
    assert test_sex == {"male": 3, "female": 3, UNKNOWN: 3}  # ids 500 and 501 of each class are recorded


def test_report_and_evaluate_show_the_subgroup_table(trained, tmp_path):
    data, run, metadata = trained
    page = (run / "report.html").read_text()
    assert "Per subgroup" in page and "<th scope='row'>age band</th>" in page and "too small to read" in page
    assert f"<th scope='row'>{UNKNOWN}</th>" in page and "not recorded for any image" in page
    lines: list[str] = []
    report = evaluate_run(str(run), out=str(tmp_path / "ev"), resamples=20, log=lines.append,
                          metadata=[str(metadata)])
    table = report["subgroups"]["test"]
    assert {g["group"]: g["n"] for g in table["sex"]["groups"]} == {"male": 3, "female": 3, UNKNOWN: 3}
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["subgroups"]["test"]["sex"] == table["sex"]
    text = "\n".join(lines)
    assert "per subgroup (test" in text and "too small to read" in text
    assert any("not in the data" in line and "2 image id(s)" in line for line in lines)


def test_bad_metadata_is_one_line_naming_the_file(trained, tmp_path, capsys):
    data, run, _ = trained
    no_id = _write_metadata(tmp_path / "no_id.csv", [{"age": "40", "sex": "male"}])
    with pytest.raises(DataError, match=r"no_id\.csv: --metadata CSV has no image id column"):
        check_metadata_files([no_id])
    assert cli_main(["evaluate", str(run), "--metadata", str(no_id), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_id.csv" in err and "image id column" in err
    assert not (tmp_path / "ev").exists()
    missing = tmp_path / "missing.csv"
    assert cli_main(["train", "--data", str(data), "--model", "seed-cnn", "--epochs", "1", "--metadata",
                     str(missing), "--out", str(tmp_path / "run")]) == 2
    assert "missing.csv: --metadata file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_acquisition_eras_keep_their_historical_order_whatever_their_counts():
    """The eras read in time order (melanoma.data.records.ERAS), not by size: the package move once made this order
    silently empty, and the metrics diff of the README main job caught it."""
    from melanoma.assess.subgroups import ordered_groups
    from melanoma.data.records import ERAS

    per_image = np.array(["later"] * 2 + ["HAM10000"] * 9 + ["2016-17 archive"] * 4 + ["unknown"])
    assert ordered_groups("acquisition era", per_image) == [*ERAS, "unknown"]
