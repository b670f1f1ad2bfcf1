"""The accuracy benchmark trains exactly what `melanoma train` would with the same flags."""
from __future__ import annotations

import sys

import pytest
from conftest import REPO, requires_shared_data

sys.path.insert(0, str(REPO / "benchmarks"))
import accuracy  # noqa: E402  (benchmarks/ is not a package)


@requires_shared_data
def test_accuracy_benchmark_passes_train_flags_through():
    config = accuracy.benchmark_config("runs/x", ["--epochs", "8", "--image-size", "180", "--era-balance",
                                                  "--seed", "7"]).resolved()
    assert (config.epochs, config.image_size, config.era_balance, config.seed) == (8, 180, True, 7)
    assert config.truth and config.overwrite and not config.progress and config.out == "runs/x"


@requires_shared_data
def test_accuracy_benchmark_defaults_to_the_default_recipe():
    config = accuracy.benchmark_config("runs/x", []).resolved()
    assert (config.model, config.recipe, config.image_steps, config.image_size, config.input_blur) == (
        "tf_efficientnet_lite0", "finetune", 28_000, 128, 0.8)
    assert config.epochs is None and not config.tta  # the length follows the training split's size


@requires_shared_data
def test_accuracy_benchmark_rejects_an_unknown_flag(capsys):
    with pytest.raises(SystemExit):
        accuracy.benchmark_config("runs/x", ["--epochz", "8"])
    assert "--epochz" in capsys.readouterr().err


@requires_shared_data
def test_image_steps_replace_the_recipes_epoch_count():
    from dataclasses import replace

    from melanoma.config import with_epochs

    config = accuracy.benchmark_config("runs/x", ["--image-steps", "20600"]).resolved()
    assert config.epochs is None and with_epochs(config, 5150).epochs == 4  # not the recipe's 5
    resumed = replace(with_epochs(config, 5150), image_steps=20600).resolved()
    assert with_epochs(resumed, 9999).epochs == 4  # a resumed run keeps its own count
    with pytest.raises(SystemExit):
        accuracy.benchmark_config("runs/x", ["--epochs", "3", "--image-steps", "28000"])


def test_from_run_summarises_a_finished_run_without_training(tmp_path, monkeypatch):
    import json

    from conftest import train_tiny_run

    _, run = train_tiny_run(tmp_path, bootstrap=20)
    result = tmp_path / "summary.json"
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--from-run", str(run), "--json", str(result)])
    accuracy.main()
    payload = json.loads(result.read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert payload["train_minutes"] is None and payload["run"] == str(run)
    clean_ba = next(row for row in payload["results"] if row["test"].startswith("clean")
                    and row["metric"] == "balanced_accuracy")
    assert clean_ba["value"] == metrics["test"]["clean"]["ci"]["balanced_accuracy"]["value"]


def test_from_run_refuses_train_flags_and_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    from melanoma.core.errors import RunError

    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--from-run", str(tmp_path), "--epochs", "3"])
    with pytest.raises(SystemExit):
        accuracy.main()
    assert "takes no train flags" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--from-run", str(tmp_path), "--json", str(tmp_path / "x.json")])
    with pytest.raises(RunError, match="not found"):
        accuracy.main()
    assert not (tmp_path / "x.json").exists()
