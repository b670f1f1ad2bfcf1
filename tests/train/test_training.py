"""Training end to end on a tiny synthetic dataset: run folder, cleaning, leak-free expansion, determinism, resume,
and every bad input the issue names."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CLASSES, REPO, lesion_image, save_image, tiny_dataset

from melanoma.cli.main import main as cli_main
from melanoma.config import TrainConfig
from melanoma.core.errors import DataError, RunError
from melanoma.runs.checkpoint import load_checkpoint, model_from_checkpoint
from melanoma.train.pipeline import train
from melanoma.train.prepare import prepare_data, train_image_names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


def _config(data: Path, out: Path, **overrides) -> TrainConfig:
    base = TrainConfig(data=str(data), out=str(out), model="seed-cnn", epochs=2, batch_size=8, image_size=32,
                       progress=False, preset="seed", threads=1)
    return replace(base, **overrides)


def test_run_folder_is_self_contained(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny.parent)
    run = train(_config(Path(tiny.name), tmp_path / "run"), log=lambda *_: None)
    for name in ("config.json", "data.json", "split.csv", "history.csv", "metrics.json", "curves.png",
                 "test_predictions.csv", "checkpoints/best.pt", "checkpoints/last.ckpt", "audit/audit.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == list(CLASSES) and config["config"]["seed"] == 42
    assert config["config"]["data"] == [str(tiny.resolve())]  # given relative, recorded absolute
    assert config["model"]["name"] == "seed-cnn" and config["preprocessing"]["image_size"] == 32
    assert {"torch", "timm", "lightning"} <= set(config["environment"])
    history = list(csv.DictReader((run / "history.csv").open()))
    assert [row["epoch"] for row in history] == ["1", "2"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["all"]["n"] == 9 and metrics["test"]["clean"]["n"] == 8  # one Test image leaked
    payload = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert payload["classes"] == list(CLASSES)
    torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def test_cleaning_drops_the_train_copy_of_a_test_image(tiny, tmp_path):
    data = prepare_data(_config(tiny, tmp_path / "unused"), log=lambda *_: None)
    assert data.summary["dropped"] == {"drop-train-copy-of-test": 1}
    assert "Train/nevus/ISIC_0000500.jpg" not in {row["path"] for row in data.split_rows}
    dirty = prepare_data(_config(tiny, tmp_path / "unused", clean=False), log=lambda *_: None)
    assert "Train/nevus/ISIC_0000500.jpg" in {row["path"] for row in dirty.split_rows}


def test_no_expanded_copy_of_a_validation_image_reaches_training(tiny, tmp_path):
    data = prepare_data(_config(tiny, tmp_path / "unused", balance="expand:20"), log=lambda *_: None)
    assert data.summary["expanded_copies"] == 60
    val_paths = {row["path"] for row in data.split_rows if row["role"] == "val"}
    generated_from = {data.pool_names[s] for s in data.train_sources if s >= 0}
    assert generated_from and not generated_from & val_paths
    assert np.bincount(data.train_labels[data.train_sources >= 0]).tolist() == [20, 20, 20]


def test_leaky_protocol_trains_on_copies_of_validation_images(tiny, tmp_path):
    """The course notebook's bug, reproduced on purpose: expanded copies of validation images land in training."""
    data = prepare_data(_config(tiny, tmp_path / "unused", balance="expand:20", protocol="leaky", clean=False),
                        log=lambda *_: None)
    val_paths = {row["path"] for row in data.split_rows if row["role"] == "val" and "(expanded" not in row["path"]}
    train_copies = {row["path"].replace(" (expanded copy)", "") for row in data.split_rows
                    if row["role"] == "train" and "(expanded" in row["path"]}
    assert train_copies & val_paths


def test_same_seed_same_metrics(tiny, tmp_path):
    first = train(_config(tiny, tmp_path / "a"), log=lambda *_: None)
    second = train(_config(tiny, tmp_path / "b"), log=lambda *_: None)
    def read(run):
        return [(r["train_loss"], r["val_loss"]) for r in csv.DictReader((run / "history.csv").open())]

    assert read(first) == read(second)
    assert json.loads((first / "metrics.json").read_text())["test"] == \
        json.loads((second / "metrics.json").read_text())["test"]


def test_balancing_modes_train(tiny, tmp_path):
    for balance in ("weights", "sampler"):
        run = train(_config(tiny, tmp_path / balance, balance=balance, epochs=1), log=lambda *_: None)
        assert (run / "metrics.json").is_file()


_KILLER = """
import os, signal, sys
from dataclasses import replace
import melanoma.train.loop as loop
import melanoma.train.pipeline as training
calls = {"n": 0}
original = loop.ArrayDataset.__getitem__
def getitem(self, index):
    if self.transform is not None:
        calls["n"] += 1
        if calls["n"] > %(limit)d:
            os.kill(os.getpid(), signal.SIGKILL)
    return original(self, index)
loop.ArrayDataset.__getitem__ = getitem
training.train(loop.TrainConfig(data=%(data)r, out=%(out)r, model="seed-cnn", epochs=3, batch_size=8, image_size=32,
                                    progress=False, preset="seed", threads=1), log=lambda *_: None)
"""


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny, tmp_path):
    reference = train(_config(tiny, tmp_path / "whole", epochs=3), log=lambda *_: None)
    per_epoch = sum(1 for row in csv.DictReader((reference / "split.csv").open()) if row["role"] == "train")
    killed = tmp_path / "killed"
    script = _KILLER % {"limit": per_epoch + 5, "data": str(tiny), "out": str(killed)}  # dies inside epoch 2
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert len(list(csv.DictReader((killed / "history.csv").open()))) == 1
    with pytest.raises(RunError, match="already exists"):
        train(_config(tiny, killed, epochs=3), log=lambda *_: None)
    train(_config(tiny, killed, epochs=3, resume=True), log=lambda *_: None)
    def read(run):
        return [(r["epoch"], r["train_loss"], r["val_loss"]) for r in csv.DictReader((run / "history.csv").open())]

    assert read(killed) == read(reference)


def test_resume_needs_neither_data_nor_epochs_and_keeps_the_runs_own(tiny, tmp_path, capsys):
    run = train(_config(tiny, tmp_path / "run", epochs=1), log=lambda *_: None)  # the seed recipe would say 20
    code = cli_main(["train", "--out", str(run), "--resume", "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert len(list(csv.DictReader((run / "history.csv").open()))) == 1
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 1
    fresh = tmp_path / "fresh"
    assert cli_main(["train", "--out", str(fresh)]) == 2
    assert "--data is required" in capsys.readouterr().err and not fresh.exists()


def test_existing_folder_is_refused_then_overwritten(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(RunError, match="already exists; pass --overwrite"):
        train(_config(tiny, out), log=lambda *_: None)
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(RunError, match="not a run folder"):  # --overwrite replaces only a run folder (issue 23)
        train(_config(tiny, out, epochs=1, overwrite=True), log=lambda *_: None)
    (out / "keep.txt").unlink()
    train(_config(tiny, out, epochs=1, overwrite=True), log=lambda *_: None)  # an empty folder
    (out / "keep.txt").write_text("left in a run folder")
    train(_config(tiny, out, epochs=1, overwrite=True), log=lambda *_: None)  # a run folder
    assert not (out / "keep.txt").exists() and (out / "metrics.json").is_file()


def test_corrupt_checkpoint_on_resume_changes_nothing(tiny, tmp_path):
    run = train(_config(tiny, tmp_path / "run", epochs=1), log=lambda *_: None)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match="corrupt or truncated"):
        train(_config(tiny, run, epochs=2, resume=True), log=lambda *_: None)
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_checkpoint_from_another_architecture_is_refused(tiny, tmp_path):
    run = train(_config(tiny, tmp_path / "run", epochs=1), log=lambda *_: None)
    payload = load_checkpoint(run / "checkpoints" / "best.pt")
    payload["spec"]["name"] = "seed-cnn-aug"
    with pytest.raises(RunError, match="do not fit model 'seed-cnn-aug'"):
        model_from_checkpoint(payload)
    with pytest.raises(RunError, match="trained with model 'seed-cnn', not 'seed-cnn-aug'"):
        train(_config(tiny, run, model="seed-cnn-aug", resume=True), log=lambda *_: None)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_bad_flags_fail_before_anything_is_written(tiny, tmp_path, capsys):
    out = tmp_path / "never"
    for flags, message in ((["--model", "nope", "--recipe", "seed"], "unknown model 'nope'"),
                           (["--preset", "fancy"], "unknown augmentation preset"),
                           (["--balance", "expand:"], "expand needs a positive number"),
                           (["--balance", "expand:0"], "expand needs a positive number"),
                           (["--colour-constancy", "0.5"], "Minkowski norm >= 1"),
                           (["--era-balance"], "--era-balance needs a sampler")):  # seed recipe: balance none
        code = cli_main(["train", "--data", str(tiny), "--out", str(out), "--model", "seed-cnn", *flags])
        assert code == 2 and message in capsys.readouterr().err
        assert not out.exists()


def test_split_seed_fixes_the_validation_set_while_the_seed_changes(tiny, tmp_path):
    def validation_names(**overrides):
        data = prepare_data(_config(tiny, tmp_path / "x", test_split="", **overrides).resolved(), log=lambda *_: None)
        return [row["path"] for row in data.split_rows if row["role"] == "val"]

    reference = validation_names(seed=42)
    assert validation_names(seed=7, split_seed=42) == reference
    assert validation_names(seed=7) != reference


def test_validation_is_also_scored_within_each_acquisition_era():
    from types import SimpleNamespace

    from sklearn.metrics import roc_auc_score

    from melanoma.train.scoring import validation_by_era

    names = [f"melanoma/ISIC_{i:07d}.jpg" for i in (1, 2, 3, 4, 54001, 54002, 54003, 54004)]
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 2])
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=8)
    data = SimpleNamespace(classes=list(CLASSES), val_labels=labels,
                           split_rows=[{"path": n, "role": "val"} for n in names] + [{"path": "x", "role": "train"}])
    by_era = validation_by_era(data, probs, threshold=0.5)
    assert list(by_era) == ["2016-17 archive", "later"] and [m["n"] for m in by_era.values()] == [4, 4]
    assert by_era["later"]["melanoma"]["auc"] == pytest.approx(roc_auc_score(labels[4:] == 0, probs[4:, 0]))
    data.split_rows = [{"path": n, "role": "val"} for n in names[:4] * 2]
    assert validation_by_era(data, probs, threshold=0.5) == {}  # one era: nothing to add


def test_era_balanced_sampling_trains_and_names_every_training_image(tiny, tmp_path):
    config = _config(tiny, tmp_path / "era", epochs=1, balance="expand:3", test_split="")
    data = prepare_data(config.resolved(), log=lambda *_: None)
    names = train_image_names(data)
    originals = sum(row["role"] == "train" for row in data.split_rows)
    assert len(names) == len(data.train_labels) > originals and all(name.endswith(".jpg") for name in names)
    run = train(_config(tiny, tmp_path / "run", epochs=1, balance="sampler", era_balance=True), log=lambda *_: None)
    assert json.loads((run / "config.json").read_text())["config"]["era_balance"] is True


def test_data_with_one_class_or_too_few_images(tmp_path):
    one = tmp_path / "one"
    for i in range(4):
        save_image(one / "Train" / "nevus" / f"{i}.jpg", lesion_image(i, 40))
    with pytest.raises(DataError, match="at least 2 classes"):
        train(_config(one, tmp_path / "r1"), log=lambda *_: None)
    thin = tiny_dataset(tmp_path / "thin", per_class=3, test_per_class=1)
    for path in list((thin / "Train" / "vascular lesion").iterdir())[1:]:
        path.unlink()
    with pytest.raises(DataError, match="class vascular lesion has 1 independent image"):
        train(_config(thin, tmp_path / "r2"), log=lambda *_: None)
    assert not (tmp_path / "r2").exists()


def test_progress_bar_counts_epochs_from_one(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("melanoma.train.loop.interactive", lambda: True)
    train(_config(tiny, tmp_path / "run", progress=True), log=lambda *_: None)
    captured = capsys.readouterr()
    bar = captured.out + captured.err
    assert "Epoch 1/2" in bar and "Epoch 2/2" in bar
    assert "Epoch 0" not in bar


def test_a_log_file_gets_one_line_per_epoch_not_bar_redraws(tiny, tmp_path, capsys):
    train(_config(tiny, tmp_path / "run", progress=True), log=lambda *_: None)
    err = capsys.readouterr().err
    assert "\r" not in err and "Epoch 1/2" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "val loss" in lines[0]


def test_validation_is_reported_per_block_of_isic_ids_with_intervals():
    from melanoma.train.scoring import validation_by_collection

    names = [f"Train/melanoma/ISIC_00{n:05d}.jpg" for n in (100, 200, 300, 12_100, 12_200, 12_300)] \
        + [f"Train/nevus/ISIC_00{n:05d}.jpg" for n in (400, 500, 600, 13_100, 13_200, 13_300)]
    labels = np.array([0] * 6 + [1] * 6)
    data = SimpleNamespace(classes=["melanoma", "nevus"], val_labels=labels,
                           split_rows=[{"path": name, "role": "val"} for name in names])
    probs = np.where(labels[:, None] == 0, [0.9, 0.1], [0.2, 0.8])  # right everywhere ...
    probs[[3, 4, 5]] = [0.1, 0.9]                                   # ... but for the wide-field melanomas
    parts = validation_by_collection(data, probs, threshold=0.5, resamples=20)
    assert list(parts) == ["ISIC_0000000-0011999", "ISIC_0012000-0015999"]
    early, wide = parts["ISIC_0000000-0011999"], parts["ISIC_0012000-0015999"]
    assert (early["n"], wide["n"]) == (6, 6)
    assert early["melanoma"]["sensitivity"] == 1.0 and wide["melanoma"]["sensitivity"] == 0.0
    assert wide["ci"]["melanoma_sensitivity"]["high"] == 0.0
    early_only = [0, 1, 2, 6, 7, 8]
    one_block = SimpleNamespace(classes=data.classes, val_labels=labels[early_only],
                                split_rows=[data.split_rows[i] for i in early_only])
    assert validation_by_collection(one_block, probs[early_only], 0.5) == {}  # one block: nothing to compare
