"""ONNX export: parity with PyTorch, metadata, the onnxruntime predictor, and an ONNX file that does not match."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import CLASSES, train_tiny_run

from melanoma.cli.main import main as cli_main
from melanoma.core.errors import RunError
from melanoma.deploy.predict import predict_files
from melanoma.runs.run import Run

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    data, run = train_tiny_run(tmp_path_factory.mktemp("export"), tta=True)
    assert cli_main(["export", str(run)]) == 0
    return data, run


def test_export_writes_a_verified_model_with_metadata(exported):
    _, run = exported
    model = onnx.load(str(run / "model.onnx"))
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["classes"]) == list(CLASSES) and metadata["image_size"] == "32"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnx_and_pytorch_predict_the_same(exported):
    data, run = exported
    images = np.random.default_rng(0).integers(0, 255, (5, 40, 40, 3), dtype=np.uint8)
    torch_run, onnx_run = Run.load(run, backend="torch"), Run.load(run)
    assert onnx_run.backend == "onnx" and torch_run.backend == "torch"
    assert np.abs(torch_run.probabilities(images) - onnx_run.probabilities(images)).max() < 1e-4
    files = [(p.name, p) for p in sorted((data / "Test" / "melanoma").iterdir())]
    a, b = predict_files(torch_run, files), predict_files(onnx_run, files)
    assert [x.top_class for x in a] == [x.top_class for x in b]


def test_colour_constancy_and_input_blur_are_exported_inside_the_model(tmp_path):
    _, run = train_tiny_run(tmp_path, colour_constancy=6.0, input_blur=1.2)
    assert cli_main(["export", str(run)]) == 0
    images = np.random.default_rng(1).integers(0, 255, (4, 40, 40, 3), dtype=np.uint8)
    images[..., 2] //= 3  # a strong colour cast, so the correction matters
    torch_run, onnx_run = Run.load(run, backend="torch"), Run.load(run)
    assert torch_run.model.colour.power == 6.0 and torch_run.model.blur.radius == 4
    assert np.abs(torch_run.probabilities(images) - onnx_run.probabilities(images)).max() < 1e-4


def test_an_onnx_file_from_another_run_is_refused(exported, tmp_path):
    _, run = exported
    other = tmp_path / "other"
    shutil.copytree(run, other)
    model = onnx.load(str(other / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps(["a", "b", "c"])
    onnx.save(model, str(other / "model.onnx"))
    with pytest.raises(RunError, match="does not match its run"):
        Run.load(other)
    (other / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(RunError, match="not a loadable ONNX model"):
        Run.load(other)
    (other / "model.onnx").unlink()
    with pytest.raises(RunError, match="no model.onnx"):
        Run.load(other, backend="onnx")
    assert Run.load(other).backend == "torch"


def test_a_run_without_calibration_falls_back_with_a_warning(exported, tmp_path):
    _, run = exported
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "model.onnx").unlink()
    metrics = json.loads((bare / "metrics.json").read_text())
    temperature = metrics.pop("calibration")["temperature"]
    (bare / "metrics.json").write_text(json.dumps(metrics))
    with pytest.warns(UserWarning, match="no calibration"):
        uncalibrated = Run.load(bare)
    calibrated = Run.load(run, backend="torch")
    assert uncalibrated.temperature == 1.0 and calibrated.temperature == pytest.approx(temperature)
    images = np.random.default_rng(1).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    from melanoma.models.probabilities import apply_temperature

    assert np.allclose(apply_temperature(uncalibrated.probabilities(images), temperature),
                       calibrated.probabilities(images), atol=1e-5)


def test_onnx_and_pytorch_gate_images_the_same(exported):
    from conftest import lesion_image

    _, run = exported
    rng = np.random.default_rng(3)
    images = np.stack([lesion_image(900 + i, 40) for i in range(6)]
                      + [np.full((40, 40, 3), c, np.uint8) for c in (0, 255, 128)]
                      + [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)])
    torch_run, onnx_run = Run.load(run, backend="torch"), Run.load(run)
    assert onnx_run.backend == "onnx" and onnx_run.gate is not None
    a, b = torch_run.answers(images), onnx_run.answers(images)
    assert (a.in_distribution == b.in_distribution).all() and not a.in_distribution[6:9].any()
    assert np.allclose(a.ood_scores, b.ood_scores, rtol=1e-3, atol=1e-3)


def test_an_onnx_file_without_the_gate_outputs_is_refused_or_bypassed(exported, tmp_path):
    _, run = exported
    old = tmp_path / "old"
    shutil.copytree(run, old)
    model = onnx.load(str(old / "model.onnx"))
    del model.graph.output[1:]
    onnx.save(model, str(old / "model.onnx"))
    with pytest.raises(RunError, match="predates the out-of-distribution gate"):
        Run.load(old, backend="onnx")
    with pytest.warns(UserWarning, match="predates the out-of-distribution gate"):
        assert Run.load(old).backend == "torch"
