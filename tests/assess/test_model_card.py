"""RUN/MODEL_CARD.md: written at the end of training and by `melanoma report`, in the Hugging Face layout, with every
number equal to metrics.json's."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import train_tiny_run

from melanoma.assess.model_card import CARD, CARD_METRICS, subgroup_markdown
from melanoma.assess.subgroups import format_ci
from melanoma.cli.main import main as cli_main

SECTIONS = ("## Model details", "## Intended use", "## Out-of-scope use", "## Training data and known biases",
            "## Evaluation data", "## Metrics", "## Metrics per subgroup", "## Out-of-distribution behaviour",
            "## Limitations")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("card"), per_class=10, test_per_class=3, bootstrap=20)


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_training_writes_a_card_whose_numbers_are_metrics_json(trained):
    _, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    header, body = _split((run / CARD).read_text())
    assert header["license"] and "not-a-medical-device" in header["tags"] and header["datasets"] == ["data"]
    assert set(header["metrics"]) == {kind for kind, _ in CARD_METRICS.values()}
    results = header["model-index"][0]["results"]
    assert [r["dataset"]["split"] for r in results] == [f"Test ({s} images, n={metrics['test'][s]['n']})"
                                                        for s in ("all", "clean")]
    for result, subset in zip(results, ("all", "clean")):
        ci = metrics["test"][subset]["ci"]
        expected = {CARD_METRICS[key][0]: ci[key]["value"] for key in CARD_METRICS if ci[key]["value"] is not None}
        assert {m["type"]: m["value"] for m in result["metrics"]} == expected  # exact: read, never retyped
    for title in SECTIONS:
        assert f"\n{title}\n" in body
    assert "Not a medical device" in body
    for subset in ("all", "clean"):
        ci = metrics["test"][subset]["ci"]
        row = f"| {subset} | {metrics['test'][subset]['n']} | " + " | ".join(format_ci(ci[k]) for k in CARD_METRICS)
        assert row in body
    for split in ("validation", "test"):
        for line in subgroup_markdown(metrics["subgroups"][split])[2:]:
            assert line in body
    first = metrics["subgroups"]["validation"]["data source"]["groups"][0]
    assert f"| data source | {first['group']} | {first['n']} | {first['melanomas']} | " in body
    assert "| sex | — | 0 | — | | | | | not recorded for any image |" in body  # no metadata given to this run


def test_report_rewrites_the_card_with_the_gate_or_without(trained, tmp_path, capsys):
    _, run = trained
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    metrics = json.loads((copy / "metrics.json").read_text())
    for key in ("ood", "ood_gate", "consistency"):
        metrics.pop(key, None)
    (copy / "metrics.json").write_text(json.dumps(metrics))
    (copy / CARD).unlink()
    assert cli_main(["report", str(copy)]) == 0
    assert f"wrote {copy / CARD}" in capsys.readouterr().out
    card = (copy / CARD).read_text()
    assert "No gate fitted" in card and "## Rendering consistency" not in card
    metrics["ood"] = {"detector": "mahalanobis", "validation_pass_rate": 0.9531, "far": {"noise": {"rejected": 0.987}}}
    metrics["consistency"] = {"stresses": {"stresses": {"jpeg": {"n": 40, "top_class_changed": 0.125}}}}
    (copy / "metrics.json").write_text(json.dumps(metrics))
    assert cli_main(["report", str(copy)]) == 0
    card = (copy / CARD).read_text()
    assert "No gate fitted" not in card
    assert "| validation_pass_rate | 0.9531 |" in card and "| far / noise / rejected | 0.987 |" in card
    assert "## Rendering consistency" in card and "| stresses / stresses / jpeg / top_class_changed | 0.125 |" in card


def test_the_card_header_is_valid_hugging_face_metadata(trained):
    """huggingface_hub's own parser reads the header as ModelCardData and the model-index as EvalResults, strictly
    (it raises on metadata it cannot read), with the same values as metrics.json."""
    from huggingface_hub import ModelCard

    _, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    card = ModelCard((run / CARD).read_text(), ignore_metadata_errors=False)
    assert card.data.license and card.data.pipeline_tag == "image-classification"
    results = card.data.eval_results
    assert results and {r.task_type for r in results} == {"image-classification"}
    for subset in ("all", "clean"):
        ci = metrics["test"][subset]["ci"]
        got = {r.metric_type: r.metric_value for r in results if r.dataset_split.startswith(f"Test ({subset} ")}
        assert got == {CARD_METRICS[key][0]: ci[key]["value"] for key in CARD_METRICS if ci[key]["value"] is not None}
