"""``melanoma predict``: images, folders and manifests in; one row per image out (the ISIC submission layout plus
the melanoma alert), on one process or sharded over several. Unreadable images get an error row; the rest go on.

The run itself (model, classes, calibration, alert threshold, out-of-distribution gate) is loaded by
:class:`melanoma.runs.run.Run`; the alert threshold is applied here, outside the model, so it can be changed without
retraining. An image the gate judges out of distribution gets no alert (``melanoma_alert`` empty) and a ``reason``;
a run without a gate leaves ``in_distribution`` empty.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from melanoma.core.errors import DataError, ImageDecodeError, RunError
from melanoma.core.text import display_name
from melanoma.data.images import DEFAULT_MAX_PIXELS, decode_image, resize_pixels
from melanoma.data.records import IMAGE_SUFFIXES, MELANOMA, image_id_from_name
from melanoma.runs.run import Run


@dataclass
class Prediction:
    image: str
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    melanoma_threshold: float | None = None
    ood_score: float | None = None
    in_distribution: bool | None = None     # None: the run has no gate (or the image could not be read)

    @property
    def top_class(self) -> str | None:
        return max(self.probabilities, key=self.probabilities.get) if self.probabilities else None

    @property
    def melanoma_probability(self) -> float | None:
        return self.probabilities.get(MELANOMA)

    @property
    def melanoma_alert(self) -> bool | None:
        """None when there is nothing to judge: no probabilities, no threshold, or an out-of-distribution image."""
        if self.melanoma_probability is None or self.melanoma_threshold is None or self.in_distribution is False:
            return None
        return self.melanoma_probability >= self.melanoma_threshold

    @property
    def reason(self) -> str:
        """Why the image gets no alert although it was read: the gate's rejection."""
        from melanoma.models.ood import REASON

        return REASON if self.in_distribution is False else ""


def predict_files(run: Run, sources: Sequence[tuple[str, str | os.PathLike | bytes]], batch_size: int = 32,
                  progress: Callable[[int], object] | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Prediction]:
    """Predict (name, path-or-bytes) pairs; an unreadable image gives a row with its error, the rest go on.
    ``progress`` is called with the number of images each batch finished."""
    results: list[Prediction] = []
    for start in range(0, len(sources), batch_size):
        names, pixels, rows = [], [], []
        for name, source in sources[start:start + batch_size]:
            row = Prediction(image=name, melanoma_threshold=run.threshold)
            rows.append(row)
            try:
                decoded = decode_image(source, max_pixels=max_pixels, name=name)
            except (ImageDecodeError, OSError) as exc:
                row.error = str(exc) if isinstance(exc, ImageDecodeError) else f"{name}: {exc}"
                continue
            names.append(row)
            pixels.append(resize_pixels(decoded.pixels, run.image_size))
        if pixels:
            answers = run.answers(np.stack(pixels), batch_size=batch_size)
            for position, (row, values) in enumerate(zip(names, answers.probabilities)):
                row.probabilities = {c: float(p) for c, p in zip(run.classes, values)}
                if answers.in_distribution is not None:
                    row.ood_score = float(answers.ood_scores[position])
                    row.in_distribution = bool(answers.in_distribution[position])
        results.extend(rows)
        if progress:
            progress(len(rows))
    return results


def predict_sharded(run_path: str | os.PathLike, sources: Sequence[tuple[str, str | os.PathLike | bytes]],
                    devices: int, accelerator: str = "cpu", threshold: float | None = None, batch_size: int = 32,
                    progress: Callable[[int], object] | None = None) -> list[Prediction]:
    """Predict a large input list on ``devices`` processes (one per GPU, or each with a share of the CPU cores):
    the inputs are cut into contiguous shards, each process predicts one, and the results come back merged in
    input order. ``progress`` is called with the number of images of each shard as it finishes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if devices < 1:
        raise RunError(f"--devices must be at least 1, not {devices}")
    targets = _prediction_devices(accelerator, min(devices, len(sources)))
    if len(targets) <= 1:
        run = Run.load(run_path, threshold=threshold, device=targets[0] if targets else "cpu")
        return predict_files(run, sources, batch_size=batch_size, progress=progress)
    shards = [list(part) for part in np.array_split(np.arange(len(sources)), len(targets))]
    threads = max(1, (os.cpu_count() or 1) // len(targets))
    # spawn, not fork: the parent may already run torch threads, which do not survive a fork
    with ProcessPoolExecutor(len(targets), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_predict_shard, str(run_path), [sources[i] for i in shard], device, threads, threshold,
                               batch_size) for shard, device in zip(shards, targets)]
        sizes = {future: len(shard) for future, shard in zip(futures, shards)}
        for future in as_completed(futures):
            if progress:
                progress(sizes[future])
        return [prediction for future in futures for prediction in future.result()]


def _prediction_devices(accelerator: str, count: int) -> list[str]:
    import torch

    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        return ["cpu"] * count
    if accelerator != "gpu":
        raise RunError(f"unknown accelerator '{accelerator}' (cpu, gpu or auto)")
    available = torch.cuda.device_count()
    if available < count:
        raise RunError(f"asked for {count} GPUs, this machine has {available}")
    return [f"cuda:{index}" for index in range(count)]


def _predict_shard(run_path: str, sources, device: str, threads: int, threshold: float | None,
                   batch_size: int) -> list[Prediction]:
    import torch

    torch.set_num_threads(threads)
    run = Run.load(run_path, threshold=threshold, device=device, threads=threads)
    return predict_files(run, sources, batch_size=batch_size)


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """Images from files, folders (recursively) and CSV manifests (column ``image``), as (name, path) pairs."""
    found: list[tuple[str, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [(display_name(p.relative_to(item)), p) for p in sorted(item.rglob("*"))
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        elif item.suffix.lower() == ".csv" and item.is_file():
            found += _manifest_inputs(item)
        elif item.exists():
            found.append((display_name(item.name), item))
        else:
            raise DataError(f"{display_name(item)}: no such file or folder")
    if not found:
        raise DataError("no images found in: " + ", ".join(display_name(i) for i in inputs))
    return found


def _manifest_inputs(manifest: Path) -> list[tuple[str, Path]]:
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image" not in rows[0]:
        raise DataError(f"{display_name(manifest)}: a prediction manifest needs an 'image' column")
    found = []
    for row in rows:
        image = row["image"].strip()
        path = Path(image) if Path(image).is_absolute() else manifest.parent / image
        if not path.suffix:
            path = next((path.with_suffix(s) for s in (".jpg", ".jpeg", ".png") if path.with_suffix(s).is_file()),
                        path)
        found.append((image, path))
    return found


def prediction_rows(predictions: Sequence[Prediction], classes: Sequence[str]) -> list[dict]:
    """The ISIC-submission layout: ``image`` (ISIC id or stem), one column per class, then our extras."""
    rows = []
    for p in predictions:
        row = {"image": image_id_from_name(Path(p.image).name)}
        row.update({c: (f"{p.probabilities[c]:.6f}" if p.probabilities else "") for c in classes})
        row.update({"melanoma_alert": "" if p.melanoma_alert is None else int(p.melanoma_alert),
                    "top_class": p.top_class or "", "file": p.image, "error": p.error or "",
                    "ood_score": "" if p.ood_score is None else f"{p.ood_score:.6g}",
                    "in_distribution": "" if p.in_distribution is None else str(p.in_distribution).lower(),
                    "reason": p.reason})
        rows.append(row)
    return rows


def prediction_columns(classes: Sequence[str]) -> list[str]:
    return ["image", *classes, "melanoma_alert", "top_class", "file", "error", "ood_score", "in_distribution", "reason"]
