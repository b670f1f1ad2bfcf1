"""A run folder under hostile use (issue 23: 3, 15, 16 and two LOW items): --overwrite never deletes data or unrelated
files, --out is never a data source or a symbolic link, --resume refuses changed data and changed settings and records
what it did, and damaged config.json / checkpoint files are one line naming the file."""
from __future__ import annotations

import collections
import json
import pickle
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import tiny_dataset, train_tiny_run

from melanoma.cli.main import main
from melanoma.config import TrainConfig
from melanoma.runs.layout import _WORDS, CONFIG_FIELD_TYPES


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-epoch seed-cnn run at 32 px: (data folder, run folder)."""
    return train_tiny_run(tmp_path_factory.mktemp("safety"), epochs=1)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    return err


def _files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _copy_run(tiny_run, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run[1], copy)
    return copy


def _train(data: Path, out: Path, *flags: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "seed-cnn", "--epochs", "1",
            "--image-size", "32", "--threads", "1", "--no-progress", *flags]


# --- 3. --overwrite only ever replaces a run folder ----------------------------------------------------------------


def test_out_equal_to_inside_or_around_the_data_is_refused_and_nothing_is_deleted(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", per_class=2, test_per_class=1)
    (data / "notes.txt").write_text("mine")
    before = _files(tmp_path)
    for out in (data, data / "Train" / "run", tmp_path):
        assert main(_train(data, out, "--overwrite")) == 2
        assert "--out" in _error(capsys)
        assert _files(tmp_path) == before
    assert not (data / "Train" / "run").exists() and not list(tmp_path.glob(".*"))


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", per_class=2, test_per_class=1)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (out / "config.json").write_text('{"something": "else"}')  # a config.json, but not a run's
    assert main(_train(data, out, "--overwrite")) == 2
    assert "not a run folder" in _error(capsys)
    assert (out / "thesis.tex").read_text() == "precious"


def test_audit_out_is_never_the_data_or_a_foreign_folder(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", per_class=2, test_per_class=1)
    before = _files(data)
    assert main(["audit", str(data), "--out", str(data / "audit")]) == 2
    assert "inside the input" in _error(capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main(["audit", str(data), "--out", str(foreign)]) == 2
    assert "not an audit folder" in _error(capsys)
    assert _files(data) == before and not (data / "audit").exists() and not (foreign / "audit.json").exists()
    out = tmp_path / "audit"
    assert main(["audit", str(data), "--out", str(out)]) == 0
    assert main(["audit", str(data), "--out", str(out)]) == 0  # an earlier audit folder is replaced


def test_a_symlinked_out_is_refused_before_any_work(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", per_class=2, test_per_class=1)
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main(_train(data, link, "--overwrite")) == 2
    assert "symbolic link" in _error(capsys)
    assert not list(tmp_path.glob(".link*")) and not any(target.iterdir())


# --- 15. --resume: same data, same settings, and a record of what it did --------------------------------------------


def test_resume_refuses_changed_data(tiny_run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_run[0], data)
    run = _copy_run(tiny_run, tmp_path)
    header = json.loads((run / "config.json").read_text())
    header["config"]["data"] = [str(data)]
    (run / "config.json").write_text(json.dumps(header))
    victim = next((data / "Train" / "nevus").iterdir())
    victim.write_bytes(next((data / "Train" / "melanoma").iterdir()).read_bytes())  # an image replaced
    before = _files(run)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--threads", "1", "--no-progress"]) == 2
    assert "data changed" in _error(capsys)
    assert _files(run) == before


def test_resume_refuses_settings_it_cannot_change(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path)
    other = tiny_dataset(tmp_path / "other", per_class=2, test_per_class=1)
    before = _files(run)
    assert main(["train", "--out", str(run), "--resume", "--data", str(other), "--lr", "0.5", "--epochs", "2",
                 "--no-progress"]) == 2
    err = _error(capsys)
    assert "its own settings; --data, --lr cannot change on --resume" in err
    assert _files(run) == before


def test_resume_to_more_epochs_is_recorded_in_config_and_report(tiny_run, tmp_path, capsys, monkeypatch):
    run = _copy_run(tiny_run, tmp_path)
    argv = ["train", "--out", str(run), "--resume", "--data", str(tiny_run[0]), "--epochs", "2", "--threads", "1",
            "--no-progress"]  # --data as the run has it is no change
    monkeypatch.setattr(sys, "argv", ["melanoma", *argv])
    assert main(argv) == 0, capsys.readouterr().err
    header = json.loads((run / "config.json").read_text())
    assert header["config"]["epochs"] == 2 and header["config"]["out"] == str(run)
    assert "--resume" in header["command"] and "--resume" not in header["first_command"]
    [resume] = header["resumes"]
    assert resume["changed"]["epochs"] == {"from": 1, "to": 2}
    assert resume["changed"]["out"] == {"from": str(tiny_run[1]), "to": str(run)}
    report = (run / "report.html").read_text()
    assert "&quot;epochs&quot;: 2" in report and str(run) in report and "--resume" in report


# --- 16. config.json with the wrong types: one line naming the file and the field -----------------------------------


@pytest.mark.parametrize("field, value", [("data", None), ("classes", "melanoma"), ("epochs", "abc")])
def test_config_json_with_wrong_types_is_one_line_everywhere(tiny_run, tmp_path, capsys, field, value):
    run = _copy_run(tiny_run, tmp_path)
    header = json.loads((run / "config.json").read_text())
    (header if field == "classes" else header["config"])[field] = value
    (run / "config.json").write_text(json.dumps(header))
    for argv in (["evaluate", str(run), "--bootstrap", "0"], ["report", str(run)],
                 ["train", "--out", str(run), "--resume", "--no-progress"]):
        assert main(argv) == 2, argv
        err = _error(capsys)
        assert "config.json" in err and field in err, (argv, err)


def test_every_train_config_field_has_a_checked_type():
    assert CONFIG_FIELD_TYPES == {spec.name: spec.type for spec in fields(TrainConfig)}
    # the table is read off the dataclass now: what can fail is an annotation the config.json check cannot read
    unknown = {name: kind for name, kind in CONFIG_FIELD_TYPES.items() if kind.split(" | ")[0] not in _WORDS}
    assert not unknown, unknown


def test_damaged_history_on_resume_is_one_line(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path)
    (run / "history.csv").write_text("epoch,train_loss\none,abc\n")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 2
    assert "history.csv" in _error(capsys)


# --- LOW: a file that is not a checkpoint --------------------------------------------------------------------------


def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path)
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(pickle.dumps(collections.Counter(a=1), protocol=4))
    assert main(["predict", str(run), str(tiny_run[0] / "Test"), "--out", str(tmp_path / "p.csv")]) == 2
    err = _error(capsys)
    assert "best.pt" in err and "Weights only" not in err
    (run / "checkpoints" / "last.ckpt").write_bytes(b"hello, not a checkpoint")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 2
    assert "last.ckpt" in _error(capsys)
