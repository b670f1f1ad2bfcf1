"""Which out-of-distribution detector should gate a run? AUROC and FPR at 95 % TPR per detector and per set.

    python benchmarks/ood_gate.py RUN [--clinical DIR] [--json FILE]

In-distribution: the run's own validation split (which sets each detector's threshold: 95 % of it passes) and
the data's Test split (held out: how many of its images pass at that threshold). Out of distribution:

- near: ``../shared/data/ood-dev/clinical`` (clinical photographs of ten other skin conditions, no dermatoscope);
- far, built here from packages on hand: matplotlib's sample images (with crops), torchvision ``FakeData``, blank
  images of several colours, uniform and Gaussian noise, text/screenshot renderings (PIL ImageDraw);
- ambiguous, reported but not a target: heavy blur of Test images and extreme (1/16 area) crops of Test images;
  both are still pictures of lesions, only degraded, so a detector that passes them is not wrong.

scikit-image's ``data`` images are used when scikit-image is installed (it is not a dependency; skipped otherwise).
Detectors (``melanoma.models.ood``): mahalanobis, energy, knn; ``msp`` (1 - max softmax) is the baseline. Each is fitted
on the run's training images, as ``melanoma fit-ood`` does. Scores: higher = more out of distribution; AUROC with the
OOD set as positives against validation; FPR@95TPR = the share of the OOD set that passes the threshold keeping
95 % of validation (the gate's own rule).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import REPO, machine, print_table, write_results
from PIL import Image, ImageDraw, ImageFilter
from sklearn.metrics import roc_auc_score

from melanoma.data.images import decode_image, resize_pixels
from melanoma.models.ood import DETECTORS, choose_threshold, detector_scores, fit_detector
from melanoma.models.probabilities import predict_outputs
from melanoma.runs.run import Run
from melanoma.train.ood_fit import run_split_images

CLINICAL = REPO.parent / "shared" / "data" / "ood-dev" / "clinical"
SIZE = 256  # far images are drawn at this size, then resized to the model's input like any upload


def far_sets(test_images: np.ndarray, seed: int = 0) -> tuple[dict[str, list[np.ndarray]], list[str]]:
    """{set name: images} built in code, and notes on what was skipped."""
    rng = np.random.default_rng(seed)
    sets, notes = {}, []
    sets["matplotlib-samples"] = _matplotlib_samples()
    try:
        from skimage import data as skdata  # noqa: F401

        sets["skimage-data"] = _skimage_images()
    except ImportError:
        notes.append("scikit-image is not installed: its data images were skipped")
    from torchvision.datasets import FakeData

    fake = FakeData(size=60, image_size=(3, SIZE, SIZE), random_offset=seed)
    sets["torchvision-fakedata"] = [np.asarray(fake[i][0].convert("RGB")) for i in range(len(fake))]
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (220, 40, 40), (40, 160, 60), (40, 70, 200),
               (225, 180, 150), (90, 60, 40), (250, 230, 80), (180, 120, 200)]
    sets["blank"] = [np.full((SIZE, SIZE, 3), c, dtype=np.uint8) for c in colours]
    sets["noise"] = ([rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(30)]
                     + [np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (SIZE, SIZE, 3)), 0, 255)
                        .astype(np.uint8) for _ in range(30)])
    sets["text-screenshots"] = [_rendering(rng, i) for i in range(60)]
    picks = test_images[rng.choice(len(test_images), min(60, len(test_images)), replace=False)]
    sets["heavy-blur (ambiguous)"] = [np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(p.shape[0] / 10)))
                                      for p in picks]
    sets["extreme-crops (ambiguous)"] = [_crop(p, rng) for p in picks]
    return sets, notes


def _matplotlib_samples() -> list[np.ndarray]:
    from matplotlib.cbook import get_sample_data

    images = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        with get_sample_data(name) as handle:
            pixels = np.asarray(Image.open(handle).convert("RGB"))
        height, width = pixels.shape[:2]
        images.append(pixels)
        for top, left in ((0, 0), (0, width // 2), (height // 2, 0), (height // 2, width // 2)):
            images.append(pixels[top:top + height // 2, left:left + width // 2])
    return images


def _skimage_images() -> list[np.ndarray]:
    from skimage import data as skdata

    images = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "clock"):
        pixels = np.asarray(getattr(skdata, name)())
        images.append(np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels[..., :3])
    return images


def _rendering(rng: np.random.Generator, index: int) -> np.ndarray:
    """A screenshot-like picture: a window, title bar, boxes and lines of text."""
    dark = index % 3 == 0
    image = Image.new("RGB", (SIZE, SIZE), (30, 30, 36) if dark else (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, SIZE, 18), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    for line in range(int(rng.integers(6, 16))):
        y = 24 + line * 14
        words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(2, 9))))
                         for _ in range(int(rng.integers(3, 8))))
        draw.text((int(rng.integers(4, 30)), y), words, fill=(220, 220, 220) if dark else (20, 20, 20))
    for _ in range(int(rng.integers(1, 4))):
        x, y = int(rng.integers(0, SIZE - 60)), int(rng.integers(20, SIZE - 40))
        draw.rectangle((x, y, x + int(rng.integers(30, 60)), y + int(rng.integers(15, 40))),
                       outline=tuple(int(v) for v in rng.integers(0, 255, 3)), width=2)
    return np.asarray(image)


def _crop(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = pixels.shape[0] // 4
    top, left = rng.integers(0, pixels.shape[0] - side, 2)
    return pixels[top:top + side, left:left + side]


def clinical_set(folder: Path) -> list[np.ndarray]:
    return [decode_image(p).pixels for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]


def all_scores(train, evaluated: dict) -> dict[str, dict[str, np.ndarray]]:
    """{detector: {set: scores}} for every detector fitted on the training outputs."""
    scores = {}
    for detector in DETECTORS:
        arrays = fit_detector(detector, train.features, train.labels)
        scores[detector] = {name: detector_scores(detector, arrays, out.features, out.logits)
                            for name, out in evaluated.items()}
    scores["msp"] = {name: 1.0 - out.probabilities.max(axis=1) for name, out in evaluated.items()}
    return scores


def table(scores: dict[str, dict[str, np.ndarray]], counts: dict[str, int]) -> list[dict]:
    rows = []
    for detector, by_set in scores.items():
        threshold = choose_threshold(by_set["validation"])
        test_pass = float((by_set["test"] <= threshold).mean()) if len(by_set["test"]) else None
        for name, values in by_set.items():
            if name in ("validation", "test"):
                continue
            labels = np.r_[np.zeros(len(by_set["validation"])), np.ones(len(values))]
            rows.append({"detector": detector, "set": f"{name} ({counts[name]})",
                         "auroc": float(roc_auc_score(labels, np.r_[by_set["validation"], values])),
                         "fpr_at_95tpr": float((values <= threshold).mean()),
                         "rejected": float((values > threshold).mean()),
                         "test_pass": test_pass})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder")
    parser.add_argument("--clinical", default=str(CLINICAL), help="folder of near-OOD clinical photographs")
    parser.add_argument("--json", help="output JSON (default: benchmarks/results/ood_gate.json)")
    args = parser.parse_args()
    started = time.perf_counter()
    run = Run.load(args.run, backend="torch", gate=False)
    splits = run_split_images(run, ("train", "val"))
    test_images = _test_images(run)
    sets, notes = far_sets(test_images)
    if Path(args.clinical).is_dir():
        sets = {"clinical (near)": clinical_set(Path(args.clinical))} | sets
    else:
        notes.append(f"{args.clinical} is absent: the near set was skipped")
    inputs = {"validation": splits["val"][0], "test": test_images}
    inputs |= {name: np.stack([resize_pixels(p, run.image_size) for p in images]) for name, images in sets.items()}

    def outputs(images):
        return predict_outputs(run.model, images, run.image_size, device=run.device)

    train = outputs(splits["train"][0])
    train.labels = splits["train"][1]
    evaluated = {name: outputs(images) for name, images in inputs.items()}
    counts = {name: len(images) for name, images in inputs.items()}
    rows = table(all_scores(train, evaluated), counts)
    print_table(rows, ["detector", "set", "auroc", "fpr_at_95tpr", "rejected", "test_pass"])
    for note in notes:
        print("note:", note)
    write_results("ood_gate", {"run": str(args.run), "counts": counts | {"train": len(splits["train"][1])},
                               "rows": rows, "notes": notes, "seconds": time.perf_counter() - started,
                               "command": "python benchmarks/ood_gate.py " + str(args.run)}, args.json)
    print(machine())


def _test_images(run: Run) -> np.ndarray:
    from melanoma.data.images import build_cache
    from melanoma.data.sources import load_dataset

    config = run.config["config"]
    index = load_dataset(config["data"], image_root=config.get("image_root"))
    wanted = (config.get("test_split") or "Test").lower()
    cache = build_cache([r for r in index.records if r.split.lower() == wanted], size=run.image_size)
    return cache.images[cache.ok_indices]


if __name__ == "__main__":
    main()
