"""The command line under pressure: repeated flags add up, bad values stop before any work with one line, outputs
are checked first, runs resume where they are, and interruptions, damaged files and name clashes get a clear word."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from conftest import CLASSES, TRUTH_FILES, lesion_image, save_image, tiny_dataset, train_tiny_run

from melanoma.cli.arguments import build_parser
from melanoma.cli.main import main
from melanoma.config import TrainConfig
from melanoma.core.errors import RunError
from melanoma.runs.folder import run_folder_lock


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-epoch seed-cnn run at 32 px: (data folder, run folder)."""
    return train_tiny_run(tmp_path_factory.mktemp("cli"), epochs=1)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


# --- 6. a repeated list flag adds to the list -------------------------------------------------------------------


def test_repeated_list_flags_accumulate():
    args = build_parser().parse_args(["audit", "A", "--truth", "x.csv", "--truth", "y.csv", "z.csv"])
    assert args.truth == ["x.csv", "y.csv", "z.csv"]
    args = build_parser().parse_args(["train", "--data", "A", "--data", "B", "--truth", "x.csv", "--truth", "y.csv"])
    assert args.data == ["A", "B"] and args.truth == ["x.csv", "y.csv"]
    args = build_parser().parse_args(["experiment", "seed-study", "--data", "A", "--only", "baseline", "--only",
                                      "rebalanced"])
    assert args.only == ["baseline", "rebalanced"]


@pytest.mark.skipif(len(TRUTH_FILES) < 2, reason="needs the shared truth files")
def test_an_audit_given_truth_twice_reads_both_files(tmp_path):
    data = tiny_dataset(tmp_path / "data", per_class=3, test_per_class=1)
    out = tmp_path / "audit"
    argv = ["audit", str(data), "--out", str(out)]
    for path in TRUTH_FILES:
        argv += ["--truth", str(path)]
    assert main(argv) == 0
    audit = json.loads((out / "audit.json").read_text())
    assert sorted(audit["config"]["truth_files"]) == sorted(p.name for p in TRUTH_FILES)


# --- 7. --resume follows --out ------------------------------------------------------------------------------------


def test_a_copied_run_resumes_in_its_new_place_and_the_original_is_untouched(tiny_run, tmp_path):
    _, original = tiny_run
    copy = tmp_path / "moved"
    shutil.copytree(original, copy)
    before = (original / "history.csv").read_text()
    assert main(["train", "--out", str(copy), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert len((copy / "history.csv").read_text().splitlines()) == 3  # header + 2 epochs
    assert (original / "history.csv").read_text() == before


# --- 8. values checked before any work ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["predict", "RUN", "x.jpg", "--threshold", "nan"], "--threshold: must be a finite number, not nan"),
    (["predict", "RUN", "x.jpg", "--threshold", "inf"], "--threshold: must be a finite number, not inf"),
    (["predict", "RUN", "x.jpg", "--threshold", "1.5"], "--threshold: must be a probability between 0 and 1"),
    (["predict", "RUN", "x.jpg", "--threshold", "-1"], "--threshold: must be a probability between 0 and 1"),
    (["train", "--data", "D", "--target-sensitivity", "2"], "--target-sensitivity: must be a sensitivity"),
    (["train", "--data", "D", "--target-sensitivity", "nan"], "--target-sensitivity: must be a finite number"),
    (["train", "--data", "D", "--lr", "nan"], "--lr: must be a finite number, not nan"),
    (["train", "--data", "D", "--workers", "-1"], "--workers: must be between 0 and 256, not -1"),
    (["train", "--data", "D", "--image-size", "0"], "--image-size: must be between 16 and 1,024, not 0"),
    (["train", "--data", "D", "--threads", "0"], "--threads: must be between 1 and 1,024, not 0"),
    (["train", "--data", "D", "--batch-size", "100000"], "--batch-size: must be between 1 and 4,096"),
    (["evaluate", "RUN", "--bootstrap", "-5"], "--bootstrap: must be between 0 and 100,000, not -5"),
    (["audit", "D", "--near-threshold", "999"], "--near-threshold: must be a near-copy distance between 0 and 2"),
    (["audit", "D", "--workers", "0"], "--workers: must be between 1 and 256, not 0"),
    (["export", "RUN", "--opset", "5"], "--opset: must be between 13 and 20, not 5"),
    (["export", "RUN", "--opset", "99"], "--opset: must be between 13 and 20, not 99"),
])
def test_bad_values_stop_at_once_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in _one_line_error(capsys)


def test_library_configs_are_checked_too(tmp_path):
    from melanoma.config import TrainConfig
    from melanoma.train.pipeline import train

    data = tiny_dataset(tmp_path / "data", per_class=2, test_per_class=1)
    for overrides, message in [({"lr": float("nan")}, "--lr must be a number"),
                               ({"target_sensitivity": 2.0}, "--target-sensitivity must be a number in (0, 1]"),
                               ({"val_fraction": 1.0}, "--val-fraction must be a number in (0, 1)"),
                               ({"weights": "w.pth"}, "--weights applies to ImageNet backbones")]:
        config = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), model="seed-cnn", **overrides)
        with pytest.raises(RunError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            train(config, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_outputs_are_checked_before_any_work(tmp_path, capsys, tiny_run):
    data, run = tiny_run
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["audit", str(data), "--out", str(a_file)]) == 2
    assert "is a file; it must be a folder" in _one_line_error(capsys)
    assert main(["audit", str(data), "--out", str(a_file / "sub")]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert main(["predict", str(run), str(data), "--out", str(tmp_path)]) == 2
    assert "is a folder; it must be a file name" in _one_line_error(capsys)
    assert main(["train", "--data", str(data), "--out", str(a_file), "--epochs", "1", "--model", "seed-cnn"]) == 2
    assert "is a file, not a run folder" in _one_line_error(capsys)
    assert main(["compare", str(run), "--out", "/proc/not-writable.md"]) == 2
    assert "cannot write in /proc" in _one_line_error(capsys)


# --- 9. what is read back is checked ------------------------------------------------------------------------------


def test_an_onnx_file_exported_from_another_run_with_the_same_classes_is_refused(tmp_path):
    from melanoma.runs.run import Run

    _, first = train_tiny_run(tmp_path / "a", epochs=1)
    _, second = train_tiny_run(tmp_path / "b", epochs=1, seed=7)
    assert main(["export", str(first)]) == 0
    shutil.copy(first / "model.onnx", second / "model.onnx")
    with pytest.raises(RunError, match="was not exported from this run"):
        Run.load(second)
    assert Run.load(first).backend == "onnx"


@pytest.mark.parametrize("temperature", [0, -1.5, "NaN", None, "hot"])
def test_a_damaged_calibration_temperature_is_refused(tiny_run, tmp_path, temperature):
    from melanoma.runs.run import Run

    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["calibration"]["temperature"] = float(temperature) if temperature == "NaN" else temperature
    (copy / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RunError, match="calibration temperature .* is not a positive number"):
        Run.load(copy)


def test_damaged_run_files_give_one_line(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "config.json").write_text("{not json")
    assert main(["predict", str(copy), str(data / "Test"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "config.json: not valid JSON" in _one_line_error(capsys)
    shutil.copy(run / "config.json", copy / "config.json")
    (copy / "metrics.json").unlink()
    assert main(["report", str(copy)]) == 2
    assert "training has not finished (no metrics.json)" in _one_line_error(capsys)


# --- 10. no file is overwritten or left behind by accident ----------------------------------------------------


def test_explain_numbers_panels_of_inputs_with_the_same_stem(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    save_image(tmp_path / "a" / "ISIC_0000001.jpg", lesion_image(1, 40))
    save_image(tmp_path / "b" / "ISIC_0000001.png", lesion_image(2, 40))
    out = tmp_path / "panels"
    assert main(["explain", str(run), str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ISIC_0000001_2_gradcam.png", "ISIC_0000001_gradcam.png"]
    assert "wrote 2 Grad-CAM panel(s)" in capsys.readouterr().out


def test_a_second_writer_of_one_run_folder_stops_at_once(tmp_path):
    from melanoma.config import TrainConfig
    from melanoma.train.pipeline import train

    data = tiny_dataset(tmp_path / "data", per_class=3, test_per_class=1)
    run = tmp_path / "run"
    holding, release = threading.Event(), threading.Event()

    def first_writer():
        with run_folder_lock(run):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=first_writer)
    thread.start()
    try:
        assert holding.wait(10)
        config = TrainConfig(data=[str(data)], out=str(run), model="seed-cnn", epochs=1, image_size=32,
                             overwrite=True, progress=False)
        with pytest.raises(RunError, match=r"is being written by melanoma train \(pid \d+\)"):
            train(config, log=lambda *_: None)
    finally:
        release.set()
        thread.join()
    assert not run.exists() and not (tmp_path / ".run.starting").exists() and not (tmp_path / ".run.lock").exists()


def test_a_failed_start_leaves_no_staging_folder(tmp_path):
    from melanoma.config import TrainConfig
    from melanoma.core.errors import DataError
    from melanoma.train.pipeline import train

    data = tiny_dataset(tmp_path / "data", per_class=1, test_per_class=1)  # one image a class: cannot split
    config = TrainConfig(data=[str(data)], out=str(tmp_path / "run"), model="seed-cnn", epochs=1, image_size=32,
                         progress=False)
    with pytest.raises(DataError, match="too few images to split"):
        train(config, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder, no lock file


# --- 11. clear words --------------------------------------------------------------------------------------------


def test_a_folder_given_as_an_image_is_called_a_folder(tiny_run, tmp_path):
    from melanoma.deploy.predict import predict_files
    from melanoma.runs.run import Run

    _, run = tiny_run
    (tmp_path / "photo.jpg").mkdir()
    [prediction] = predict_files(Run.load(run), [("photo.jpg", tmp_path / "photo.jpg")])
    assert prediction.error == "photo.jpg: is a folder, not an image file"


def test_ctrl_c_during_training_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import melanoma.train.loop as loop

    data = tiny_dataset(tmp_path / "data", per_class=6, test_per_class=1)
    original, calls = loop.ArrayDataset.__getitem__, {"n": 0}

    def interrupting(self, index):
        calls["n"] += 1
        if self.transform is not None and calls["n"] > 20:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(loop.ArrayDataset, "__getitem__", interrupting)
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "seed-cnn", "--epochs",
                 "3", "--image-size", "32", "--batch-size", "4", "--no-progress"])
    assert code == 130
    err = capsys.readouterr().err
    assert f"melanoma train --out {tmp_path / 'run'} --resume" in err


def test_training_warns_of_a_class_that_only_test_has(tmp_path):
    from melanoma.config import TrainConfig
    from melanoma.train.pipeline import train

    data = tiny_dataset(tmp_path / "data", per_class=6, test_per_class=1)
    save_image(data / "Test" / "dermatofibroma" / "ISIC_0009999.jpg", lesion_image(99, 40))
    lines: list[str] = []
    train(TrainConfig(data=[str(data)], out=str(tmp_path / "run"), model="seed-cnn", epochs=1, image_size=32,
                      progress=False, bootstrap=0), log=lines.append)
    assert any("class 'dermatofibroma' has 1 Test image(s) but no training images" in line for line in lines)


# --- 12. progress counts images -------------------------------------------------------------------------------


def test_prediction_progress_counts_images_not_batches(tiny_run):
    from melanoma.deploy.predict import collect_inputs, predict_files
    from melanoma.runs.run import Run

    data, run = tiny_run
    inputs = collect_inputs([data / "Test", data / "Train"])
    done: list[int] = []
    predict_files(Run.load(run), inputs, batch_size=4, progress=done.append)
    assert sum(done) == len(inputs) and len(done) == -(-len(inputs) // 4)
    assert len(inputs) > 4 and set(CLASSES) <= {p.parent.name for _, p in inputs}
    assert np.all(np.asarray(done[:-1]) == 4)


@pytest.mark.parametrize("verb", [[], ["audit"], ["train"], ["evaluate"], ["predict"], ["report"], ["compare"],
                                  ["explain"], ["export"], ["serve"], ["experiment"], ["experiment", "seed-study"]])
def test_every_help_page_prints(verb, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*verb, "--help"])
    assert stop.value.code == 0
    assert "usage: melanoma" in capsys.readouterr().out


# --- one error base, and a light --help ------------------------------------------------------------------------


def test_every_user_error_derives_from_the_one_base_the_cli_catches(capsys):
    import inspect

    from melanoma.core import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    users = [c for c in classes if c not in (errors.MelanomaError, errors.RunInterrupted)]
    assert len(users) >= 10 and all(issubclass(c, errors.MelanomaError) for c in users), users
    assert not issubclass(errors.RunInterrupted, errors.MelanomaError)  # Ctrl-C exits 130, not 2

    from melanoma.cli import main as cli

    for error in users:
        def fail(args, error=error):
            raise error(f"{error.__name__} says what is wrong")

        original = cli.COMMANDS["report"]
        cli.COMMANDS["report"] = fail
        try:
            assert cli.main(["report", "RUN"]) == 2
        finally:
            cli.COMMANDS["report"] = original
        assert capsys.readouterr().err == f"error: {error.__name__} says what is wrong\n"


def test_help_imports_no_torch():
    import subprocess
    import sys

    probe = ("import sys\nfrom melanoma.cli.main import main\ntry:\n    main(['--help'])\n"
             "except SystemExit:\n    pass\nfor verb in ('train', 'serve', 'evaluate', 'fit-ood'):\n"
             "    try:\n        main([verb, '--help'])\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'numpy', 'lightning', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


# --- the training flags come from TrainConfig's field metadata --------------------------------------------------

TRAIN_FLAGS = ["--accelerator", "--audit", "--augment-on", "--backbone-lr-scale", "--balance", "--batch-size",
               "--colour-constancy", "--data", "--devices", "--early-stopping", "--ema", "--epochs", "--era-balance",
               "--external", "--freeze-epochs", "--freeze-stages", "--image-root", "--image-size", "--image-steps",
               "--input-blur", "--label-smoothing", "--logger", "--lr", "--metadata", "--model", "--no-clean",
               "--no-progress", "--num-nodes", "--optimizer", "--out", "--overwrite", "--precision", "--preset",
               "--recipe", "--relabel", "--rendering", "--resume", "--schedule", "--seed", "--split-seed",
               "--strategy", "--target-sensitivity", "--test-split", "--threads", "--tracking-uri", "--truth", "--tta",
               "--val-fraction", "--warmup-epochs", "--weight-decay", "--weights", "--workers"]  # as before #28


def _train_parser():
    import argparse

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, verbs.choices["train"]


def test_the_training_flags_are_spelled_as_before():
    _, train = _train_parser()
    flags = sorted(s for a in train._actions for s in a.option_strings if s.startswith("--") and s != "--help"
                   and not s.startswith("--no-") or s in ("--no-clean", "--no-progress"))
    assert flags == TRAIN_FLAGS


def test_every_flag_reaches_its_config_field():
    from melanoma.cli.arguments import config_from_args

    parser, _ = _train_parser()
    config = config_from_args(parser.parse_args([
        "train", "--data", "A", "B", "--truth", "T.csv", "--ema", "0.5", "--workers", "3", "--no-clean",
        "--no-progress", "--image-steps", "900", "--no-rendering", "--tta", "--devices", "0,1", "--lr", "1e-4",
        "--recipe", "seed", "--augment-on", "device", "--out", "R"]))
    assert (config.data, config.truth, config.metadata, config.out) == (["A", "B"], ["T.csv"], [], "R")
    assert (config.ema_decay, config.num_workers, config.clean, config.progress) == (0.5, 3, False, False)
    assert (config.image_steps, config.epochs, config.rendering, config.tta) == (900, None, False, True)
    assert (config.devices, config.lr, config.recipe, config.augment_on) == ("0,1", 1e-4, "seed", "device")
    defaults = config_from_args(parser.parse_args(["train", "--data", "A"]))
    assert defaults == TrainConfig(data=["A"], out="runs/train")


def test_the_range_checks_and_resume_flags_are_read_from_the_same_metadata():
    from melanoma.train.checks import settings_changed_on_resume, validate_config

    with pytest.raises(RunError, match=r"^--ema must be a number in \[0, 1\), not 1.0$"):
        validate_config(TrainConfig(data=["A"], out="R", ema_decay=1.0).resolved())
    with pytest.raises(RunError, match=r"^--workers must be a number in \[0, 256\], not 999$"):
        validate_config(TrainConfig(data=["A"], out="R", num_workers=999).resolved())
    saved = TrainConfig(data=["A"], out="R")
    assert settings_changed_on_resume(TrainConfig(data=["A"], out="R", clean=False, ema_decay=0.5), saved) \
        == ["--no-clean", "--ema"]


def test_the_preset_help_names_every_preset():
    from dataclasses import fields

    from melanoma.config import option_of
    from melanoma.data.transforms import PRESETS

    help_text = next(option_of(spec).help for spec in fields(TrainConfig) if spec.name == "preset")
    assert all(name in help_text for name in PRESETS), help_text
