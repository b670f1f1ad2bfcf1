"""predict and explain on every kind of bad image the audit knows: a per-image error, the others still answered."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import jpeg_bytes, lesion_image, save_image, train_tiny_run
from PIL import Image

from melanoma.assess.explain import explain_files
from melanoma.deploy.predict import collect_inputs, predict_files
from melanoma.runs.run import Run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run.load(train_tiny_run(tmp_path_factory.mktemp("inference"))[1])


def _bad_and_odd_images(folder):
    """(file, expected error or None). Odd-but-valid images must be predicted; broken ones must carry an error."""
    pixels = lesion_image(5, 64)
    save_image(folder / "good.jpg", pixels)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    (folder / "truncated.jpg").write_bytes(jpeg_bytes(lesion_image(6, 128))[:700])
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 128, dtype=np.uint8)])
    save_image(folder / "alpha.png", rgba)
    Image.fromarray(pixels).convert("L").save(folder / "gray.png")
    Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(folder / "rotated.jpg", exif=exif)
    return {"good.jpg": None, "zero.jpg": "empty file", "text.jpg": "not an image",
            "truncated.jpg": "truncated or corrupt", "bomb.png": "decompression bomb", "alpha.png": None,
            "gray.png": None, "cmyk.jpg": None, "deep.png": None, "rotated.jpg": None}


def test_predict_reports_each_bad_image_and_predicts_the_rest(run, tmp_path):
    expected = _bad_and_odd_images(tmp_path)
    predictions = {p.image: p for p in predict_files(run, collect_inputs([tmp_path]), batch_size=4)}
    assert set(predictions) == set(expected)
    for name, error in expected.items():
        if error is None:
            assert predictions[name].error is None and abs(sum(predictions[name].probabilities.values()) - 1) < 1e-4
        else:
            assert error in predictions[name].error and name in predictions[name].error
            assert not predictions[name].probabilities


def test_explain_reports_each_bad_image_and_explains_the_rest(run, tmp_path):
    expected = _bad_and_odd_images(tmp_path)
    explanations = {e.image: e for e in explain_files(run, collect_inputs([tmp_path]))}
    for name, error in expected.items():
        if error is None:
            assert explanations[name].error is None
            assert explanations[name].heatmap.shape == explanations[name].pixels.shape[:2]
        else:
            assert error in explanations[name].error
