"""Serving: every endpoint and error through FastAPI's TestClient, the busy gate, and a real uvicorn server."""
from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
from conftest import CLASSES, jpeg_bytes, lesion_image, train_tiny_run, uvicorn_server
from PIL import Image

from melanoma.deploy.limits import ServeConfig
from melanoma.deploy.serve import create_app
from melanoma.runs.run import Run

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _, path = train_tiny_run(tmp_path_factory.mktemp("serve"), test_per_class=1)
    return Run.load(path)


@pytest.fixture(scope="module")
def client(run):
    return TestClient(create_app(run, ServeConfig(max_upload_bytes=200_000)), base_url="http://localhost")


def _files(*payloads: bytes):
    return [("files", (f"img{i}.jpg", payload, "image/jpeg")) for i, payload in enumerate(payloads)]


def test_health_and_model_card(client, run):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.head("/health").status_code == 200
    card = client.get("/v1/model").json()
    assert card["classes"] == list(CLASSES) and card["alert_threshold"] == run.threshold
    assert "not a medical device" in card["model_card"]
    assert card["tta"] is False and card["serving"]["tta"] is False  # serving default: no TTA (SERVE_TTA)
    assert card["serving"]["max_batch"] == 32 and card["serving"]["max_upload_bytes"] == 200_000
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def test_tta_setting_is_the_servers_own_and_reported(run):
    served = TestClient(create_app(run, ServeConfig(tta=True)), base_url="http://localhost")
    assert served.get("/v1/model").json()["tta"] is True
    as_evaluated = TestClient(create_app(run, ServeConfig(tta=None)), base_url="http://localhost")
    assert as_evaluated.get("/v1/model").json()["tta"] is run.tta
    assert run.tta is Run.load(run.path).tta  # the loaded run itself is not changed


def test_predict_one_and_several_images(client, run):
    response = client.post("/v1/predict", files=_files(jpeg_bytes(lesion_image(1)), jpeg_bytes(lesion_image(2))))
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 2
    for result in results:
        assert set(result["probabilities"]) == set(CLASSES)
        assert abs(sum(result["probabilities"].values()) - 1) < 1e-4
        assert result["melanoma_alert"] == (result["melanoma_probability"] >= run.threshold)
        assert result["top_class"] == max(result["probabilities"], key=result["probabilities"].get)


def test_predict_with_gradcam_overlay(client):
    result = client.post("/v1/predict?explain=true", files=_files(jpeg_bytes(lesion_image(3)))).json()["results"][0]
    import base64

    overlay = Image.open(io.BytesIO(base64.b64decode(result["gradcam_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (64, 64)


def test_oversized_upload_is_413(client):
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    payload = jpeg_bytes(big, quality=100)
    assert len(payload) > 200_000
    response = client.post("/v1/predict", files=_files(payload))
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_non_image_is_415_and_bomb_is_422(client):
    response = client.post("/v1/predict", files=[("files", ("notes.jpg", b"just text", "image/jpeg"))])
    assert response.status_code == 415 and "not an image" in response.json()["detail"]
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    response = client.post("/v1/predict", files=[("files", ("bomb.png", buffer.getvalue(), "image/png"))])
    assert response.status_code == 422 and "decompression bomb" in response.json()["detail"]
    assert client.post("/v1/predict").status_code == 422  # no files at all


def test_client_file_names_never_reach_the_filesystem(client, tmp_path):
    response = client.post("/v1/predict", files=[("files", ("../../etc/passwd", jpeg_bytes(lesion_image(4)),
                                                            "image/jpeg"))])
    assert response.status_code == 200 and "passwd" not in response.text


def test_bearer_token(run):
    guarded = TestClient(create_app(run, ServeConfig(token="s3cret")), base_url="http://localhost")
    assert guarded.get("/health").status_code == 200
    assert guarded.get("/").status_code == 200  # the page; its script sends the token from the URL fragment
    for path in ("/docs", "/openapi.json"):
        assert guarded.get(path).status_code == 401
        assert guarded.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert guarded.get("/v1/model").status_code == 401
    assert guarded.get("/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    files = _files(jpeg_bytes(lesion_image(5)))
    assert guarded.post("/v1/predict", files=files).status_code == 401


def test_page_and_docs_are_served_without_external_resources(client):
    page = client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: these machines have no internet
    docs = client.get("/docs")
    assert docs.status_code == 200 and "POST /v1/predict" in docs.text and "/openapi.json" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text and "<script" not in docs.text
    assert client.get("/redoc").status_code == 404


class _SlowRun:
    """Wraps a run so that each inference takes a while, to fill the gate."""

    def __init__(self, run, seconds: float):
        self.__dict__.update(run.__dict__)
        self._run, self._seconds = run, seconds

    def answers(self, images, batch_size: int = 32):
        time.sleep(self._seconds)
        return self._run.answers(images, batch_size)


def test_busy_server_answers_503_with_retry_after(run):
    import httpx

    app = create_app(_SlowRun(run, 0.6), ServeConfig(max_concurrent=1, queue_size=0, retry_after_s=3))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            first = asyncio.create_task(http.post("/v1/predict", files=_files(jpeg_bytes(lesion_image(6)))))
            await asyncio.sleep(0.2)
            second = await http.post("/v1/predict", files=_files(jpeg_bytes(lesion_image(7))))
            return await first, second

    first, second = asyncio.run(scenario())
    assert first.status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "3"


def test_real_uvicorn_server_on_loopback(run):
    import httpx

    with uvicorn_server(create_app(run)) as base, httpx.Client(base_url=base, timeout=20) as http:
        assert http.get("/health").json() == {"status": "ok"}
        response = http.post("/v1/predict", files=_files(jpeg_bytes(lesion_image(8))))
        assert response.status_code == 200 and response.json()["results"][0]["top_class"] in CLASSES


def test_the_gate_answers_in_the_json_and_an_out_of_distribution_image_gets_no_alert(client, run):
    blank = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(blank, format="PNG")
    response = client.post("/v1/predict?explain=true",
                           files=_files(jpeg_bytes(lesion_image(3)), blank.getvalue()))
    assert response.status_code == 200
    lesion, white = response.json()["results"]
    assert isinstance(lesion["in_distribution"], bool) and isinstance(lesion["ood_score"], float)
    assert white["in_distribution"] is False and white["melanoma_alert"] is None
    assert "does not look like a dermoscopic lesion image" in white["reason"]
    assert white["ood_score"] > run.gate.threshold
    assert client.get("/v1/model").json()["ood_gate"]["detector"] == run.gate.detector
