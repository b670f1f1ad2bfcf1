"""``melanoma serve RUN``: a REST API and a web page for the clinic (FastAPI + uvicorn).

Safety: uploads are capped (default 10 MB -> 413), non-images get 415, decompression bombs 422, at most
``max_concurrent`` inferences run at once with ``queue_size`` more waiting (then 503 + Retry-After), an optional
bearer token is compared in constant time (401 without it), client file names never touch the filesystem, and logs
carry sizes and outcomes, never image content. A research tool, not a medical device.
"""
import asyncio
import base64
import hmac
import io
import logging
import os
import time
from dataclasses import dataclass
from importlib.resources import files

from melanoma.data import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, resize_pixels

LOG = logging.getLogger("melanoma.serve")
TOKEN_ENV = "MELANOMA_TOKEN"
DISCLAIMER = ("Research tool, not a medical device. It does not diagnose; every lesion of concern needs a "
              "dermatologist's examination.")


@dataclass
class ServeConfig:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_files: int = 16
    max_concurrent: int = 2          # inferences at once: one per core on our 2-core machines
    queue_size: int = 32             # requests allowed to wait for a slot before 503
    retry_after_s: int = 2
    token: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


class _Gate:
    """At most ``slots`` holders at once and ``queue`` more waiting; beyond that, callers are turned away."""

    def __init__(self, slots: int, queue: int):
        self.semaphore = asyncio.Semaphore(slots)
        self.capacity = slots + queue
        self.inside = 0

    def try_enter(self) -> bool:
        if self.inside >= self.capacity:
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        self.inside -= 1


def create_app(run, config: ServeConfig | None = None):
    """The FastAPI app serving one loaded :class:`melanoma.inference.Run`."""
    from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.concurrency import run_in_threadpool

    config = config or ServeConfig()
    token = config.token or os.environ.get(TOKEN_ENV) or None
    gate = _Gate(config.max_concurrent, config.queue_size)
    bearer = HTTPBearer(auto_error=False)
    app = FastAPI(title="melanoma", version=_version(),
                  description="Dermoscopic lesion classification with a melanoma alert. " + DISCLAIMER)

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_Busy)
    async def busy(_: Request, exc: Exception):
        return JSONResponse({"detail": "server busy: too many requests waiting; retry shortly"}, status_code=503,
                            headers={"Retry-After": str(config.retry_after_s)})

    @app.get("/health", summary="Liveness check")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", summary="The served model: classes, alert threshold, validation metrics, model card",
             dependencies=[Depends(authorised)])
    async def model_info() -> dict:
        return model_card(run)

    @app.post("/v1/predict", summary="Classify one or more dermoscopic images",
              dependencies=[Depends(authorised)])
    async def predict(request: Request, files: list[UploadFile] = File(..., description="image files"),
                      explain: bool = Query(False, description="add a Grad-CAM overlay (PNG, base64)")) -> dict:
        _check_declared_size(request, config)
        if len(files) > config.max_files:
            raise HTTPException(413, f"at most {config.max_files} images per request")
        payloads = [await _read_capped(upload, config.max_upload_bytes) for upload in files]
        if not gate.try_enter():
            raise _Busy()
        try:
            async with gate.semaphore:
                started = time.perf_counter()
                results = await run_in_threadpool(_predict_payloads, run, payloads, explain, config)
        finally:
            gate.leave()
        LOG.info("predict: %d image(s), %d bytes, %.0f ms", len(payloads), sum(len(p) for p in payloads),
                 (time.perf_counter() - started) * 1000)
        return {"results": results, "alert_threshold": run.threshold, "disclaimer": DISCLAIMER}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return files("melanoma").joinpath("web/index.html").read_text(encoding="utf-8")

    return app


class _Busy(Exception):
    pass


def _version() -> str:
    from melanoma import __version__

    return __version__


def _check_declared_size(request, config: ServeConfig) -> None:
    from fastapi import HTTPException

    declared = request.headers.get("content-length")
    limit = config.max_upload_bytes * config.max_files + 64 * 1024
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request too large ({int(declared):,} bytes; limit {limit:,})")


async def _read_capped(upload, limit: int) -> bytes:
    from fastapi import HTTPException

    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload larger than the {limit:,}-byte limit")
    return data


def _predict_payloads(run, payloads: list[bytes], explain: bool, config: ServeConfig) -> list[dict]:
    """Decode every upload (status per image), predict the readable ones in one batch."""
    from fastapi import HTTPException

    decoded, problems = [], []
    for position, data in enumerate(payloads):
        name = f"upload {position + 1}"
        try:
            decoded.append(decode_image(data, max_pixels=config.max_pixels, name=name).pixels)
        except ImageDecodeError as exc:
            problems.append(str(exc))
    if problems:
        bomb = any("decompression bomb" in p for p in problems)
        raise HTTPException(422 if bomb else 415, "; ".join(problems))
    import numpy as np

    probabilities = run.probabilities(np.stack([resize_pixels(p, run.image_size) for p in decoded]))
    results = []
    for pixels, row in zip(decoded, probabilities):
        result = _result(run, row)
        if explain:
            result["gradcam_png_base64"] = _gradcam_png(run, pixels, int(row.argmax()))
        results.append(result)
    return results


def _result(run, probabilities) -> dict:
    from melanoma.data import MELANOMA

    values = {c: round(float(p), 6) for c, p in zip(run.classes, probabilities)}
    top = max(values, key=values.get)
    melanoma = values.get(MELANOMA)
    alert = None if melanoma is None or run.threshold is None else bool(melanoma >= run.threshold)
    return {"probabilities": values, "top_class": top, "melanoma_probability": melanoma, "melanoma_alert": alert}


def _gradcam_png(run, pixels, target: int) -> str:
    from PIL import Image

    from melanoma.explain import grad_cam, overlay

    heat, _ = grad_cam(run.model, pixels, run.image_size, target=target)
    buffer = io.BytesIO()
    Image.fromarray(overlay(pixels, heat)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def model_card(run) -> dict:
    from melanoma.io import read_json

    metrics_path = run.path / "metrics.json"
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
            "validation_metrics": {k: validation.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
            | {"melanoma_auc": (validation.get("melanoma") or {}).get("auc")},
            "model_card": card}


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          tta: bool | None = None) -> None:
    import uvicorn

    from melanoma.inference import Run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config or ServeConfig()
    cores = os.cpu_count() or 1
    # one inference per slot, each on its share of the cores
    run = Run.load(run_dir, threads=max(1, cores // max(1, config.max_concurrent)))
    if tta is not None:
        run.tta = tta
    app = create_app(run, config)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=True)
