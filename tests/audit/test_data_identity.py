"""Every record has one identity across the sources of a run, and training applies exactly the audit's decisions:
shared images between manifests, a folder with a manifest inside it, repeated rows, Test copies in two sources,
disputed official labels, file names that are not UTF-8, validation splits, symlinked paths and --image-root."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import lesion_image, save_image, tiny_dataset

from melanoma.audit.audit import AuditConfig, run_audit
from melanoma.audit.manifest import ACTION_EXCLUDE_DISPUTED, ACTION_KEEP, ACTION_RELABEL
from melanoma.audit.report import write_audit
from melanoma.cli.main import main as cli_main
from melanoma.core.errors import DataError
from melanoma.data.sources import load_dataset

TINY = dict(model="seed-cnn", epochs=1, batch_size=8, image_size=32, progress=False, threads=1, bootstrap=0)
KEPT = (ACTION_KEEP, ACTION_RELABEL)


def _manifest(path: Path, rows: list[dict], columns=("image", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _images(folder: Path, count: int, first_seed: int = 0, prefix: str = "img") -> list[str]:
    names = []
    for i in range(count):
        save_image(folder / f"{prefix}{i:03d}.jpg", lesion_image(first_seed + i, 40), quality=92)
        names.append(f"{prefix}{i:03d}.jpg")
    return names


def _audit_to(sources, out: Path, image_root=None) -> list[dict]:
    index = load_dataset(sources, image_root=image_root)
    result = run_audit(index, None, AuditConfig(workers=1))
    write_audit(result, index, out)
    return result.manifest


def _train(sources, out: Path, **overrides) -> Path:
    from melanoma.config import TrainConfig
    from melanoma.train.pipeline import train

    config = TrainConfig(data=[str(s) for s in sources], out=str(out), **(TINY | overrides))
    return Path(train(config, log=lambda *_: None))


def _split_rows(run: Path) -> list[dict]:
    with open(run / "split.csv", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return list(csv.DictReader(handle))


def _assert_trains_what_the_audit_keeps(manifest: list[dict], run: Path) -> None:
    kept = [row for row in manifest if row["action"] in KEPT and row["split"].lower() != "test"]
    rows = _split_rows(run)
    assert len(rows) == len(kept)
    kept, trained = sorted(row["key"] for row in kept), sorted(row["key"] for row in rows)
    assert trained == kept
    assert len(set(trained)) == len(trained)


# --- 1: one identity per record, the audit's decisions applied by it -----------------------------------------------


def test_two_manifests_sharing_images_train_what_the_audit_keeps(tmp_path):
    folder = tmp_path / "data"
    melanomas, nevi = _images(folder, 10, 0, "m"), _images(folder, 10, 100, "n")
    rows = [{"image": n, "label": "melanoma"} for n in melanomas] + [{"image": n, "label": "nevus"} for n in nevi]
    good = _manifest(folder / "good.csv", rows)
    half = _manifest(folder / "half.csv", rows[:5] + rows[10:15])
    manifest = _audit_to([good, half], tmp_path / "audit")
    assert sum(row["action"] in KEPT for row in manifest) == 20
    assert len(manifest) == 30
    run = _train([good, half], tmp_path / "run", audit=str(tmp_path / "audit"), val_fraction=0.3)
    _assert_trains_what_the_audit_keeps(manifest, run)


def test_a_folder_and_a_manifest_inside_it_train_what_the_audit_keeps(tmp_path):
    base = tmp_path / "base"
    melanomas, nevi = _images(base / "melanoma", 6, 0, "m"), _images(base / "nevus", 6, 100, "n")
    listed = _manifest(base / "list.csv", [{"image": f"melanoma/{n}", "label": "melanoma"} for n in melanomas[:3]]
                       + [{"image": f"nevus/{n}", "label": "nevus"} for n in nevi[:3]])
    manifest = _audit_to([base, listed], tmp_path / "audit")
    assert sum(row["action"] in KEPT for row in manifest) == 12
    run = _train([base, listed], tmp_path / "run", audit=str(tmp_path / "audit"), val_fraction=0.3)
    _assert_trains_what_the_audit_keeps(manifest, run)


def _archive(folder: Path, ids: dict[str, str], repeat: str) -> Path:
    """An ISIC Archive download whose metadata.csv lists ``repeat`` twice (the same row)."""
    diagnoses = {"melanoma": "Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma Invasive",
                 "nevus": "Benign,Benign melanocytic proliferations,Nevus"}
    lines = ["isic_id,diagnosis_1,diagnosis_2,diagnosis_3,image_type"]
    for seed, (isic_id, label) in enumerate(ids.items()):
        save_image(folder / f"{isic_id}.jpg", lesion_image(300 + seed, 40), quality=92)
        lines.append(f"{isic_id},{diagnoses[label]},dermoscopic")
        if isic_id == repeat:
            lines.append(lines[-1])
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_a_download_listing_one_id_twice_trains_it_once(tmp_path):
    ids = {f"ISIC_90000{i:02d}": ("melanoma" if i < 6 else "nevus") for i in range(12)}
    download = _archive(tmp_path / "download", ids, repeat="ISIC_9000003")
    index = load_dataset(download)
    assert len(index.records) == 12 and any("repeated identical row" in w for w in index.warnings)
    manifest = _audit_to([download], tmp_path / "audit")
    run = _train([download], tmp_path / "run", audit=str(tmp_path / "audit"), val_fraction=0.3)
    _assert_trains_what_the_audit_keeps(manifest, run)


# --- 2: one picture, one vote on Test ----------------------------------------------------------------------------


def test_a_test_picture_in_two_sources_is_scored_once(tmp_path):
    data = tiny_dataset(tmp_path / "a", per_class=6, test_per_class=2)
    mirror = tmp_path / "b"
    shutil.copytree(data / "Test", mirror / "Test")
    run = _train([data, mirror], tmp_path / "run", val_fraction=0.3)
    summary = json.loads((run / "data.json").read_text())
    assert summary["test"] == 6  # 3 classes x 2 pictures, each in both sources
    assert summary["test_dropped"] == {"drop-duplicate": 6}
    with open(run / "test_predictions.csv", newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 6
    # evaluate scores the same six pictures, once each, and says what it left out
    from melanoma.assess.evaluate import evaluate_run

    report = evaluate_run(str(run), resamples=0, out=str(tmp_path / "eval"), log=lambda *a: None)
    assert report["all"]["n"] == 6 and report["not_scored"] == {"drop-duplicate": 6}


# --- 5: many repeated rows ------------------------------------------------------------------------------------------


def test_an_audit_of_twenty_thousand_rows_over_twenty_files_works_on_the_files(tmp_path, monkeypatch):
    from melanoma.audit import copies as fingerprints

    folder = tmp_path / "data"
    names = _images(folder, 20)
    rows = [{"image": names[i % 20], "label": "melanoma" if (i // 20) % 2 == 0 else "nevus"} for i in range(20_000)]
    manifest = _manifest(folder / "many.csv", rows)
    decoded = []
    real = fingerprints.fingerprint
    monkeypatch.setattr(fingerprints, "fingerprint", lambda record, *a: decoded.append(record.path) or real(record, *a))
    index = load_dataset(manifest)
    result = run_audit(index, None, AuditConfig(workers=1))
    assert len(decoded) == 20 and len(index.records) == 40
    # one warning per repeated file and label, with its count, not one per row (the speed is benchmarked, not timed)
    assert len(index.warnings) <= 45 and any("repeated by 499 later row(s)" in w for w in index.warnings)
    assert result.summary["label_conflict_groups"] == 20


# --- 6: sources disagreeing on an official label ------------------------------------------------------------------


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_sources_disagreeing_on_an_official_label_exclude_the_picture_in_either_order(tmp_path, order):
    columns = ("image", "label", "official_label_source")
    sources = []
    for name, label, seed in (("a", "melanoma", 1), ("b", "nevus", 2)):
        save_image(tmp_path / name / "ISIC_0000001.jpg", lesion_image(seed, 40 + 20 * seed), quality=92)
        save_image(tmp_path / name / "ISIC_0000002.jpg", lesion_image(10 + seed, 40), quality=92)
        sources.append(_manifest(tmp_path / name / "m.csv", [
            {"image": "ISIC_0000001.jpg", "label": label, "official_label_source": f"{name} truth"},
            {"image": "ISIC_0000002.jpg", "label": "nevus"}], columns))
    index = load_dataset([sources[i] for i in order])
    result = run_audit(index, None, AuditConfig(workers=1))
    actions = {(row["source"], row["path"]): row["action"] for row in result.manifest}
    assert actions[("a/m.csv", "a/ISIC_0000001.jpg")] == ACTION_EXCLUDE_DISPUTED
    assert actions[("b/m.csv", "b/ISIC_0000001.jpg")] == ACTION_EXCLUDE_DISPUTED
    between = [d for d in result.truth_disagreements if d.get("kind") == "between sources"]
    assert len(between) == 2 and all("a/m.csv says melanoma; b/m.csv says nevus" in d["source"] for d in between)
    assert result.summary["truth_disagreements_between_sources"] == 2


# --- 7: file names that are not UTF-8 -----------------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_round_trips_through_audit_train_and_evaluate(tmp_path):
    data = tiny_dataset(tmp_path / "data", per_class=6, test_per_class=2)
    folder = os.fsencode(data / "Train" / "melanoma")
    try:
        target = os.path.join(folder, b"ISIC_\xff\xfe01.jpg")
        with open(target, "wb") as handle:
            handle.write((data / "Train" / "melanoma" / "ISIC_0000001.jpg").read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses a file name that is not UTF-8")
    manifest = _audit_to([data], tmp_path / "audit")
    run = _train([data], tmp_path / "run", audit=str(tmp_path / "audit"), val_fraction=0.3)
    _assert_trains_what_the_audit_keeps(manifest, run)
    run = _train([data], tmp_path / "run2", val_fraction=0.3)  # audits into RUN/audit, which evaluate reads
    assert cli_main(["evaluate", str(run), "--data", str(data), "--bootstrap", "0"]) == 0


# --- 8: split names -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["holdout", "tset"])
def test_an_unknown_split_name_is_refused_naming_the_accepted_ones(tmp_path, split):
    folder = tmp_path / "data"
    names = _images(folder, 2)
    manifest = _manifest(folder / "m.csv", [{"image": names[0], "label": "melanoma", "split": "train"},
                                            {"image": names[1], "label": "nevus", "split": split}],
                         ("image", "label", "split"))
    with pytest.raises(DataError, match=f"unknown split '{split}'.*accepted: Train, Test, Val") as caught:
        load_dataset(manifest)
    assert "\n" not in str(caught.value)


def test_a_val_folder_is_the_validation_set_and_unused_splits_are_counted(tmp_path):
    data = tiny_dataset(tmp_path / "data", per_class=6, test_per_class=2)
    for label, seed in (("melanoma", 7000), ("nevus", 7100), ("vascular lesion", 7200)):
        for i in range(2):
            save_image(data / "Val" / label / f"ISIC_{seed + i:07d}.jpg", lesion_image(seed + i, 40), quality=92)
    run = _train([data], tmp_path / "run", test_split="")
    summary = json.loads((run / "data.json").read_text())
    assert summary["val"] == 6 and summary["validation_given"] == 6
    assert all("/Val/" in f"/{row['path']}" for row in _split_rows(run) if row["role"] == "val")
    assert summary["not_used"] == {"Test": 6}


# --- 13: the same source through another path -------------------------------------------------------------------


def test_an_audit_made_through_a_symlink_serves_training_of_the_same_data(tmp_path):
    base = tiny_dataset(tmp_path / "data" / "base", per_class=6, test_per_class=2)
    other = tmp_path / "data" / "other"
    _images(other / "nevus", 3, 900, "ISIC_00099")
    alias = tmp_path / "data" / "alias"
    try:
        alias.symlink_to(base, target_is_directory=True)
    except OSError:
        pytest.skip("no symlinks here")
    manifest = _audit_to([alias, other], tmp_path / "audit")
    run = _train([base, other], tmp_path / "run", audit=str(tmp_path / "audit"), val_fraction=0.3)
    _assert_trains_what_the_audit_keeps(manifest, run)


def test_one_source_through_two_spellings_is_given_twice(tmp_path):
    base = tiny_dataset(tmp_path / "data" / "base", per_class=2, test_per_class=1)
    with pytest.raises(DataError, match="given twice"):
        load_dataset([base, base / ".." / "base"])


# --- 14: --image-root in train --------------------------------------------------------------------------------------


def test_a_manifest_audited_with_an_image_root_trains_with_it(tmp_path):
    from melanoma.cli.arguments import build_parser

    images = tmp_path / "images"
    melanomas, nevi = _images(images / "m", 6, 0, "m"), _images(images / "n", 6, 100, "n")
    manifest = _manifest(tmp_path / "lists" / "m.csv", [{"image": f"m/{n}", "label": "melanoma"} for n in melanomas]
                         + [{"image": f"n/{n}", "label": "nevus"} for n in nevi])
    audited = _audit_to([manifest], tmp_path / "audit", image_root=images)
    run = _train([manifest], tmp_path / "run", audit=str(tmp_path / "audit"), image_root=str(images),
                 val_fraction=0.3)
    _assert_trains_what_the_audit_keeps(audited, run)
    args = build_parser().parse_args(["train", "--data", str(manifest), "--image-root", str(images)])
    assert args.image_root == str(images)


# --- LOW: a re-used audit folder ------------------------------------------------------------------------------------


def test_a_reused_audit_folder_loses_the_previous_leak_figure(tmp_path):
    leaky = tiny_dataset(tmp_path / "leaky", per_class=2, test_per_class=1)  # has a Test image copied into Train
    out = tmp_path / "audit"
    _audit_to([leaky], out)
    assert (out / "leaks.png").is_file()
    (leaky / "Train" / "nevus" / "ISIC_0000500.jpg").unlink()
    _audit_to([leaky], out)
    assert not (out / "leaks.png").exists()
    assert "leaks.png" not in (out / "audit.md").read_text()
