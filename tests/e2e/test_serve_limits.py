"""Serving under load and abuse: micro-batching, concurrent Grad-CAM, request guards (token, size, time, host),
image formats and pixel budgets, and the `melanoma serve` flags. Each test takes a second or two."""
from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import jpeg_bytes, lesion_image, train_tiny_run, uvicorn_server
from PIL import Image

from melanoma.deploy import limits as serve_limits
from melanoma.deploy import serve as serve_module
from melanoma.deploy.limits import DEFAULT_ALLOWED_HOSTS, SERVE_TTA, ServeConfig
from melanoma.deploy.serve import create_app, uvicorn_options
from melanoma.runs.run import Run

fastapi = pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

BOUNDARY = "limits-test-boundary"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run.load(train_tiny_run(tmp_path_factory.mktemp("limits"), test_per_class=1)[1])


def _files(*payloads: bytes, kind: str = "image/jpeg"):
    return [("files", (f"img{i}", payload, kind)) for i, payload in enumerate(payloads)]


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


async def _concurrently(app, requests: list[tuple[str, list]]) -> list[httpx.Response]:
    """POST every (url, files) at once through the ASGI app."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as http:
        return await asyncio.gather(*(http.post(url, files=files) for url, files in requests))


class _RecordingRun:
    """The run, with every model call's batch size and the most calls at once recorded (each call made to last at
    least ``seconds``), optionally failing on all-black images."""

    def __init__(self, run, fail_on_black: bool = False, seconds: float = 0.0):
        self.__dict__.update(run.__dict__)
        self._run, self._fail_on_black, self._seconds = run, fail_on_black, seconds
        # mutable, so the copy the server makes of its run shares them
        self.calls, self.at_once, self._lock = [], {"now": 0, "most": 0}, threading.Lock()

    def answers(self, images, batch_size: int = 32):
        with self._lock:
            self.calls.append(len(images))
            self.at_once["now"] += 1
            self.at_once["most"] = max(self.at_once["most"], self.at_once["now"])
        try:
            time.sleep(self._seconds)
            if self._fail_on_black and (images.reshape(len(images), -1).max(axis=1) == 0).any():
                raise ValueError("black image")
            return self._run.answers(images, batch_size)
        finally:
            with self._lock:
                self.at_once["now"] -= 1


# --- micro-batching ------------------------------------------------------------------------------------------


def test_concurrent_requests_share_one_model_call_and_each_gets_its_own_rows(run):
    recording = _RecordingRun(run)
    app = create_app(recording, ServeConfig(max_concurrent=1, batch_wait_ms=400))
    images = [lesion_image(100 + i, 48) for i in range(6)]
    responses = asyncio.run(_concurrently(app, [("/v1/predict", _files(jpeg_bytes(image, 95))) for image in images]))
    assert [r.status_code for r in responses] == [200] * 6
    assert sum(recording.calls) == 6 and len(recording.calls) < 6 and max(recording.calls) > 1
    # each response holds the prediction of its own image, not of a neighbour in the batch
    from melanoma.data.images import decode_image, resize_pixels

    singles = [run.probabilities(np.array([resize_pixels(decode_image(jpeg_bytes(image, 95)).pixels,
                                                         run.image_size)]))[0] for image in images]
    served = [np.array(list(r.json()["results"][0]["probabilities"].values())) for r in responses]
    for position, probabilities in enumerate(served):
        distances = [np.abs(probabilities - single).max() for single in singles]
        assert int(np.argmin(distances)) == position and distances[position] < 1e-4


def test_batches_respect_max_batch_and_a_large_request_runs_alone(run):
    recording = _RecordingRun(run)
    app = create_app(recording, ServeConfig(max_concurrent=1, max_batch=3, batch_wait_ms=300))
    requests = [("/v1/predict", _files(jpeg_bytes(lesion_image(200 + i, 40)))) for i in range(7)]
    requests.append(("/v1/predict", _files(*(jpeg_bytes(lesion_image(300 + i, 40)) for i in range(5)))))
    responses = asyncio.run(_concurrently(app, requests))
    assert all(r.status_code == 200 for r in responses) and len(responses[-1].json()["results"]) == 5
    assert sum(recording.calls) == 12 and 5 in recording.calls
    assert all(size <= 3 for size in recording.calls if size != 5)


def test_a_batch_is_dealt_out_to_the_free_workers_in_equal_slices(run):
    recording = _RecordingRun(run, seconds=0.3)
    app = create_app(recording, ServeConfig(max_concurrent=2, batch_wait_ms=400))
    requests = [("/v1/predict", _files(jpeg_bytes(lesion_image(800 + i, 40)))) for i in range(8)]
    assert all(r.status_code == 200 for r in asyncio.run(_concurrently(app, requests)))
    assert sum(recording.calls) == 8 and 1 < max(recording.calls) <= 4  # 4 + 4, not 8 on one worker
    assert recording.at_once["most"] == 2
    single = _RecordingRun(run, seconds=0.1)
    app = create_app(single, ServeConfig(max_concurrent=1, batch_wait_ms=50))
    assert all(r.status_code == 200 for r in asyncio.run(_concurrently(app, requests)))
    assert single.at_once["most"] == 1  # never more model calls at once than workers


def test_a_failing_request_does_not_fail_the_others_in_its_batch(run):
    recording = _RecordingRun(run, fail_on_black=True)
    app = create_app(recording, ServeConfig(max_concurrent=1, batch_wait_ms=400))
    black = _encoded(np.zeros((40, 40, 3), np.uint8), "PNG")
    requests = [("/v1/predict", _files(jpeg_bytes(lesion_image(400 + i, 40)))) for i in range(3)]
    responses = asyncio.run(_concurrently(app, requests + [("/v1/predict", _files(black, kind="image/png"))]))
    assert [r.status_code for r in responses] == [200, 200, 200, 500]
    assert "inference failed" in responses[-1].json()["detail"]
    assert max(recording.calls) > 1  # they were batched together, then retried one by one


def test_concurrent_gradcam_requests_all_succeed(run):
    # on one shared model, 1 to 6 of each 8 failed with 500 ("differentiated Tensor ... not used in the graph")
    app = create_app(run, ServeConfig(max_concurrent=4))
    payloads = [_files(jpeg_bytes(lesion_image(500 + i, 64)), jpeg_bytes(lesion_image(600 + i, 64)))
                for i in range(8)]
    for _ in range(2):
        responses = asyncio.run(_concurrently(app, [("/v1/predict?explain=true", files) for files in payloads]))
        assert [r.status_code for r in responses] == [200] * 8
        assert all(result["gradcam_png_base64"] for r in responses for result in r.json()["results"])


# --- guards before and while the body is read ------------------------------------------------------------------


def _scope(path: str = "/v1/predict", headers: dict | None = None) -> dict:
    headers = {"host": "localhost", "content-type": f"multipart/form-data; boundary={BOUNDARY}"} | (headers or {})
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


def _call(app, scope: dict, stall_after: int | None = None) -> tuple[int, list[int]]:
    """Run one request through the ASGI app, its body an endless multipart file part in 64 KB chunks (stalling after
    ``stall_after`` of them): (status, the sizes of the body chunks the app pulled)."""
    part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    pulled: list[int] = []

    async def receive():
        if stall_after is not None and len(pulled) >= stall_after:
            await asyncio.sleep(3600)
        chunk = (b"" if pulled else part).ljust(65536, b"x")
        pulled.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": True}

    messages = []

    async def send(message):
        messages.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return next(m["status"] for m in messages if m["type"] == "http.response.start"), pulled


def test_no_token_is_401_before_any_of_the_body_is_read(run):
    app = create_app(run, ServeConfig(token="s3cret"))
    status, pulled = _call(app, _scope(headers={"content-length": "2000000000"}))
    assert status == 401 and pulled == []
    status, pulled = _call(app, _scope(headers={"authorization": "Bearer wrong"}))
    assert status == 401 and pulled == []


def test_oversized_declared_body_is_413_before_any_of_it_is_read(run):
    app = create_app(run, ServeConfig(max_upload_bytes=100_000, max_files=2))
    status, pulled = _call(app, _scope(headers={"content-length": str(2 * 100_000 + 64 * 1024 + 1)}))
    assert status == 413 and pulled == []


def test_chunked_body_is_cut_off_with_413_at_the_cap(run):
    app = create_app(run, ServeConfig(max_upload_bytes=100_000, max_files=2))  # cap: 265,536 bytes
    status, pulled = _call(app, _scope(headers={"transfer-encoding": "chunked"}))  # an endless body
    assert status == 413 and sum(pulled) <= 265_536 + 65_536


def test_body_that_does_not_arrive_in_time_is_408(run):
    app = create_app(run, ServeConfig(body_timeout_s=0.3))
    started = time.perf_counter()
    status, pulled = _call(app, _scope(headers={"content-length": "100000"}), stall_after=1)
    assert status == 408 and pulled == [65536] and time.perf_counter() - started < 8


@contextmanager
def _server(app, config: ServeConfig):
    """A real uvicorn with the options `melanoma serve` uses, on a free loopback port; yields the port."""
    with uvicorn_server(app, uvicorn_options("127.0.0.1", 0, config) | {"log_level": "warning"}) as url:
        yield int(url.rsplit(":", 1)[1])


def _until_closed(port: int, data: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes the connection; (everything read, seconds it took)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.perf_counter()
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received, time.perf_counter() - started


def test_real_server_refuses_a_declared_gigabyte_at_once_and_times_out_a_dripping_body(run):
    config = ServeConfig(body_timeout_s=0.5, keep_alive_s=1)
    with _server(create_app(run, config), config) as port:
        head = ("POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n")
        answer, seconds = _until_closed(port, (head + "Content-Length: 1000000000\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 413") and seconds < 8  # no byte of the body was ever sent
        answer, seconds = _until_closed(port, (head + "Content-Length: 1000\r\n\r\n--" + BOUNDARY).encode())
        assert answer.startswith(b"HTTP/1.1 408") and 0.4 < seconds < 8  # and the connection is closed


def test_real_server_closes_idle_keep_alive_connections(run):
    config = ServeConfig(keep_alive_s=1)
    with _server(create_app(run, config), config) as port:
        answer, seconds = _until_closed(port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and 0.8 < seconds < 8


def test_unknown_host_is_refused(run):
    client = TestClient(create_app(run, ServeConfig(allowed_hosts=(*DEFAULT_ALLOWED_HOSTS, "clinic.example"))))
    assert client.get("/health", headers={"Host": "rebound.attacker.example"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "clinic.example"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host


# --- formats and pixels -------------------------------------------------------------------------------------


def test_every_accepted_format_is_predicted(run):
    client = TestClient(create_app(run), base_url="http://localhost")
    pixels = lesion_image(700, 48)
    payloads = [_encoded(pixels, fmt) for fmt in ("JPEG", "PNG", "TIFF", "BMP", "WEBP")]
    response = client.post("/v1/predict", files=_files(*payloads, kind="application/octet-stream"))
    assert response.status_code == 200 and len(response.json()["results"]) == 5


def test_eps_and_other_formats_are_415_and_ghostscript_never_runs(run, monkeypatch):
    from PIL import EpsImagePlugin

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: called.append(args))
    client = TestClient(create_app(run), base_url="http://localhost")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\n0 0 moveto 40 40 lineto stroke\nshowpage\n%%EOF\n"
    pixels = lesion_image(701, 40)
    for payload in (eps, _encoded(pixels, "GIF"), _encoded(pixels, "PDF"), _encoded(pixels, "ICO")):
        response = client.post("/v1/predict", files=_files(payload, kind="image/jpeg"))
        assert response.status_code == 415 and "accepted format" in response.json()["detail"]
    assert called == []


def test_pixel_budget_is_checked_from_headers_before_decoding(run, monkeypatch):
    decoded = []
    real_decode = serve_limits.decode_image
    monkeypatch.setattr(serve_limits, "decode_image", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    client = TestClient(create_app(run), base_url="http://localhost")
    solid = io.BytesIO()
    Image.new("L", (7000, 7000), 128).save(solid, format="PNG")  # the 49 MP solid-colour PNG, ~50 KB
    response = client.post("/v1/predict", files=_files(*[solid.getvalue()] * 16, kind="image/png"))
    assert response.status_code == 413 and "pixels" in response.json()["detail"]
    assert decoded == []  # refused from the headers: not one of the 16 images was decoded
    small = TestClient(create_app(run, ServeConfig(max_request_pixels=3000)), base_url="http://localhost")
    one = jpeg_bytes(lesion_image(702, 40))  # 1,600 pixels: one fits the budget, two do not
    assert small.post("/v1/predict", files=_files(one)).status_code == 200
    assert small.post("/v1/predict", files=_files(one, one)).status_code == 413


# --- `melanoma serve` flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, named", [
    (["--concurrency", "0"], "--concurrency"), (["--queue", "-1"], "--queue"), (["--port", "0"], "--port"),
    (["--port", "70000"], "--port"), (["--max-upload-mb", "0"], "--max-upload-mb"),
    (["--max-upload-mb", "nan"], "--max-upload-mb"), (["--max-request-megapixels", "-5"], "--max-request-megapixels"),
    (["--max-batch", "0"], "--max-batch"), (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
    (["--body-timeout", "0"], "--body-timeout"), (["--keep-alive", "0"], "--keep-alive"),
    (["--token", ""], "--token"), (["--token", "   "], "--token"),
    (["--allowed-hosts", "clinic.example:8000"], "--allowed-hosts")])
def test_bad_serve_flags_stop_with_one_line(flags, named, tmp_path, capsys, monkeypatch):
    from melanoma.cli.main import main

    monkeypatch.delenv("MELANOMA_TOKEN", raising=False)
    try:
        code = main(["serve", str(tmp_path / "no-run"), *flags])
    except SystemExit as stop:  # a value argparse itself refuses (after its usage line)
        code = stop.code
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "error: " in error and named in error and "Traceback" not in error


def test_empty_token_in_the_environment_is_refused(tmp_path, capsys, monkeypatch):
    from melanoma.cli.main import main

    monkeypatch.setenv("MELANOMA_TOKEN", " ")
    assert main(["serve", str(tmp_path / "no-run")]) == 2
    assert "MELANOMA_TOKEN is empty" in capsys.readouterr().err


def test_serve_flags_reach_the_config(tmp_path, monkeypatch):
    from melanoma.cli.main import main

    seen = {}
    monkeypatch.setattr(serve_module, "serve", lambda run, host, port, config: seen.update(config=config, host=host))
    flags = ["--allowed-hosts", "a.example", "--allowed-hosts", "b.example", "c.example", "--max-batch", "8",
             "--batch-wait-ms", "2", "--body-timeout", "12", "--keep-alive", "3", "--max-request-megapixels", "50"]
    assert main(["serve", str(tmp_path), *flags]) == 0
    config = seen["config"]
    assert config.allowed_hosts == (*DEFAULT_ALLOWED_HOSTS, "a.example", "b.example", "c.example")
    assert (config.max_batch, config.batch_wait_ms, config.body_timeout_s, config.keep_alive_s,
            config.max_request_pixels, config.tta) == (8, 2.0, 12.0, 3, 50_000_000, SERVE_TTA)
    assert main(["serve", str(tmp_path), "--tta"]) == 0 and seen["config"].tta is True


def test_serve_passes_timeouts_to_uvicorn_and_allows_its_own_host(run, monkeypatch):
    import torch
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(app=app, options=options))
    threads = torch.get_num_threads()
    try:
        serve_module.serve(str(run.path), host="10.1.2.3", port=8123, config=ServeConfig(keep_alive_s=7))
    finally:
        torch.set_num_threads(threads)
    assert seen["options"]["timeout_keep_alive"] == 7 and seen["options"]["timeout_graceful_shutdown"]
    client = TestClient(seen["app"])
    assert client.get("/health", headers={"Host": "10.1.2.3:8123"}).status_code == 200
    assert client.get("/health", headers={"Host": "elsewhere.example"}).status_code == 400
