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


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> Figure:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    counts = np.asarray(confusion, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    short = [c if len(c) < 14 else c[:12] + "…" for c in classes]
    figure = Figure(figsize=(15, 6.5))
    for position, (matrix, label, fmt) in enumerate(((counts, "counts", "{:.0f}"),
                                                     (normalised, "row-normalised (recall)", "{:.2f}"))):
        axes = figure.add_subplot(1, 2, position + 1)
        axes.imshow(matrix, cmap="Blues", vmin=0, vmax=matrix.max() or 1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                axes.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center", fontsize=7,
                          color="white" if matrix[i, j] > 0.6 * (matrix.max() or 1) else "black")
        axes.set_xticks(range(len(classes)), short, rotation=45, ha="right", fontsize=8)
        axes.set_yticks(range(len(classes)), short, fontsize=8)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(label)
    if title:
        figure.suptitle(title)
    return figure


def roc_pr_figures(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> tuple[Figure, Figure]:
    """One-vs-rest ROC curves (with AUC) and precision-recall curves (with AP) for every class present."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    roc, pr = Figure(figsize=(7, 6)), Figure(figsize=(7, 6))
    roc_axes, pr_axes = roc.add_subplot(), pr.add_subplot()
    for index, name in enumerate(classes):
        positive = np.asarray(labels) == index
        if not positive.any() or positive.all():
            continue
        width = 2.5 if name == "melanoma" else 1.2
        fpr, tpr, _ = roc_curve(positive, probabilities[:, index])
        roc_axes.plot(fpr, tpr, linewidth=width, label=f"{name} (AUC {auc(fpr, tpr):.2f})")
        precision, recall, _ = precision_recall_curve(positive, probabilities[:, index])
        pr_axes.plot(recall, precision, linewidth=width,
                     label=f"{name} (AP {average_precision_score(positive, probabilities[:, index]):.2f})")
    roc_axes.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    roc_axes.set(xlabel="false positive rate", ylabel="true positive rate (sensitivity)", title="ROC, one vs rest")
    pr_axes.set(xlabel="recall", ylabel="precision", title="Precision-recall, one vs rest")
    for axes in (roc_axes, pr_axes):
        axes.legend(fontsize=7, loc="lower right" if axes is roc_axes else "lower left")
        axes.grid(alpha=0.3)
    return roc, pr
