"""``melanoma serve RUN``: a REST API and a web page for the clinic (FastAPI + uvicorn).

Endpoints: ``GET|HEAD /health``, ``GET /v1/model`` (classes, threshold, validation metrics, model card, serving
settings), ``POST /v1/predict`` (multipart ``files``; ``?explain=true`` adds a Grad-CAM overlay), the page at ``/``,
an offline API reference at ``/docs`` and the schema at ``/openapi.json``. Swagger UI is not served: it loads from a
CDN, and the page and the API work offline.

Serving limits (defaults; ``melanoma serve --help`` names the flag for each):

- **Hosts**: the ``Host`` header must name localhost, 127.0.0.1, ::1 or the ``--host`` given
  (``--allowed-hosts`` adds names), else 400, so a DNS-rebinding web page cannot reach the API. The server binds
  to 127.0.0.1 unless told otherwise.
- **Token**: with ``--token`` (or ``MELANOMA_TOKEN``) every path except ``/`` and ``/health`` needs
  ``Authorization: Bearer TOKEN``, compared in constant time from the headers alone (401 before any of the body is
  read). An empty or whitespace token is refused at start.
- **Body size**: at most 16 images of 10 MB each (``--max-upload-mb``). A declared Content-Length over
  16 x 10 MB + 64 KB gets 413 before the body is read; a chunked body is counted as it arrives and cut off with
  413 at the same cap; one file over 10 MB gets 413.
- **Body time**: the whole body must arrive within 30 s of the request's headers (``--body-timeout``), else 408
  and the connection is closed; idle keep-alive connections close after 5 s (``--keep-alive``). uvicorn has no
  timeout for the headers themselves: put a reverse proxy in front before exposing the server beyond loopback.
- **Formats**: JPEG, PNG, TIFF, BMP and WebP, identified from the bytes (never the file name or content type) with
  only those Pillow plugins before anything is decoded; anything else (EPS, PDF, GIF, text) gets 415, so no other
  decoder (Ghostscript for EPS) ever runs.
- **Pixels**: one image over 50 MP is refused as a decompression bomb (422); the images of one request may hold
  100 MP together (``--max-request-megapixels``), read from their headers before decoding (413). That is four
  full-size dermoscopy originals (6000 x 4000 = 24 MP) or sixteen 2500 x 2500 images per request. Images are
  decoded one at a time and shrunk to the model's input at once (Grad-CAM overlays to at most 512 px), at most
  ``--concurrency`` decodes at a time, so memory does not grow with the number of images.
- **Load**: concurrent requests are batched: when an inference worker is free, the images waiting (after up to
  5 ms for more to arrive, ``--batch-wait-ms``) are dealt out in fair shares of at most 32 images
  (``--max-batch``) to the free ones of ``--concurrency`` (2) workers, one model call per share, each worker on
  its share of the cores. At most concurrency + queue (2 + 32) requests are in flight; beyond that 503 with
  Retry-After.
- **Out-of-distribution gate**: with a fitted gate (``ood_gate.npz``, see :mod:`melanoma.models.ood`) every result says
  ``in_distribution`` and ``ood_score``, read from the same model call as the probabilities; an image judged out of
  distribution gets no alert (``melanoma_alert`` null) and a ``reason`` (the page shows neither bars nor
  Grad-CAM for it). Without a gate
  ``in_distribution`` is null.
- **Test-time augmentation**: off when serving (``melanoma.deploy.limits.SERVE_TTA``; ``--tta`` turns it on, 8x the
  compute per image); ``/v1/model`` reports the setting under ``tta``.

Client file names never touch the filesystem or the logs; logs carry sizes, counts and timings, never image
content. A research tool, not a medical device.
"""
import asyncio
import base64
import contextlib
import copy
import hmac
import html
import io
import logging
import os
import threading
import time
from dataclasses import replace
from importlib.resources import files

from melanoma.deploy.batching import Batcher, Gate
from melanoma.deploy.limits import (
    RequestGuard,
    ServeConfig,
    check_port,
    decode_payloads,
    host_patterns,
    read_capped,
    resolve_token,
)
from melanoma.runs.layout import METRICS

LOG = logging.getLogger("melanoma.serve")
DISCLAIMER = ("Research tool, not a medical device. It does not diagnose; every lesion of concern needs a "
              "dermatologist's examination.")
class _GradCam:
    """Grad-CAM on a private copy of the model, one explanation at a time. Captum hooks the model's last
    convolution; on a shared model, concurrent explanations (or predictions) would see each other's activations."""

    def __init__(self, run):
        self.run = run
        self.lock = threading.Lock()
        self.model = None

    def overlay_png(self, model_pixels, display_pixels, target: int) -> str:
        import numpy as np
        from PIL import Image

        from melanoma.assess.explain import grad_cam, overlay

        with self.lock:
            if self.model is None:
                self.model = copy.deepcopy(self.run.model)
            # the heat of exactly the input that was predicted, then stretched over the displayed picture
            heat, _ = grad_cam(self.model, model_pixels, self.run.image_size, target=target)
        height, width = display_pixels.shape[:2]
        heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))
        buffer = io.BytesIO()
        Image.fromarray(overlay(display_pixels, np.clip(heat, 0, 1))).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(run, config: ServeConfig | None = None):
    """The FastAPI app serving one loaded run (:class:`melanoma.runs.run.Run`), behind the host and request guards."""
    from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    config = config or ServeConfig()
    config.check()
    token = resolve_token(config.token)
    served = copy.copy(run)  # the run as served: its own TTA setting, the same model and session
    if config.tta is not None:
        served.tta = config.tta
    gate = Gate(config.max_concurrent + config.queue_size)
    batcher = Batcher(lambda images: served.answers(images, batch_size=config.max_batch),
                       workers=config.max_concurrent, max_batch=config.max_batch, wait_s=config.batch_wait_ms / 1000)
    gradcam = _GradCam(served)
    decode_slots = threading.BoundedSemaphore(config.max_concurrent)
    settings = serving_settings(served, config, token_required=token is not None)
    bearer = HTTPBearer(auto_error=False)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        batcher.stop()

    app = FastAPI(title="melanoma", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Dermoscopic lesion classification with a melanoma alert. " + DISCLAIMER)
    app.add_middleware(RequestGuard, token=token, max_body_bytes=config.max_body_bytes,
                       body_timeout_s=config.body_timeout_s)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=host_patterns(config.allowed_hosts), www_redirect=False)

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        # the guard has already checked; this declares the scheme in the OpenAPI schema and checks once more
        if token is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_Busy)
    async def busy(_: Request, exc: Exception):
        return JSONResponse({"detail": "server busy: too many requests waiting; retry shortly"}, status_code=503,
                            headers={"Retry-After": str(config.retry_after_s)})

    @app.head("/health", summary="Liveness check (headers only)", operation_id="health_head")
    @app.get("/health", summary="Liveness check")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", summary="The served model: classes, alert threshold, validation metrics, model card, "
             "serving settings", dependencies=[Depends(authorised)])
    async def model_info() -> dict:
        return model_card(served) | {"serving": settings}

    @app.post("/v1/predict", summary="Classify one or more dermoscopic images",
              dependencies=[Depends(authorised)])
    async def predict(files: list[UploadFile] = File(..., description="image files: JPEG, PNG, TIFF, BMP or WebP"),
                      explain: bool = Query(False, description="add a Grad-CAM overlay (PNG, base64)")) -> dict:
        if len(files) > config.max_files:
            raise HTTPException(413, f"at most {config.max_files} images per request")
        payloads = [await read_capped(upload, config.max_upload_bytes) for upload in files]
        if not gate.try_enter():
            raise _Busy()
        try:
            started = time.perf_counter()
            images = await run_in_threadpool(decode_payloads, payloads, served.image_size, config, decode_slots,
                                              explain)
            try:
                answers = await asyncio.wrap_future(batcher.submit(images.model_pixels))
            except Exception:
                LOG.exception("inference failed for %d image(s)", len(payloads))
                raise HTTPException(500, "inference failed; the server log has the details") from None
            results = [_result(served, answers, position) for position in range(len(answers))]
            if explain:
                for position, result in enumerate(results):
                    result["gradcam_png_base64"] = await run_in_threadpool(
                        gradcam.overlay_png, images.model_pixels[position], images.display_pixels[position],
                        int(answers.probabilities[position].argmax()))
        finally:
            gate.leave()
        LOG.info("predict: %d image(s), %d bytes, %.0f ms", len(payloads), sum(len(p) for p in payloads),
                 (time.perf_counter() - started) * 1000)
        return {"results": results, "alert_threshold": served.threshold, "disclaimer": DISCLAIMER}

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> str:
        return _docs_page(app.openapi())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return files("melanoma.deploy").joinpath("web/index.html").read_text(encoding="utf-8")

    return app


class _Busy(Exception):
    pass


def _version() -> str:
    from melanoma import __version__

    return __version__


def _result(run, answers, position: int) -> dict:
    """One image's answer; out of distribution: no alert, and the reason."""
    from melanoma.data.records import MELANOMA
    from melanoma.models.ood import REASON

    values = {c: round(float(p), 6) for c, p in zip(run.classes, answers.probabilities[position])}
    top = max(values, key=values.get)
    melanoma = values.get(MELANOMA)
    gated = answers.in_distribution is not None
    passed = bool(answers.in_distribution[position]) if gated else None
    alert = None if melanoma is None or run.threshold is None or passed is False else bool(melanoma >= run.threshold)
    return {"probabilities": values, "top_class": top, "melanoma_probability": melanoma, "melanoma_alert": alert,
            "in_distribution": passed, "ood_score": round(float(answers.ood_scores[position]), 6) if gated else None,
            "reason": REASON if passed is False else None}


def model_card(run) -> dict:
    from melanoma.core.io import read_json

    metrics_path = run.path / METRICS
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    validation = metrics.get("validation", {})
    config = run.config["config"]
    card = (f"{run.config['model']['name']} trained by `melanoma train` ({config.get('recipe')} recipe, seed "
            f"{config.get('seed')}) on {len(run.classes)} dermoscopic lesion classes at {run.image_size} px. "
            f"The melanoma alert fires when p(melanoma) >= {run.threshold}, a threshold chosen on the validation "
            f"split for sensitivity {(metrics.get('alert') or {}).get('target_sensitivity')}. " + DISCLAIMER)
    return {"name": run.config["model"]["name"], "version": _version(), "run": run.path.name,
            "classes": run.classes, "image_size": run.image_size, "backend": run.backend, "tta": run.tta,
            "alert_threshold": run.threshold, "temperature": run.temperature,
            "ood_gate": None if run.gate is None else {"detector": run.gate.detector, "threshold": run.gate.threshold},
            "validation_metrics": {k: validation.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
            | {"melanoma_auc": (validation.get("melanoma") or {}).get("auc")},
            "model_card": card}


def serving_settings(run, config: ServeConfig, token_required: bool) -> dict:
    """What the server does with a request: batching, TTA and every limit (also for benchmark records)."""
    return {"tta": run.tta, "inference_workers": config.max_concurrent, "queue": config.queue_size,
            "max_batch": config.max_batch, "batch_wait_ms": config.batch_wait_ms, "max_files": config.max_files,
            "max_upload_bytes": config.max_upload_bytes, "max_body_bytes": config.max_body_bytes,
            "max_image_pixels": config.max_pixels, "max_request_pixels": config.max_request_pixels,
            "accepted_formats": ["JPEG", "PNG", "TIFF", "BMP", "WebP"], "body_timeout_s": config.body_timeout_s,
            "keep_alive_s": config.keep_alive_s, "token_required": token_required}


def _docs_page(schema: dict) -> str:
    """A plain, self-contained API reference from the OpenAPI schema (Swagger UI would load from a CDN)."""
    rows = []
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            parameters = [f"{p['name']} ({p['in']}{', required' if p.get('required') else ''})"
                          for p in operation.get("parameters", [])]
            body = list((operation.get("requestBody") or {}).get("content", {}))
            details = ", ".join(parameters + [f"body: {b}" for b in body]) or "no parameters"
            rows.append(f"<tr><td><code>{html.escape(method.upper())} {html.escape(path)}</code></td>"
                        f"<td>{html.escape(operation.get('summary', ''))}</td><td>{html.escape(details)}</td></tr>")
    title = html.escape(schema.get("info", {}).get("title", "API"))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}: API</title></head><body>"
            f"<h1>{title} API</h1><p>{html.escape(DISCLAIMER)}</p>"
            "<p>The machine-readable schema is at <a href='/openapi.json'>/openapi.json</a>. With a token set, send "
            "<code>Authorization: Bearer TOKEN</code> to every path except / and /health.</p>"
            f"<table border='1' cellpadding='4'><tr><th>operation</th><th>what</th><th>input</th></tr>{''.join(rows)}"
            "</table></body></html>")


def uvicorn_options(host: str, port: int, config: ServeConfig) -> dict:
    """uvicorn.run / uvicorn.Config keywords: idle keep-alive connections close, and SIGTERM always ends the server."""
    return {"host": host, "port": port, "log_level": "info", "access_log": True,
            "timeout_keep_alive": config.keep_alive_s, "timeout_graceful_shutdown": 10}


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None) -> None:
    import uvicorn

    from melanoma.runs.run import Run

    config = replace(config or ServeConfig())
    config.allowed_hosts = (*config.allowed_hosts, host)  # the address given to bind is a name clients may use
    config.check()
    check_port(port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # one inference worker per slot, each on its share of the cores
    threads = max(1, (os.cpu_count() or 1) // config.max_concurrent)
    run = Run.load(run_dir, threads=threads)
    import torch

    # the eval transform runs in torch on either backend: more intra-op threads than a worker's share of the cores
    # only spin against the other workers
    torch.set_num_threads(threads)
    if host in ("0.0.0.0", "::"):
        LOG.warning("listening on every interface; only Host headers naming %s are accepted: add the names "
                    "clients use with --allowed-hosts", ", ".join(host_patterns(config.allowed_hosts)))
    app = create_app(run, config)
    uvicorn.run(app, **uvicorn_options(host, port, config))
