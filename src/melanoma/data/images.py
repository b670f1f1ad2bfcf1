"""Labelled images: the record of one image and its source, the index of a dataset, ISIC ids and acquisition eras,
safe image decoding and the in-memory uint8 image cache. Finding the images of a data source (folder trees, CSV
manifests, ISIC Archive downloads) is :mod:`melanoma.data.sources`.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from melanoma.core.errors import ImageDecodeError
from melanoma.core.text import display_name
from melanoma.data.records import ImageRecord

# 50 megapixels is ~10x the largest dermoscopy originals in the ISIC archive; anything bigger is refused before
# decoding so that a crafted file cannot exhaust memory (a "decompression bomb").
DEFAULT_MAX_PIXELS = 50_000_000


# ---------------------------------------------------------------------------------------------------------------
# Decoding


@dataclass
class DecodedImage:
    pixels: np.ndarray  # H x W x 3 uint8, EXIF orientation applied
    notes: list[str]    # what was done to make it RGB (alpha flattened, 16-bit scaled, ...)
    original_mode: str
    original_size: tuple[int, int]


def decode_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None) -> DecodedImage:
    """Decode any supported image to RGB uint8, or raise ImageDecodeError naming the file and the problem."""
    label = name or (display_name(source) if not isinstance(source, bytes) else "<upload>")
    if not isinstance(source, bytes) and os.path.isdir(source):
        raise ImageDecodeError(f"{label}: is a folder, not an image file")
    if not isinstance(source, bytes) and os.path.getsize(source) == 0:
        raise ImageDecodeError(f"{label}: empty file (0 bytes)")
    if isinstance(source, bytes) and not source:
        raise ImageDecodeError(f"{label}: empty file (0 bytes)")
    try:
        with Image.open(_as_file(source)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"{label}: {width}x{height} pixels exceeds the {max_pixels:,}-pixel limit "
                                       "(possible decompression bomb); refused")
            mode = image.mode
            image.load()
            rotated = _was_rotated(image)
            pixels, notes = _to_rgb_uint8(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{label}: too many pixels (possible decompression bomb); refused") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{label}: not an image (unrecognised format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{label}: truncated or corrupt image data ({exc})") from exc
    if rotated:
        notes.append("EXIF orientation applied")
    return DecodedImage(pixels=pixels, notes=notes, original_mode=mode, original_size=(width, height))


def _as_file(source: str | os.PathLike | bytes):
    import io

    return io.BytesIO(source) if isinstance(source, bytes) else source


def _was_rotated(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # a broken EXIF block is not worth failing a decode over
        return False


def _to_rgb_uint8(image: Image.Image) -> tuple[np.ndarray, list[str]]:
    mode = image.mode
    notes: list[str] = []
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 or mode.startswith("I;16") else 1.0
        gray = np.clip(np.round(values / scale), 0, 255).astype(np.uint8)
        notes.append(f"{mode} (16-bit) scaled to 8-bit")
        return np.repeat(gray[..., None], 3, axis=2), notes
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        notes.append("32-bit float image clipped to 8-bit")
        return np.repeat(gray[..., None], 3, axis=2), notes
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        # Flatten on black: dermoscopy borders are dark, so transparent padding looks like the usual vignette.
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
        notes.append(f"{mode} with alpha flattened onto black")
    elif mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy(), notes


def resize_pixels(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 array to ``size`` (square int or (width, height)) with bicubic resampling."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    if pixels.shape[1::-1] == target:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize(target, Image.Resampling.BICUBIC), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# In-memory cache


@dataclass
class ImageCache:
    """All images of a dataset decoded once into one N x H x W x 3 uint8 array (about its raw size in memory)."""

    records: list[ImageRecord]
    images: np.ndarray
    errors: dict[int, str]

    @property
    def ok_indices(self) -> list[int]:
        return [i for i in range(len(self.records)) if i not in self.errors]

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


def build_cache(records: Sequence[ImageRecord], size: int = 180, workers: int | None = None,
                progress: Callable[[Iterable], Iterable] | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCache:
    """Decode every record once with a thread pool (PIL releases the GIL while decoding)."""
    records = list(records)
    images = np.zeros((len(records), size, size, 3), dtype=np.uint8)
    errors: dict[int, str] = {}

    def load(index: int) -> None:
        try:
            images[index] = resize_pixels(decode_image(records[index].path, max_pixels=max_pixels,
                                                       name=records[index].rel_path).pixels, size)
        except ImageDecodeError as exc:
            errors[index] = str(exc)

    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(load, range(len(records)))
        for _ in (progress(results) if progress else results):
            pass
    return ImageCache(records=records, images=images, errors=errors)
