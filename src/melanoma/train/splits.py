"""Seeded splits of the training pool into train and validation that keep a lesion (and every copy of a
picture) on one side, stratified by class."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from melanoma.core.errors import DataError


def grouped_stratified_split(labels: Sequence[int], groups: Sequence[str], val_fraction: float, seed: int,
                             class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices, stratified by class, never splitting a group; seeded."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    check_splittable(labels, groups, val_fraction, class_names)
    folds = max(2, round(1 / val_fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        train_idx, val_idx = next(splitter.split(np.zeros(len(labels)), labels, np.asarray(groups)))
    except ValueError as exc:  # e.g. every class smaller than the number of folds
        raise DataError(f"cannot split {len(labels)} images into a {val_fraction:g} validation share: {exc}") from exc
    return np.sort(train_idx), np.sort(val_idx)


def random_split(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The course notebook's split: a seeded shuffle of all files, 80/20, blind to copies and lesions."""
    order = np.random.default_rng(seed).permutation(count)
    cut = int(round(count * (1 - val_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def check_splittable(labels: np.ndarray, groups: Sequence[str], val_fraction: float,
                     class_names: Sequence[str] | None = None) -> None:
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    groups_per_class: dict[int, set] = {}
    for label, group in zip(labels.tolist(), groups):
        groups_per_class.setdefault(label, set()).add(group)
    if len(groups_per_class) < 2:
        raise DataError("need at least 2 classes with images to train a classifier")
    thin = {label: len(g) for label, g in groups_per_class.items() if len(g) < 2}
    if thin:
        names = class_names or [str(i) for i in range(max(groups_per_class) + 1)]
        raise DataError("too few images to split: " + ", ".join(f"class {names[k]} has {v} independent image(s)"
                                                                 for k, v in thin.items())
                        + "; a train/validation split needs at least 2 per class")
