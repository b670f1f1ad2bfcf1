"""Shared fixtures: tiny synthetic lesion images built in tmp, and the real shared data (skipped where absent)."""
from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data" / "isic-9class-180px"
TRUTH_DIR = SHARED / "data" / "groundtruth"
TRUTH_FILES = sorted(TRUTH_DIR.glob("*.csv")) if TRUTH_DIR.is_dir() else []

requires_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


def lesion_image(seed: int, size: int = 64) -> np.ndarray:
    """A synthetic 'lesion': skin-coloured background with a random dark blob and texture, distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.empty((size, size, 3), dtype=np.float64)
    image[...] = rng.uniform([180, 120, 100], [240, 180, 160])
    for _ in range(3):
        cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.3)
        blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / radius ** 2))
        image -= blob[..., None] * rng.uniform(40, 120, size=3)
    cells = -(-size // 8)
    image += rng.normal(0, 12, size=(cells, cells, 3)).repeat(8, 0).repeat(8, 1)[:size, :size]
    return np.clip(image, 0, 255).astype(np.uint8)


def save_image(path: Path, pixels: np.ndarray, fmt: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, **kwargs)
    return path


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture
def make_tree(tmp_path):
    """Build ROOT/<split>/<class>/<name>.jpg from {(split, class): [(name, pixels), ...]}."""
    def build(layout: dict[tuple[str, str], list[tuple[str, np.ndarray]]], root: Path | None = None) -> Path:
        root = root or tmp_path / "data"
        for (split, label), images in layout.items():
            folder = root / split / label if split else root / label
            folder.mkdir(parents=True, exist_ok=True)
            for name, pixels in images:
                save_image(folder / name, pixels, quality=92)
        return root
    return build


CLASSES = ("melanoma", "nevus", "vascular lesion")


def tiny_dataset(root: Path, per_class: int = 10, test_per_class: int = 3) -> Path:
    for index, label in enumerate(CLASSES):
        for i in range(per_class):
            seed = 1000 * index + i
            save_image(root / "Train" / label / f"ISIC_{seed:07d}.jpg", lesion_image(seed, 40), quality=92)
        for i in range(test_per_class):
            seed = 1000 * index + 500 + i
            save_image(root / "Test" / label / f"ISIC_{seed:07d}.jpg", lesion_image(seed, 40), quality=92)
    # dirt: a Test image copied into Train under another class
    leaked = root / "Test" / "melanoma" / "ISIC_0000500.jpg"
    (root / "Train" / "nevus" / "ISIC_0000500.jpg").write_bytes(leaked.read_bytes())
    return root


def train_tiny_run(root: Path, per_class: int = 6, test_per_class: int = 2, **overrides):
    """A tiny dataset under ``root`` and a seed-cnn run trained on it at 32 px: (data folder, run folder)."""
    from melanoma.config import TrainConfig
    from melanoma.train.pipeline import train

    data = tiny_dataset(root / "data", per_class=per_class, test_per_class=test_per_class)
    settings = dict(model="seed-cnn", epochs=1, batch_size=8, image_size=32, progress=False, threads=1, bootstrap=0)
    config = TrainConfig(data=str(data), out=str(root / "run"), **(settings | overrides))
    return data, train(config, log=lambda *_: None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def uvicorn_server(app, options: dict | None = None):
    """A real uvicorn server for ``app`` on a free loopback port, in a thread; yields its base URL. ``options``: more
    uvicorn.Config keywords (host and port are chosen here)."""
    import uvicorn

    port = free_port()
    settings = {"log_level": "warning", **(options or {}), "host": "127.0.0.1", "port": port}
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
