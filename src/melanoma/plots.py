"""Figures. Built on ``matplotlib.figure.Figure`` directly, so nothing touches pyplot's global state or backend."""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure


def class_counts_figure(counts: Sequence[dict], classes: Sequence[str]) -> Figure:
    """Grouped horizontal bars: images per class, one bar per split."""
    splits = sorted({row["split"] for row in counts})
    lookup = {(row["split"], row["class"]): row["count"] for row in counts}
    figure = Figure(figsize=(8, 0.5 * len(classes) + 1.5))
    axes = figure.add_subplot()
    height = 0.8 / max(1, len(splits))
    positions = np.arange(len(classes))
    for offset, split in enumerate(splits):
        values = [lookup.get((split, label), 0) for label in classes]
        bars = axes.barh(positions + offset * height, values, height=height, label=split or "all")
        axes.bar_label(bars, padding=2, fontsize=8)
    axes.set_yticks(positions + height * (len(splits) - 1) / 2, classes)
    axes.invert_yaxis()
    axes.set_xlabel("images")
    axes.set_title("Images per class")
    if len(splits) > 1:
        axes.legend()
    return figure


def image_grid_figure(images: Sequence[np.ndarray], titles: Sequence[str], columns: int = 3,
                      title: str | None = None) -> Figure:
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure = Figure(figsize=(3 * columns, 3.2 * rows))
    for position, (image, caption) in enumerate(zip(images, titles)):
        axes = figure.add_subplot(rows, columns, position + 1)
        axes.imshow(image)
        axes.set_title("\n".join(textwrap.wrap(caption, 34)), fontsize=8)
        axes.axis("off")
    if title:
        figure.suptitle(title)
    return figure


def pairs_figure(pairs: Sequence[tuple[np.ndarray, str, np.ndarray, str]], title: str) -> Figure:
    """Rows of (left image, caption, right image, caption): e.g. a Test image beside its Train copy."""
    figure = Figure(figsize=(6, 3 * max(1, len(pairs))))
    for row, (left, left_caption, right, right_caption) in enumerate(pairs):
        for column, (image, caption) in enumerate(((left, left_caption), (right, right_caption))):
            axes = figure.add_subplot(len(pairs), 2, 2 * row + column + 1)
            axes.imshow(image)
            axes.set_title("\n".join(textwrap.wrap(caption, 40)), fontsize=7)
            axes.axis("off")
    figure.suptitle(title)
    return figure


def training_curves_figure(history: Sequence[dict], title: str = "") -> Figure:
    """Accuracy and loss, train vs validation, per epoch: the seed notebooks' plot."""
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4))
    for position, (metric, label) in enumerate((("acc", "accuracy"), ("loss", "loss"))):
        axes = figure.add_subplot(1, 2, position + 1)
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{split}_{metric}") for row in history]
            if any(v is not None for v in values):
                axes.plot(epochs, [np.nan if v is None else v for v in values], style, markersize=3,
                          label=f"{'training' if split == 'train' else 'validation'} {label}")
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    return figure
