"""Experiment tracking (melanoma.train.tracking): a tiny training with --logger tensorboard and with --logger mlflow,
the logged parameters, per-epoch metrics and end-of-run artifacts read back with each tool's own reader; an MLflow run
continued by --resume; bad flags refused before any work; and no tracking package imported unless asked for."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_dataset, train_tiny_run

from melanoma.cli.main import main as cli_main
from melanoma.config import TrainConfig
from melanoma.core.errors import RunError
from melanoma.train.pipeline import train
from melanoma.train.tracking import EPOCH_METRICS, TRACKING_FILE, check_tracking, log_run_artifacts


def _history(run: Path) -> dict[str, list[tuple[int, float]]]:
    rows = list(csv.DictReader((run / "history.csv").open()))
    return {name: [(int(row["epoch"]), float(row[name])) for row in rows]
            for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")}


def test_tensorboard_event_files_hold_the_config_and_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run = train_tiny_run(tmp_path, epochs=2, logger="tensorboard")
    assert json.loads((run / TRACKING_FILE).read_text()) == {"logger": "tensorboard", "log_dir": "tensorboard"}
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(EPOCH_METRICS)  # per epoch only, nothing per step
    for name, expected in _history(run).items():
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert [step for step, _ in logged] == [1, 2], name
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-5), name
    content = events.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(blob).session_start_info
                 for blob in content.values() if plugin_data_pb2.HParamsPluginData.FromString(blob)
                 .HasField("session_start_info"))
    assert start.hparams["model"].string_value == "seed-cnn" and start.hparams["image_size"].number_value == 32
    assert start.hparams["augment_path"].string_value == "loader"
    # after scoring: the figures as images
    assert log_run_artifacts(run) == ["curves.png", "confusion.png"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"curves", "confusion"} <= set(events.Tags()["images"])


def test_mlflow_store_holds_params_metrics_and_artifacts_and_resume_continues_the_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder either

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # its folder does not exist yet
    data, run = train_tiny_run(tmp_path, epochs=1, logger="mlflow", tracking_uri=uri)
    record = json.loads((run / TRACKING_FILE).read_text())
    assert record["logger"] == "mlflow" and record["tracking_uri"] == uri
    train(TrainConfig(data=str(data), out=str(run), epochs=2, resume=True, threads=1, progress=False),
          log=lambda *_: None)
    assert json.loads((run / TRACKING_FILE).read_text())["run_id"] == record["run_id"]  # the same MLflow run

    client = MlflowClient(uri)
    logged = client.get_run(record["run_id"])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    params = logged.data.params
    assert (params["model"], params["image_size"], params["epochs"], params["seed"]) == ("seed-cnn", "32", "1", "42")
    assert params["augment_path"] == "loader" and params["logger"] == "mlflow" and params["resume"] == "False"
    for name, expected in _history(run).items():
        history = sorted((metric.step, metric.value) for metric in client.get_metric_history(record["run_id"], name))
        assert [step for step, _ in history] == [1, 2], name
        assert [value for _, value in history] == pytest.approx([value for _, value in expected]), name
    assert log_run_artifacts(run) == ["report.html", "curves.png", "confusion.png"]
    assert {artifact.path for artifact in client.list_artifacts(record["run_id"])} == {"report.html", "curves.png",
                                                                                      "confusion.png"}
    assert (tmp_path / "store" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_no_logger_imports_no_tracking_package(tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from pathlib import Path
from conftest import train_tiny_run
train_tiny_run(Path({str(tmp_path)!r}))
print(sorted({{name.split('.')[0] for name in sys.modules}} & {{'tensorboard', 'mlflow', 'tensorboardX'}}),
      'torch.utils.tensorboard' in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[] False"
    assert not (tmp_path / "run" / TRACKING_FILE).exists() and not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.parametrize("flags, message", [
    (["--tracking-uri", "sqlite:///x.db"], "--tracking-uri goes with --logger mlflow"),
    (["--logger", "mlflow", "--tracking-uri", "ftp://host/x"], "MLflow has no 'ftp:' store"),
    (["--logger", "mlflow", "--tracking-uri", "file:/tmp/mlruns"], "MLflow 3 refuses its file store"),
    (["--logger", "mlflow", "--tracking-uri", "mlruns"], "MLflow 3 refuses its file store"),
])
def test_bad_tracking_flags_fail_before_anything_is_written(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    data = tiny_dataset(tmp_path / "data", per_class=3, test_per_class=1)
    out = tmp_path / "never"
    code = cli_main(["train", "--data", str(data), "--out", str(out), "--model", "seed-cnn", *flags])
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


def test_an_unknown_logger_or_a_missing_package_is_refused(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--data", "x", "--logger", "wandb"])
    assert "--logger: invalid choice: 'wandb'" in capsys.readouterr().err
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(RunError, match="--logger mlflow needs the 'mlflow' package"):
        check_tracking("mlflow", None)
    with pytest.raises(RunError, match="--logger tensorboard needs the 'tensorboard' package"):
        check_tracking("tensorboard", None)
    check_tracking("none", None)  # nothing to look up


def test_a_damaged_tracking_file_is_a_one_line_error_naming_it(tmp_path):
    from melanoma.core.errors import RunError
    from melanoma.train.tracking import TRACKING_FILE, read_tracking

    assert read_tracking(tmp_path) == {}  # a run without tracking
    (tmp_path / TRACKING_FILE).write_text("{not json")
    with pytest.raises(RunError, match="tracking.json: not valid JSON"):
        read_tracking(tmp_path)
