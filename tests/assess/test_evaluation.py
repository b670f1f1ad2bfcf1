"""Metrics against hand-computed cases, bootstrap CIs, threshold selection, and `evaluate` / `predict` on a real
(tiny) run, including their bad inputs."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, lesion_image, save_image, train_tiny_run

from melanoma.assess.evaluate import evaluate_run
from melanoma.assess.intervals import bootstrap_ci
from melanoma.assess.metrics import compute_metrics, headline, threshold_for_sensitivity
from melanoma.cli.main import main as cli_main
from melanoma.core.errors import DataError, RunError
from melanoma.data.records import ISIC_CLASSES

THREE = ["melanoma", "nevus", "vascular lesion"]


def _onehot(predicted, k=3, confidence=0.8):
    probs = np.full((len(predicted), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(predicted)), predicted] = confidence
    return probs


def test_perfect_and_inverse_classifiers():
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = compute_metrics(labels, _onehot(labels), THREE, melanoma_threshold=0.5)
    assert perfect["accuracy"] == perfect["balanced_accuracy"] == perfect["macro_f1"] == 1.0
    assert perfect["melanoma"]["auc"] == 1.0
    assert perfect["melanoma"]["sensitivity"] == perfect["melanoma"]["specificity"] == 1.0
    inverse = compute_metrics(labels, _onehot((labels + 1) % 3), THREE, melanoma_threshold=0.5)
    assert inverse["accuracy"] == inverse["balanced_accuracy"] == inverse["macro_f1"] == 0.0
    assert inverse["melanoma"]["sensitivity"] == 0.0


def test_hand_computed_case_with_a_never_predicted_class():
    # true:      m m m n n v ; predicted: m m n n n n  -> 'vascular lesion' is never predicted
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 1])
    m = compute_metrics(labels, _onehot(predicted), THREE)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["melanoma"] == {"precision": 1.0, "recall": pytest.approx(2 / 3),
                                          "f1": pytest.approx(0.8), "support": 3, "auc": pytest.approx(5 / 6)}
    assert m["per_class"]["nevus"]["precision"] == pytest.approx(2 / 4)
    assert m["per_class"]["vascular lesion"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1,
                                                 "auc": pytest.approx(0.5)}  # all scores tie
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 * 0.5 * 1 / 1.5 + 0) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert m["melanoma"]["recall_top_class"] == pytest.approx(2 / 3)


def test_class_absent_from_the_split_is_left_out_of_balanced_accuracy():
    labels = np.array([0, 0, 1, 1])  # no 'vascular lesion' at all
    m = compute_metrics(labels, _onehot(np.array([0, 1, 1, 1])), THREE)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["per_class"]["vascular lesion"]["support"] == 0


def test_fast_headline_equals_scikit_learn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    fast = headline(labels, probs, THREE, threshold=0.4)
    slow = compute_metrics(labels, probs, THREE, melanoma_threshold=0.4)
    assert fast["balanced_accuracy"] == pytest.approx(slow["balanced_accuracy"])
    assert fast["macro_f1"] == pytest.approx(slow["macro_f1"])
    assert fast["melanoma_auc"] == pytest.approx(slow["melanoma"]["auc"])
    assert fast["melanoma_sensitivity"] == pytest.approx(slow["melanoma"]["sensitivity"])
    assert fast["melanoma_specificity"] == pytest.approx(slow["melanoma"]["specificity"])


def test_bootstrap_is_seeded_and_brackets_the_value():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    probs = 0.5 * rng.dirichlet(np.ones(3), 90) + 0.5 * _onehot(labels)
    first = bootstrap_ci(labels, probs, THREE, 0.5, resamples=200, seed=7)
    assert first == bootstrap_ci(labels, probs, THREE, 0.5, resamples=200, seed=7)
    for name, interval in first.items():
        assert interval["low"] <= interval["value"] <= interval["high"], name
    assert first["balanced_accuracy"]["high"] - first["balanced_accuracy"]["low"] > 0


def test_threshold_reaches_the_target_sensitivity():
    is_mel = np.array([1] * 10 + [0] * 10, dtype=bool)
    prob = np.concatenate([np.linspace(0.95, 0.05, 10), np.linspace(0.5, 0.0, 10)])
    choice = threshold_for_sensitivity(is_mel, prob, target=0.9)
    assert choice["sensitivity"] >= 0.9 and choice["threshold"] == pytest.approx(prob[8])
    assert choice["specificity"] == pytest.approx(np.mean(prob[10:] < choice["threshold"]))
    strict = threshold_for_sensitivity(is_mel, prob, target=1.0)
    assert strict["sensitivity"] == 1.0 and strict["threshold"] <= choice["threshold"]


# --- evaluate and predict on a real run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("evaluate"), per_class=10, test_per_class=3, bootstrap=50)


def test_evaluate_writes_metrics_plots_and_predictions(trained, tmp_path):
    data, run = trained
    report = evaluate_run(str(run), split="Test", out=str(tmp_path / "ev"), resamples=50, log=lambda *_: None)
    assert report["all"]["n"] == 9 and report["clean"]["n"] == 8
    assert set(report["all"]["ci"]) >= {"balanced_accuracy", "melanoma_auc"}
    for name in ("metrics.json", "confusion.png", "roc.png", "pr.png", "predictions.csv"):
        assert (tmp_path / "ev" / name).is_file()
    training_metrics = json.loads((run / "metrics.json").read_text())
    assert report["all"]["balanced_accuracy"] == pytest.approx(training_metrics["test"]["all"]["balanced_accuracy"])


def test_evaluate_bad_inputs(trained, tmp_path):
    data, run = trained
    with pytest.raises(DataError, match=r"no split 'Validation' \(available: Test, Train\)"):
        evaluate_run(str(run), split="Validation", out=str(tmp_path / "x"), log=lambda *_: None)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    shutil.rmtree(other / "Test" / "nevus")
    shutil.rmtree(other / "Train" / "nevus")
    (other / "Train" / "basal cell carcinoma").mkdir()
    save_image(other / "Train" / "basal cell carcinoma" / "b.jpg", lesion_image(77, 40))
    with pytest.raises(DataError, match="missing from the data: nevus; not known to the model: basal cell carcinoma"):
        evaluate_run(str(run), data=str(other), out=str(tmp_path / "x"), log=lambda *_: None)
    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    for folder in (empty / "Test").iterdir():
        for image in folder.iterdir():
            image.unlink()
    with pytest.raises(DataError, match="split 'Test' has no images"):
        evaluate_run(str(run), data=str(empty), out=str(tmp_path / "x"), log=lambda *_: None)
    hollow = tmp_path / "hollow-run"
    shutil.copytree(run, hollow)
    (hollow / "checkpoints" / "best.pt").unlink()
    with pytest.raises(RunError, match="the run has no checkpoint"):
        evaluate_run(str(hollow), out=str(tmp_path / "x"), log=lambda *_: None)
    assert not (tmp_path / "x").exists()


def test_evaluate_scores_the_rest_when_an_image_is_unreadable(trained, tmp_path):
    data, run = trained
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "Test" / "nevus" / "ISIC_9999999.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    report = evaluate_run(str(run), data=str(broken), out=str(tmp_path / "ev"), resamples=0, log=lambda *_: None)
    assert report["all"]["n"] == 9 and len(report["unreadable"]) == 1
    rows = list(csv.DictReader((tmp_path / "ev" / "predictions.csv").open()))
    assert [r["error"] for r in rows if r["error"]] and len(rows) == 10


def test_predict_cli_writes_the_submission_layout_and_reports_bad_images(trained, tmp_path, capsys):
    data, run = trained
    folder = tmp_path / "inputs"
    shutil.copytree(data / "Test" / "melanoma", folder)
    (folder / "ISIC_0000001.jpg").write_text("not an image")
    out = tmp_path / "preds.csv"
    assert cli_main(["predict", str(run), str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:5] == ["image", *CLASSES, "melanoma_alert"]
    assert len(rows) == 4
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and "not an image" in bad[0]["error"] and bad[0]["image"] == "ISIC_0000001"
    good = [r for r in rows if not r["error"]]
    assert all(abs(sum(float(r[c]) for c in CLASSES) - 1) < 1e-4 for r in good)
    # the out-of-distribution gate withholds the alert from an image it rejects, and says why
    assert all(r["melanoma_alert"] in ("0", "1") for r in good if r["in_distribution"] == "true")
    assert all(r["melanoma_alert"] == "" and r["reason"] for r in good if r["in_distribution"] == "false")
    assert "ERROR" in capsys.readouterr().out


def test_our_scores_equal_the_official_isic_scorer(trained, tmp_path):
    """The same predictions, scored by the ISIC challenge's own package: balanced accuracy and per-class AUCs agree."""
    pd = pytest.importorskip("pandas")
    scoring = pytest.importorskip("isic_challenge_scoring")
    data, run = trained
    out = tmp_path / "preds.csv"
    assert cli_main(["predict", str(run), str(data / "Test"), "--out", str(out)]) == 0
    predictions = pd.read_csv(out).set_index("image")[list(CLASSES)]
    labels = {p.stem: p.parent.name for p in (data / "Test").rglob("*.jpg")}
    truth = pd.DataFrame([[float(labels[i] == c) for c in CLASSES] for i in predictions.index],
                         index=predictions.index, columns=list(CLASSES))
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=predictions.index)
    official = scoring.ClassificationScore(truth, predictions, weights,
                                           scoring.ClassificationMetric.BALANCED_ACCURACY)
    ours = compute_metrics(truth.to_numpy().argmax(1), predictions.to_numpy(), list(CLASSES))
    assert ours["balanced_accuracy"] == pytest.approx(official.aggregate["balanced_accuracy"], abs=1e-9)
    for position, name in enumerate(CLASSES):
        row = official.per_category.iloc[position]  # one row per category, in the truth columns' order
        assert ours["per_class"][name]["auc"] == pytest.approx(row["auc"], abs=1e-6)


def test_compare_and_report_cli(trained, tmp_path, capsys):
    data, run = trained
    assert cli_main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "Results on Test" in page and "data:image/png;base64," in page and "Most confidently" in page
    assert page.count("alt='Grad-CAM ") == 3  # one Test image per class
    assert cli_main(["compare", str(run), str(run), "--out", str(tmp_path / "cmp.md")]) == 0
    table = (tmp_path / "cmp.md").read_text().splitlines()
    assert table[0].startswith("| run | model | n | balanced accuracy") and len(table) == 4
    metrics = json.loads((run / "metrics.json").read_text())["test"]["clean"]
    assert f"{metrics['balanced_accuracy']:.3f}" in table[2]
    assert cli_main(["compare", str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_report_shows_validation_within_each_era(trained, tmp_path):
    import shutil

    _, run = trained
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    metrics = json.loads((copy / "metrics.json").read_text())
    assert "<td>2016-17 archive</td>" not in (copy / "report.html").read_text()  # tiny data: one era only
    metrics["validation_by_era"] = {"2016-17 archive": metrics["validation"], "later": metrics["validation"]}
    (copy / "metrics.json").write_text(json.dumps(metrics))
    assert cli_main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert "Validation (split from Train)" in page and "<td>2016-17 archive</td>" in page and "<td>later</td>" in page


# --- one AUC, one resampler ------------------------------------------------------------------------------------


def test_the_one_auc_matches_scikit_learn_with_ties_and_refuses_one_sided_data():
    from sklearn.metrics import roc_auc_score

    from melanoma.assess.metrics import auc

    rng = np.random.default_rng(3)
    positive = rng.random(300) < 0.3
    score = np.round(rng.random(300) + positive * 0.3, 1)  # many ties
    assert auc(positive, score) == pytest.approx(roc_auc_score(positive, score), abs=1e-12)
    assert auc(np.ones(5, bool), score[:5]) is None and auc(np.zeros(5, bool), score[:5]) is None


def test_every_resample_keeps_each_stratum_s_count_and_is_seeded():
    from melanoma.assess.intervals import stratified_resamples

    strata = np.array([2, 0, 0, 1, 2, 2, 0, 1, 2, 2])
    draws = list(stratified_resamples(strata, 50, seed=4))
    assert len(draws) == 50
    for rows in draws:
        assert sorted(np.bincount(strata[rows]).tolist()) == sorted(np.bincount(strata).tolist())
    again = list(stratified_resamples(strata, 50, seed=4))
    assert all((a == b).all() for a, b in zip(draws, again))
    assert any((a != b).any() for a, b in zip(draws, stratified_resamples(strata, 50, seed=5)))


def test_the_auc_interval_and_the_headline_bootstrap_share_their_resamples():
    from melanoma.assess.intervals import auc_interval, bootstrap_ci

    rng = np.random.default_rng(5)
    labels = rng.integers(0, len(ISIC_CLASSES), 200)
    probs = rng.dirichlet(np.ones(len(ISIC_CLASSES)), 200)
    m = ISIC_CLASSES.index("melanoma")
    ci = bootstrap_ci(labels, probs, ISIC_CLASSES, 0.2, resamples=100, seed=1)["melanoma_auc"]
    alone = auc_interval(labels, labels == m, probs[:, m], resamples=100, seed=1)
    assert (alone["value"], alone["low"], alone["high"]) == (ci["value"], ci["low"], ci["high"])
