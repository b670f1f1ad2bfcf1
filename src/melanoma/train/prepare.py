"""From data source to training arrays: apply the audit's clean-up, decode every image once into the uint8 cache,
split Train into train/validation (stratified, never splitting a lesion or a copy), balance the training part, and
decode the held-out Test split."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from melanoma.audit.manifest import (
    Selection,
    read_clean_manifest,
    select_heldout,
    select_training_pool,
    select_validation,
)
from melanoma.config import TrainConfig, resolve_image_size, split_seed
from melanoma.core.errors import DataError, RunError
from melanoma.core.text import display_name
from melanoma.data.images import build_cache
from melanoma.data.records import DatasetIndex
from melanoma.data.sources import load_dataset
from melanoma.runs.layout import AUDIT_DIR
from melanoma.train.balance import Balance, class_counts, expand, parse_balance
from melanoma.train.splits import grouped_stratified_split, random_split


@dataclass
class PreparedData:
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_leaked: np.ndarray
    test_names: list[str]
    split_rows: list[dict]
    summary: dict
    train_sources: np.ndarray       # for expanded copies: the index in pool_names each came from; -1 for originals
    pool_names: list[str]           # every image of the training pool (before the train/validation split)


def load_clean_manifest(config: TrainConfig, index: DatasetIndex, run_dir: Path | None) -> list[dict]:
    """The audit's per-image actions: read from --audit, or made now by auditing the data into the run folder.

    Even with --no-clean the audit is used, to mark which Test images leaked into Train ("clean" Test scores).
    """
    if config.audit:
        return read_clean_manifest(config.audit)
    from melanoma.audit.report import audit_now
    from melanoma.data.truth import load_ground_truth

    truth = load_ground_truth(config.truth) if config.truth else None
    return audit_now(index, truth, None if run_dir is None else run_dir / AUDIT_DIR)


def prepare_data(config: TrainConfig, run_dir: Path | None = None, log=print) -> PreparedData:
    """Discover, clean, decode once, split (grouped and stratified) and balance; all seeded."""
    config = config.resolved()
    index = load_dataset(config.data, image_root=config.image_root)
    manifest = load_clean_manifest(config, index, run_dir)
    pool = select_training_pool(index, manifest if config.clean else None, relabel=config.relabel)
    given_val = select_validation(index, manifest if config.clean else None, relabel=config.relabel)
    if given_val is not None and config.protocol != "leak-free":
        raise DataError(f"{display_name(index.root)}: the data has its own validation split; protocol "
                        f"'{config.protocol}' splits the pool at random instead (use --protocol leak-free)")
    classes = sorted(set(index.classes))
    _check_labels_known(pool, classes)
    size = resolve_image_size(config)
    records = pool.records + (given_val.records if given_val else [])
    pool_labels = pool.labels + (given_val.labels if given_val else [])
    pool_groups = pool.groups + (given_val.groups if given_val else [])
    pool_cache = build_cache(records, size=size)
    keep = [i for i in range(len(records)) if i not in pool_cache.errors]
    images = pool_cache.images[keep]
    labels = np.asarray([classes.index(pool_labels[i]) for i in keep])
    groups = [pool_groups[i] for i in keep]
    names = [display_name(records[i].rel_path) for i in keep]
    keys = [records[i].identity for i in keep]
    sources = [records[i].source for i in keep]
    in_val = np.asarray([i >= len(pool.records) for i in keep], dtype=bool)
    balance = parse_balance(config.balance)
    if config.protocol == "leaky":
        split = _leaky_expand_then_split(images, labels, names, sources, balance, len(classes), config)
    elif config.protocol == "leak-free":
        split = _split_then_expand(images, labels, groups, names, sources, balance, classes, config,
                                   given_val=in_val if given_val else None)
    else:
        raise RunError(f"unknown protocol '{config.protocol}' (leak-free or leaky)")
    _add_keys(split["split_rows"], keys)
    test = select_heldout(index, config.test_split, manifest) if config.test_split else None
    test_part = _decode_heldout(test, classes, size)
    _warn_untrained_classes(classes, labels, test_part["test_labels"], log)
    summary = _data_summary(index, pool, manifest, classes, split, test_part, config)
    summary |= _unused_summary(index, config, given_val, test)
    prepared = PreparedData(classes=classes, **split, **test_part, pool_names=names, summary=summary)
    _log_data_summary(prepared.summary, log)
    return prepared


def train_image_names(data: PreparedData) -> list[str]:
    """The file each training image is (or, for an expanded copy, was made from), in training order."""
    names = [row["path"] for row in data.split_rows if row["role"] == "train"]
    return names + [data.pool_names[source] for source in data.train_sources[len(names):]]


def _warn_untrained_classes(classes: list[str], train_pool: np.ndarray, held_out: np.ndarray, log) -> None:
    """A class with held-out images but none left to train on cannot be learnt: say so before training."""
    for label in sorted(set(held_out.tolist()) - set(train_pool.tolist())):
        log(f"warning: class '{classes[label]}' has {int((held_out == label).sum())} Test image(s) but no training "
            "images (after the audit's clean-up): the model cannot learn it, and its Test recall will be 0")


def _check_labels_known(pool: Selection, classes: list[str]) -> None:
    unknown = sorted(set(pool.labels) - set(classes))
    if unknown:
        raise DataError(f"labels not among the dataset's classes: {', '.join(unknown)}")


def _add_keys(rows: list[dict], keys: list[str]) -> None:
    """Each split.csv row gets its record's key (an expanded copy the key of the image it was made from)."""
    for row in rows:
        row["key"] = keys[row.pop("index")]


def _unused_summary(index: DatasetIndex, config: TrainConfig, given_val, test) -> dict:
    """What the run did not use: images of splits that are neither the training pool, the validation split given by
    the data, nor --test-split; and held-out copies dropped so that one picture is scored once."""
    used = {(config.test_split or "").lower()}
    unused = Counter(r.split for r in index.records
                     if not r.in_training_pool and not r.is_validation and r.split.lower() not in used)
    return {"validation_given": len(given_val.records) if given_val else 0, "not_used": dict(sorted(unused.items())),
            "test_dropped": dict(test.dropped) if test is not None else {}}


def _split_then_expand(images, labels, groups, names, data_sources, balance: Balance, classes: list[str],
                       config: TrainConfig, given_val: np.ndarray | None = None):
    num_classes = len(classes)
    if given_val is not None:  # the data's own validation split
        train_idx, val_idx = np.flatnonzero(~given_val), np.flatnonzero(given_val)
    else:
        train_idx, val_idx = grouped_stratified_split(labels, groups, config.val_fraction, split_seed(config),
                                                      classes)
    train_images, train_labels = images[train_idx], labels[train_idx]
    sources = np.full(len(train_idx), -1, dtype=np.int64)
    rows = [{"path": names[i], "label": int(labels[i]), "role": "train", "source": data_sources[i], "index": i}
            for i in train_idx]
    rows += [{"path": names[i], "label": int(labels[i]), "role": "val", "source": data_sources[i], "index": i}
             for i in val_idx]
    if balance.mode == "expand":
        new_images, new_labels, new_sources = expand(train_images, train_labels, balance.copies, num_classes,
                                                     config.seed)
        train_images = np.concatenate([train_images, new_images])
        train_labels = np.concatenate([train_labels, new_labels])
        sources = np.concatenate([sources, train_idx[new_sources]])
    return {"train_images": train_images, "train_labels": train_labels, "val_images": images[val_idx],
            "val_labels": labels[val_idx], "split_rows": rows, "train_sources": sources}


def _leaky_expand_then_split(images, labels, names, data_sources, balance: Balance, num_classes: int,
                             config: TrainConfig):
    """The course notebook's protocol, kept to measure its leak: expand the whole pool, *then* split at random."""
    sources = np.arange(len(labels))
    if balance.mode == "expand":
        new_images, new_labels, new_sources = expand(images, labels, balance.copies, num_classes, config.seed)
        images, labels = np.concatenate([images, new_images]), np.concatenate([labels, new_labels])
        sources = np.concatenate([sources, new_sources])
    train_idx, val_idx = random_split(len(labels), config.val_fraction, split_seed(config))
    origin = [names[s] + ("" if i < len(names) else " (expanded copy)") for i, s in enumerate(sources)]
    rows = [{"path": origin[i], "label": int(labels[i]), "role": role, "source": data_sources[sources[i]],
             "index": int(sources[i])}
            for role, part in (("train", train_idx), ("val", val_idx)) for i in part]
    train_sources = np.where(np.arange(len(labels))[train_idx] >= len(names), sources[train_idx], -1)
    return {"train_images": images[train_idx], "train_labels": labels[train_idx], "val_images": images[val_idx],
            "val_labels": labels[val_idx], "split_rows": rows, "train_sources": train_sources}


def _decode_heldout(test: Selection | None, classes: list[str], size: int) -> dict:
    empty = np.zeros((0, size, size, 3), dtype=np.uint8)
    if test is None or not test.records:
        return {"test_images": empty, "test_labels": np.zeros(0, dtype=np.int64),
                "test_leaked": np.zeros(0, dtype=bool), "test_names": []}
    unknown = sorted(set(test.labels) - set(classes))
    if unknown:
        raise DataError(f"held-out classes missing from training: {', '.join(unknown)}")
    cache = build_cache(test.records, size=size)
    keep = [i for i in range(len(test.records)) if i not in cache.errors]
    return {"test_images": cache.images[keep],
            "test_labels": np.asarray([classes.index(test.labels[i]) for i in keep], dtype=np.int64),
            "test_leaked": np.asarray([test.leaked[i] for i in keep], dtype=bool),
            "test_names": [display_name(test.records[i].rel_path) for i in keep]}


def _data_summary(index, pool: Selection, manifest, classes, split, test_part, config) -> dict:
    def counts(labels):
        return dict(zip(classes, class_counts(labels, len(classes)).tolist()))

    roles = Counter((row["source"], row["role"]) for row in split["split_rows"])
    sources = [source | {"train": roles[(source["name"], "train")], "val": roles[(source["name"], "val")]}
               for source in index.sources]
    return {"data": [display_name(path) for path in config.data], "root": str(index.root.absolute()),
            "sources": sources, "cleaned": config.clean, "dropped": dict(pool.dropped),
            "relabelled": pool.relabelled, "protocol": config.protocol, "balance": config.balance,
            "train": len(split["train_labels"]), "expanded_copies": int((split["train_sources"] >= 0).sum()),
            "val": len(split["val_labels"]), "test": len(test_part["test_labels"]),
            "test_clean": int((~test_part["test_leaked"]).sum()),
            "train_counts": counts(split["train_labels"]), "val_counts": counts(split["val_labels"]),
            "test_counts": counts(test_part["test_labels"])}


def _log_data_summary(summary: dict, log) -> None:
    if summary["cleaned"]:
        dropped = ", ".join(f"{v} {k}" for k, v in summary["dropped"].items()) or "nothing"
        log(f"clean manifest: dropped {dropped}; relabelled {summary['relabelled']}")
    else:
        log("--no-clean: training on the folders as they are")
    log(f"train {summary['train']} (of which {summary['expanded_copies']} expanded copies), val {summary['val']}"
        + (" (the data's own validation split)" if summary.get("validation_given") else "")
        + f", test {summary['test']} ({summary['test_clean']} not leaked into Train)")
    if summary.get("test_dropped"):
        log("test: not scored " + ", ".join(f"{v} {k}" for k, v in summary["test_dropped"].items())
            + " (a picture found in two sources is scored once)")
    if summary.get("not_used"):
        log("not used: " + ", ".join(f"{v} {k or '(no split)'} image(s)" for k, v in summary["not_used"].items()))
