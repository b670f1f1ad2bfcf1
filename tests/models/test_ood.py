"""The out-of-distribution gate: the detectors on synthetic features, the gate fitted at the end of training, its
decisions (lesions pass, blank and noise images do not), the predict CSV, an old run without a gate, a gate of
another model refused, and `melanoma fit-ood` for an existing run."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from conftest import lesion_image, save_image, train_tiny_run

from melanoma.cli.main import main as cli_main
from melanoma.core.errors import GateError, RunError
from melanoma.deploy.predict import predict_files
from melanoma.models.ood import (
    DETECTORS,
    GATE_FILE,
    REASON,
    choose_threshold,
    detector_scores,
    fit_detector,
    fit_gate,
    load_gate,
    save_gate,
)
from melanoma.runs.run import Run


def _far_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    blanks = [np.full((48, 48, 3), colour, dtype=np.uint8) for colour in ((0, 0, 0), (255, 255, 255), (40, 70, 200),
                                                                         (128, 128, 128))]
    noise = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(4)]
    return {"blank": np.stack(blanks), "noise": np.stack(noise)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # 40 images a class: with 30, a noise image passed the gate by 1 % of its threshold in fp32 on a CPU without bf16
    return train_tiny_run(tmp_path_factory.mktemp("ood"), per_class=40, epochs=3)


# --- detectors on features -----------------------------------------------------------------------------------


@pytest.mark.parametrize("detector", DETECTORS)
def test_each_detector_scores_far_features_above_the_training_cloud(detector):
    rng = np.random.default_rng(0)
    means = np.array([[3.0, 0, 0, 0], [0, 3.0, 0, 0]])
    labels = np.repeat([0, 1], 100)
    features = means[labels] + rng.normal(0, 0.5, (200, 4))
    near = means[[0, 1]] + rng.normal(0, 0.5, (2, 4))
    far = np.array([[-6.0, -6, 4, 4], [0.1, 0.1, -5, 5]])
    logits = lambda f: f[:, :2] * 3  # noqa: E731  confident logits near the class means, flat ones far away
    arrays = fit_detector(detector, features, labels)
    scores = detector_scores(detector, arrays, np.r_[near, far], logits(np.r_[near, far]))
    assert scores[2:].min() > scores[:2].max()


def test_threshold_keeps_at_least_95_percent_of_validation():
    scores = np.random.default_rng(1).normal(size=101)
    threshold = choose_threshold(scores)
    assert 0.95 <= (scores <= threshold).mean() < 0.97
    with pytest.raises(GateError):
        choose_threshold(np.array([1.0, np.nan]))


def test_gate_file_round_trips_without_pickle_and_refuses_damage(tmp_path):
    rng = np.random.default_rng(2)
    features, labels = rng.normal(size=(40, 6)), np.repeat([0, 1], 20)
    gate = fit_gate("mahalanobis", features, labels, features[:10], None, checkpoint_sha256="abc")
    save_gate(gate, tmp_path)
    loaded = load_gate(tmp_path, "abc")
    assert loaded.detector == "mahalanobis" and loaded.threshold == gate.threshold
    assert np.allclose(loaded.scores(features, None), gate.scores(features, None), rtol=1e-4)
    with pytest.raises(GateError, match="fitted on another model"):
        load_gate(tmp_path, "def")
    (tmp_path / GATE_FILE).write_bytes(b"not a zip")
    with pytest.raises(GateError, match="not a readable gate file"):
        load_gate(tmp_path)
    assert load_gate(tmp_path / "elsewhere") is None


# --- a trained run -------------------------------------------------------------------------------------------


def test_training_fits_the_gate_and_it_passes_lesions_and_rejects_blank_and_noise(trained):
    _, run_dir = trained
    assert (run_dir / GATE_FILE).is_file()
    import json

    summary = json.loads((run_dir / "metrics.json").read_text())["ood_gate"]
    assert summary["detector"] == "knn" and summary["validation_pass_rate"] >= 0.95
    run = Run.load(run_dir, backend="torch")
    lesions = run.answers(np.stack([lesion_image(5000 + i, 40) for i in range(12)]))
    assert lesions.in_distribution.mean() >= 0.75
    for name, images in _far_images().items():
        answers = run.answers(images)
        assert not answers.in_distribution.any(), name
        assert (answers.ood_scores > run.gate.threshold).all()


def test_predict_csv_has_the_gate_columns_and_no_alert_out_of_distribution(trained, tmp_path):
    _, run_dir = trained
    save_image(tmp_path / "in" / "lesion.png", lesion_image(5001, 48))
    save_image(tmp_path / "in" / "blank.png", np.zeros((48, 48, 3), np.uint8))
    out = tmp_path / "predictions.csv"
    assert cli_main(["predict", str(run_dir), str(tmp_path / "in"), "--out", str(out), "--threshold", "0"]) == 0
    with open(out, newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    assert {"ood_score", "in_distribution", "reason"} <= set(rows["blank.png"])
    assert rows["blank.png"]["in_distribution"] == "false" and rows["blank.png"]["melanoma_alert"] == ""
    assert rows["blank.png"]["reason"] == REASON and float(rows["blank.png"]["ood_score"]) > 0
    assert rows["lesion.png"]["in_distribution"] == "true" and rows["lesion.png"]["melanoma_alert"] == "1"
    assert rows["lesion.png"]["reason"] == ""


def test_an_old_run_without_a_gate_predicts_with_a_notice(trained, tmp_path):
    _, run_dir = trained
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / GATE_FILE).unlink()
    with pytest.warns(UserWarning, match="no out-of-distribution gate.*melanoma fit-ood"):
        run = Run.load(old)
    [prediction] = predict_files(run, [("blank", _png_bytes(np.zeros((40, 40, 3), np.uint8)))])
    assert prediction.in_distribution is None and prediction.ood_score is None and prediction.reason == ""
    assert prediction.probabilities


def test_fit_ood_fits_the_gate_of_an_existing_run_from_its_own_data(trained, tmp_path):
    _, run_dir = trained
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / GATE_FILE).unlink()
    assert cli_main(["fit-ood", str(old)]) == 0
    refitted, original = load_gate(old), load_gate(run_dir)
    assert refitted.threshold == pytest.approx(original.threshold, rel=1e-4)
    assert cli_main(["fit-ood", str(old), "--detector", "mahalanobis"]) == 0
    assert Run.load(old).gate.detector == "mahalanobis"
    # metrics.json and the model card follow the refitted gate, not the one training wrote
    import json
    assert json.loads((old / "metrics.json").read_text())["ood_gate"]["detector"] == "mahalanobis"
    assert "mahalanobis" in (old / "MODEL_CARD.md").read_text()


def test_a_gate_of_another_model_is_refused_in_one_line(trained, tmp_path, capsys):
    _, run_dir = trained
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    gate = load_gate(other)
    gate.checkpoint_sha256 = "0" * 64
    save_gate(gate, other)
    with pytest.raises(RunError, match="fitted on another model"):
        Run.load(other)
    save_image(tmp_path / "x.png", lesion_image(1, 40))
    assert cli_main(["predict", str(other), str(tmp_path / "x.png"), "--out", str(tmp_path / "p.csv")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "ood_gate.npz" in error and len(error.splitlines()) == 1


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
