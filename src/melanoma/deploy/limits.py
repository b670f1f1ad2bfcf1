"""What a request to ``melanoma serve`` may be, and the checks that hold it to that: the serving settings and their
validation, the bearer token, allowed hosts, the body cap and timeout (checked from the headers and while the body
streams in, before anything is parsed), accepted image formats and the per-request pixel budget (read from image
headers before any decoding). The limits themselves are listed in :mod:`melanoma.deploy.serve`."""
from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import math
import os
import time
from dataclasses import dataclass

from melanoma.core.errors import ImageDecodeError, ServeError
from melanoma.data.images import DEFAULT_MAX_PIXELS, decode_image, resize_pixels

TOKEN_ENV = "MELANOMA_TOKEN"
SERVE_TTA = False  # 8-view test-time augmentation when serving (8x the compute); `serve --tta` turns it on
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = frozenset({"/", "/health"})          # reachable without the token: the page and the liveness check
# Pillow plugins tried on an upload (formats dermoscopy uses); "MPO" is how Pillow names a multi-picture JPEG
ACCEPTED_PLUGINS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
ACCEPTED_FORMATS = frozenset({*ACCEPTED_PLUGINS, "MPO"})
MULTIPART_OVERHEAD = 64 * 1024                      # room for multipart boundaries and headers in the body cap
OVERLAY_SIDE = 512                                  # Grad-CAM overlays are shrunk to at most this many pixels a side


@dataclass
class ServeConfig:
    max_upload_bytes: int = 10 * 1024 * 1024  # one image
    max_files: int = 16                       # images per request
    max_concurrent: int = 2                   # inference workers (and decodes at once): one per core here
    queue_size: int = 32                      # requests in flight beyond max_concurrent before 503
    retry_after_s: int = 2
    token: str | None = None                  # None: MELANOMA_TOKEN when set
    max_pixels: int = DEFAULT_MAX_PIXELS      # one image (decompression-bomb guard, 422)
    max_request_pixels: int = 100_000_000     # all images of a request: 4 dermoscopy originals of 24 MP (413)
    max_batch: int = 32                       # images per model call
    batch_wait_ms: float = 5.0                # how long a free worker's first request waits for others to join it
    body_timeout_s: float = 30.0              # the whole body must arrive within this (408)
    keep_alive_s: int = 5                     # idle keep-alive connections close after this
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    tta: bool | None = SERVE_TTA              # None: as the run was evaluated

    @property
    def max_body_bytes(self) -> int:
        return self.max_upload_bytes * self.max_files + MULTIPART_OVERHEAD

    def check(self) -> None:
        """Raise ServeError for the first setting that cannot work."""
        rules = [("--concurrency", self.max_concurrent, self.max_concurrent >= 1, "at least 1"),
                 ("--queue", self.queue_size, self.queue_size >= 0, "0 or more"),
                 ("--max-upload-mb", self.max_upload_bytes, self.max_upload_bytes > 0, "above 0"),
                 ("max_files", self.max_files, self.max_files >= 1, "at least 1"),
                 ("retry_after_s", self.retry_after_s, self.retry_after_s >= 0, "0 or more"),
                 ("max_pixels", self.max_pixels, self.max_pixels > 0, "above 0"),
                 ("--max-request-megapixels", self.max_request_pixels, self.max_request_pixels > 0, "above 0"),
                 ("--max-batch", self.max_batch, self.max_batch >= 1, "at least 1"),
                 ("--batch-wait-ms", self.batch_wait_ms, 0 <= self.batch_wait_ms <= 1000, "between 0 and 1000"),
                 ("--body-timeout", self.body_timeout_s, 0 < self.body_timeout_s <= 3600, "above 0 (at most 3600)"),
                 ("--keep-alive", self.keep_alive_s, 0 < self.keep_alive_s <= 3600, "above 0 (at most 3600)")]
        for flag, value, ok, requirement in rules:
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ServeError(f"{flag} must be {requirement}, not {value}")
        if not self.allowed_hosts:
            raise ServeError("--allowed-hosts: at least one host name is needed")
        host_patterns(self.allowed_hosts)
        resolve_token(self.token)


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ServeError(f"--port must be between 1 and 65535, not {port}")


def resolve_token(given: str | None) -> str | None:
    """The bearer token: ``given``, else MELANOMA_TOKEN, else None (no auth). An empty one is an error, never 'off'."""
    source, token = ("--token", given) if given is not None else (TOKEN_ENV, os.environ.get(TOKEN_ENV))
    if token is None:
        return None
    if not token.strip():
        raise ServeError(f"{source} is empty: give a real token, or leave it out to serve without one")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ServeError(f"{source} must be printable ASCII without spaces (it travels in an HTTP header)")
    return token


def host_patterns(names) -> list[str]:
    """Host names as they appear in a Host header (IPv6 literals in brackets), for TrustedHostMiddleware."""
    patterns = []
    for name in names:
        name = name.strip().lower()
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if ":" in name:
            try:
                name = f"[{ipaddress.IPv6Address(name)}]"
            except ValueError:
                raise ServeError(f"--allowed-hosts: '{name}' is neither a host name nor an IPv6 address "
                                 "(give names without ports)") from None
        if not name or ("*" in name[1:]) or (name.startswith("*") and name != "*" and not name.startswith("*.")):
            raise ServeError(f"--allowed-hosts: '{name}' is not a host name, '*' or '*.example.org'")
        if name not in patterns:
            patterns.append(name)
    return patterns


class RequestGuard:
    """Pure ASGI, in front of the app: the bearer token and the declared Content-Length are checked from the headers
    before a byte of the body is read; then the body is counted as it streams in and cut off past ``max_body_bytes``
    (413) or when it has not all arrived ``body_timeout_s`` after the headers (408)."""

    def __init__(self, app, token: str | None, max_body_bytes: int, body_timeout_s: float):
        self.app, self.token, self.max_body_bytes, self.body_timeout_s = app, token, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.token is not None and scope["path"] not in PUBLIC_PATHS and not self._authorised(headers):
            await reject(scope, receive, send, 401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await reject(scope, receive, send, 413,
                          f"request too large ({int(declared):,} bytes; limit {self.max_body_bytes:,})")
            return
        started = {"response": False}

        async def tracked_send(message) -> None:
            started["response"] = True
            await send(message)

        try:
            await self.app(scope, self._capped(receive), tracked_send)
        except HTTPException as exc:  # raised from the body outside FastAPI's own handling
            if started["response"]:
                raise
            await reject(scope, receive, send, exc.status_code, exc.detail)

    def _authorised(self, headers) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _capped(self, receive):
        from starlette.exceptions import HTTPException

        deadline = time.monotonic() + self.body_timeout_s
        state = {"received": 0, "complete": False}

        async def capped_receive():
            if state["complete"]:
                return await receive()  # the body is in; later calls only wait for a disconnect
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {self.body_timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["complete"] = not message.get("more_body", False)
                if state["received"] > self.max_body_bytes:
                    raise HTTPException(413, f"request body over the {self.max_body_bytes:,}-byte limit",
                                        headers={"Connection": "close"})
            else:
                state["complete"] = True
            return message

        return capped_receive


async def reject(scope, receive, send, status: int, detail: str, headers: dict | None = None) -> None:
    from starlette.responses import JSONResponse

    # Connection: close, so a client still sending a body it was refused cannot keep the connection
    response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close", **(headers or {})})
    await response(scope, receive, send)


async def read_capped(upload, limit: int) -> bytes:
    from fastapi import HTTPException

    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload larger than the {limit:,}-byte limit")
    return data


@dataclass
class Decoded:
    model_pixels: object     # N x S x S x 3 uint8 at the model's input size
    display_pixels: list     # for Grad-CAM overlays: each image shrunk to at most OVERLAY_SIDE a side (or empty)


def decode_payloads(payloads: list[bytes], image_size: int, config: ServeConfig, decode_slots,
                     keep_display: bool) -> Decoded:
    """Check every upload's format and size from its header, then decode them one at a time (at most
    ``decode_slots`` decodes in the whole server), each shrunk to the model's input size at once."""
    import numpy as np
    from fastapi import HTTPException

    sizes, problems = [], []
    for position, data in enumerate(payloads):
        try:
            sizes.append(header_pixels(data, f"upload {position + 1}", config.max_pixels))
        except ImageDecodeError as exc:
            problems.append(str(exc))
    if problems:
        raise HTTPException(422 if any("decompression bomb" in p for p in problems) else 415, "; ".join(problems))
    if sum(sizes) > config.max_request_pixels:
        raise HTTPException(413, f"the images hold {sum(sizes):,} pixels together; the limit per request is "
                                 f"{config.max_request_pixels:,}: send fewer or smaller images per request")
    model_pixels, display_pixels = [], []
    for position, data in enumerate(payloads):
        try:
            with decode_slots:
                pixels = decode_image(data, max_pixels=config.max_pixels, name=f"upload {position + 1}").pixels
                model_pixels.append(resize_pixels(pixels, image_size))
                if keep_display:
                    display_pixels.append(shrink(pixels, OVERLAY_SIDE))
                del pixels
        except ImageDecodeError as exc:
            problems.append(str(exc))
    if problems:
        raise HTTPException(415, "; ".join(problems))
    return Decoded(model_pixels=np.stack(model_pixels), display_pixels=display_pixels)


def header_pixels(data: bytes, name: str, max_pixels: int) -> int:
    """Width x height from the image header, opened with the accepted Pillow plugins only (nothing decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_PLUGINS) as image:
            fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{name}: too many pixels (possible decompression bomb); refused") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not an image in an accepted format (JPEG, PNG, TIFF, BMP, WebP)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: truncated or corrupt image header ({exc})") from exc
    if fmt not in ACCEPTED_FORMATS:
        raise ImageDecodeError(f"{name}: {fmt} is not an accepted format (JPEG, PNG, TIFF, BMP, WebP)")
    if width * height > max_pixels:
        raise ImageDecodeError(f"{name}: {width}x{height} pixels exceeds the {max_pixels:,}-pixel limit "
                               "(possible decompression bomb); refused")
    return width * height


def shrink(pixels, side: int):
    height, width = pixels.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return pixels
    return resize_pixels(pixels, (max(1, round(width * scale)), max(1, round(height * scale))))
