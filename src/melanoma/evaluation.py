"""Metrics, and ``melanoma evaluate RUN``.

``compute_metrics`` is the only place metrics are computed from labels and probabilities (the probabilities come
from :mod:`melanoma.probabilities`, the only place a model meets evaluation images); ``bootstrap_ci`` puts
confidence intervals on the headline numbers; ``threshold_for_sensitivity`` chooses the melanoma alert threshold.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from melanoma.data import MELANOMA


def compute_metrics(labels: Sequence[int], probabilities: np.ndarray, classes: Sequence[str],
                    melanoma_threshold: float | None = None) -> dict:
    """Accuracy, balanced accuracy, macro F1, per-class table, confusion matrix and melanoma-vs-rest figures."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1) if len(labels) else labels
    present = np.unique(labels)
    all_classes = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=all_classes,
                                                                     zero_division=0)
    metrics = {
        "n": int(len(labels)),
        "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
        # balanced accuracy and macro F1 over the classes present in this split (absent ones have no recall)
        "balanced_accuracy": float(recall[present].mean()) if len(labels) else float("nan"),
        "macro_f1": float(f1[present].mean()) if len(labels) else float("nan"),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i]), "auc": _one_vs_rest_auc(labels == i, probabilities[:, i])}
                      for i, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(labels, predicted, labels=all_classes).tolist(),
    }
    if MELANOMA in classes:
        metrics["melanoma"] = melanoma_metrics(labels == list(classes).index(MELANOMA),
                                               probabilities[:, list(classes).index(MELANOMA)] if len(labels) else
                                               np.zeros(0), predicted == list(classes).index(MELANOMA),
                                               melanoma_threshold)
    return metrics


def _one_vs_rest_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if not positive.any() or positive.all():
        return None
    return float(roc_auc_score(positive, score))


def melanoma_metrics(is_melanoma: np.ndarray, melanoma_probability: np.ndarray, predicted_melanoma: np.ndarray,
                     threshold: float | None) -> dict:
    """Melanoma vs rest: AUC, and sensitivity/specificity of the top-class call and (if given) of the alert
    threshold."""
    from sklearn.metrics import roc_auc_score

    positives, negatives = is_melanoma.sum(), (~is_melanoma).sum()
    result = {"positives": int(positives), "negatives": int(negatives),
              "auc": float(roc_auc_score(is_melanoma, melanoma_probability)) if positives and negatives else None,
              "recall_top_class": _rate(predicted_melanoma & is_melanoma, positives),
              "specificity_top_class": _rate(~predicted_melanoma & ~is_melanoma, negatives)}
    if threshold is not None:
        alert = melanoma_probability >= threshold
        result.update({"threshold": float(threshold), "sensitivity": _rate(alert & is_melanoma, positives),
                       "specificity": _rate(~alert & ~is_melanoma, negatives)})
    return result


def _rate(hits: np.ndarray, total: int) -> float | None:
    return float(hits.sum() / total) if total else None


def threshold_for_sensitivity(is_melanoma: np.ndarray, melanoma_probability: np.ndarray,
                              target: float = 0.9) -> dict:
    """The highest alert threshold whose sensitivity reaches ``target`` (missing a melanoma costs far more than a
    false alarm), with the specificity it costs. Chosen on validation, never on Test."""
    is_melanoma = np.asarray(is_melanoma, dtype=bool)
    positives = np.sort(np.asarray(melanoma_probability)[is_melanoma])[::-1]
    if len(positives) == 0:
        return {"threshold": 0.5, "target_sensitivity": target, "sensitivity": None, "specificity": None,
                "note": "no melanoma in the validation split; default threshold 0.5"}
    needed = int(np.ceil(target * len(positives)))
    threshold = float(positives[max(needed, 1) - 1])
    alert = melanoma_probability >= threshold
    negatives = ~is_melanoma
    return {"threshold": threshold, "target_sensitivity": target,
            "sensitivity": float(alert[is_melanoma].mean()),
            "specificity": float((~alert[negatives]).mean()) if negatives.any() else None}


CI_METRICS = ("balanced_accuracy", "macro_f1", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def headline(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
             threshold: float | None) -> dict[str, float | None]:
    """The few numbers reported with confidence intervals, in plain numpy (fast enough for 1,000 resamples);
    ``tests/test_evaluation.py`` checks them against scikit-learn."""
    from scipy.stats import rankdata

    labels = np.asarray(labels)
    k = len(classes)
    predicted = probabilities.argmax(axis=1)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    support, called, hits = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    present = support > 0
    recall = np.divide(hits, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(hits, called, out=np.zeros(k), where=called > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    result = {"balanced_accuracy": float(recall[present].mean()), "macro_f1": float(f1[present].mean()),
              "melanoma_auc": None, "melanoma_sensitivity": None, "melanoma_specificity": None}
    if MELANOMA not in classes:
        return result
    score = probabilities[:, list(classes).index(MELANOMA)]
    positive = labels == list(classes).index(MELANOMA)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos and n_neg:
        ranks = rankdata(score)
        result["melanoma_auc"] = float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    if threshold is not None:
        alert = score >= threshold
        result["melanoma_sensitivity"] = float(alert[positive].mean()) if n_pos else None
        result["melanoma_specificity"] = float((~alert[~positive]).mean()) if n_neg else None
    return result


def bootstrap_ci(labels: Sequence[int], probabilities: np.ndarray, classes: Sequence[str], threshold: float | None,
                 resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Stratified bootstrap (resampling within each class, so every resample keeps the class counts) of the
    headline metrics: point value and the central ``level`` percentile interval."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    point = headline(labels, probabilities, classes, threshold)
    samples: dict[str, list[float]] = {name: [] for name in CI_METRICS}
    for _ in range(resamples):
        picked = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        for name, value in headline(labels[picked], probabilities[picked], classes, threshold).items():
            if value is not None:
                samples[name].append(value)
    tail = (1 - level) / 2 * 100
    return {name: {"value": point[name],
                   "low": float(np.percentile(samples[name], tail)) if samples[name] else None,
                   "high": float(np.percentile(samples[name], 100 - tail)) if samples[name] else None}
            for name in CI_METRICS}


# ---------------------------------------------------------------------------------------------------------------
# Metrics per subgroup (who is in which group: melanoma.subgroups)

SUBGROUP_METRICS = ("balanced_accuracy", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def subgroup_metrics(labels: Sequence[int], probabilities: np.ndarray, classes: Sequence[str],
                     threshold: float | None, groups: dict[str, list[str]], resamples: int = 1000,
                     seed: int = 0) -> dict:
    """Per attribute (``groups``: attribute -> each image's group): how many images have it recorded, and one entry
    per group with n, melanomas, whether it is too small to read, and each metric as value/low/high."""
    from melanoma.subgroups import FROM_METADATA, UNKNOWN, ordered_groups

    labels = np.asarray(labels)
    table = {}
    for attribute, per_image in groups.items():
        per_image = np.asarray(per_image, dtype=object)
        recorded = int((per_image != UNKNOWN).sum())
        names = [] if attribute in FROM_METADATA and recorded == 0 else ordered_groups(attribute, per_image)
        table[attribute] = {"recorded": recorded, "groups": [
            _group_entry(name, labels[per_image == name], probabilities[per_image == name], classes, threshold,
                         resamples, seed) for name in names]}
    return table


def _group_entry(name: str, labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
                 threshold: float | None, resamples: int, seed: int) -> dict:
    from melanoma.subgroups import MIN_IMAGES, MIN_MELANOMAS

    metrics = compute_metrics(labels, probabilities, classes, threshold)
    melanoma = metrics.get("melanoma") or {}
    values = {"balanced_accuracy": metrics["balanced_accuracy"], "melanoma_auc": melanoma.get("auc"),
              "melanoma_sensitivity": melanoma.get("sensitivity"),
              "melanoma_specificity": melanoma.get("specificity")}
    intervals = bootstrap_ci(labels, probabilities, classes, threshold, resamples=resamples, seed=seed) \
        if resamples and len(labels) else {}
    melanomas = int(melanoma.get("positives", 0))
    entry = {"group": name, "n": int(len(labels)), "melanomas": melanomas,
             "too_small": bool(len(labels) < MIN_IMAGES or melanomas < MIN_MELANOMAS)}
    for metric in SUBGROUP_METRICS:
        bounds = intervals.get(metric) or {}
        entry[metric] = {"value": values[metric], "low": bounds.get("low"), "high": bounds.get("high")}
    return entry


def subgroup_report(splits: dict[str, tuple], classes: Sequence[str], threshold: float | None, index=None,
                    truth: Sequence[str] = (), extra: Sequence[str] = (), resamples: int = 1000, seed: int = 0,
                    log=print) -> dict:
    """The ``subgroups`` section of metrics.json. ``splits``: name -> (file names, data sources, labels,
    probabilities); the metadata is joined by image id from ``index``'s sources, ``truth`` and ``extra``
    (--metadata files) by :func:`melanoma.metadata.load_metadata`."""
    from melanoma.metadata import load_metadata, metadata_notes
    from melanoma.subgroups import MIN_IMAGES, MIN_MELANOMAS, image_groups

    metadata = load_metadata(index, truth, extra)
    for note in metadata_notes(metadata):
        log(f"warning: {note}")
    section = {"min_images": MIN_IMAGES, "min_melanomas": MIN_MELANOMAS, "resamples": resamples, "level": 0.95,
               "threshold": threshold, "metadata": metadata.read_from}
    for split, (names, sources, labels, probabilities) in splits.items():
        section[split] = subgroup_metrics(labels, probabilities, classes, threshold,
                                          image_groups(names, sources, metadata), resamples, seed)
    return section


def training_subgroups(config, data, val_probs: np.ndarray, test_probs: np.ndarray | None,
                       threshold: float | None, log=print) -> dict:
    """The ``subgroups`` section at the end of training: validation (split.csv's val rows) and Test (all images),
    with metadata from the run's data sources, --truth and --metadata files. A metadata file that fails now is a
    warning in the log and an ``error`` in the section, not a lost run."""
    import time

    from melanoma.data import DataError
    from melanoma.sources import load_dataset
    from melanoma.subgroups import sources_by_name

    started = time.perf_counter()
    try:
        index = load_dataset(config.data, image_root=getattr(config, "image_root", None))
        val_rows = [row for row in data.split_rows if row["role"] == "val"]
        splits = {"validation": ([row["path"] for row in val_rows], [row.get("source", "") for row in val_rows],
                                 data.val_labels, val_probs)}
        if test_probs is not None and len(data.test_labels):
            by_name = sources_by_name(index)
            splits["test"] = (data.test_names, [by_name.get(name, "") for name in data.test_names],
                              data.test_labels, test_probs)
        section = subgroup_report(splits, data.classes, threshold, index, config.truth,
                                  getattr(config, "metadata", []), resamples=config.bootstrap, seed=config.seed,
                                  log=log)
    except DataError as exc:
        log(f"warning: no subgroup metrics: {exc}")
        return {"error": str(exc)}
    section["seconds"] = round(time.perf_counter() - started, 1)
    return section


# ---------------------------------------------------------------------------------------------------------------
# melanoma evaluate RUN


def evaluate_run(run_dir: str, data: str | None = None, split: str = "Test", out: str | None = None,
                 resamples: int = 1000, target_sensitivity: float = 0.9, log=print,
                 metadata: Sequence[str] = ()) -> dict:
    """Score a trained run on one split of a dataset: metrics with CIs on all and clean images, per subgroup (with
    ``metadata``: --metadata files besides the run's own), plots, predictions."""
    from pathlib import Path

    from melanoma.data import build_cache, display_name
    from melanoma.metadata import check_metadata_files
    from melanoma.sources import load_dataset
    from melanoma.splits import HELDOUT_COPIES, select_heldout
    from melanoma.run import Run
    from melanoma.io import save_figure, write_csv, write_json
    from melanoma.plots import confusion_figure, roc_pr_figures

    check_metadata_files(metadata)
    run = Run.load(run_dir)
    index = load_dataset(data or run.config["config"]["data"])
    _check_same_classes(run.classes, index.classes)
    # the held-out images as training scored them: one vote per picture (a copy in a second source is not scored)
    # (an unreadable file stays: it is reported as an error row, not silently left out)
    heldout = select_heldout(index, split, _audit_rows(Path(run_dir), run.config["config"], index,
                                                       _split_records(index, split)), HELDOUT_COPIES)
    records, leaked = heldout.records, heldout.leaked
    if heldout.dropped:
        log(f"not scored, as the audit says: {', '.join(f'{n} {action}' for action, n in heldout.dropped.items())}")
    cache = build_cache(records, size=run.image_size)
    ok = cache.ok_indices
    labels = np.asarray([run.classes.index(records[i].label) for i in ok])
    probs = run.probabilities(cache.images[ok])
    clean = np.asarray([not leaked[i] for i in ok], dtype=bool)
    report = {"run": str(run_dir), "data": display_name(index.root), "split": split, "tta": run.tta,
              "alert_threshold": run.threshold, "unreadable": [cache.errors[i] for i in sorted(cache.errors)],
              "not_scored": dict(heldout.dropped)}
    for subset, mask in (("all", np.ones(len(ok), dtype=bool)), ("clean", clean)):
        scores = compute_metrics(labels[mask], probs[mask], run.classes, run.threshold)
        if resamples and mask.any():
            scores["ci"] = bootstrap_ci(labels[mask], probs[mask], run.classes, run.threshold, resamples=resamples)
        if MELANOMA in run.classes and mask.any():
            m = run.classes.index(MELANOMA)
            # For information only: which threshold *this* split would need; the run's threshold came from validation.
            scores["threshold_for_target_sensitivity"] = threshold_for_sensitivity(labels[mask] == m, probs[mask, m],
                                                                                   target_sensitivity)
        report[subset] = scores
    from melanoma.consistency import consistency_summary, stress_consistency

    report["consistency"] = {"stresses": stress_consistency(run.probabilities, cache.images[ok], run.classes,
                                                            run.threshold, base=probs)}
    log(consistency_summary(report["consistency"]))
    report["subgroups"] = subgroup_report(
        {split.lower(): ([records[i].rel_path for i in ok], [records[i].source for i in ok], labels, probs)},
        run.classes, run.threshold, index, *_run_metadata_files(run.config["config"], metadata, log),
        resamples=resamples, log=log)
    out_dir = Path(out or Path(run_dir) / f"evaluation-{split.lower()}")
    write_json(out_dir / "metrics.json", report)
    save_figure(confusion_figure(report["all"]["confusion_matrix"], run.classes, f"{split} (n={len(ok)})"),
                out_dir / "confusion.png")
    roc, pr = roc_pr_figures(labels, probs, run.classes)
    save_figure(roc, out_dir / "roc.png")
    save_figure(pr, out_dir / "pr.png")
    rows = [{"image": records[i].rel_path, "label": records[i].label, "leaked": int(leaked[i]),
             "predicted": run.classes[int(p.argmax())], **{c: f"{v:.6f}" for c, v in zip(run.classes, p)}}
            for i, p in zip(ok, probs)]
    rows += [{"image": records[i].rel_path, "label": records[i].label, "error": cache.errors[i]}
             for i in sorted(cache.errors)]
    write_csv(out_dir / "predictions.csv", rows, ["image", "label", "leaked", "predicted", *run.classes, "error"])
    for message in report["unreadable"]:
        log(f"warning: not scored: {message}")
    _log_evaluation(report, out_dir, log)
    return report


def _run_metadata_files(settings: dict, metadata: Sequence[str], log) -> tuple[list[str], list[str]]:
    """(truth files, metadata files): the run's own that still exist (a moved one is a warning), then ``metadata``."""
    from pathlib import Path

    own = {"truth": [], "metadata": []}
    for key in own:
        for path in settings.get(key) or []:
            if Path(path).is_file():
                own[key].append(path)
            else:
                log(f"warning: the run's --{key} file {path} is gone; subgroups without it")
    return own["truth"], [*own["metadata"], *metadata]


def _split_records(index, split: str):
    from melanoma.data import DataError, display_name

    available = index.splits
    on_disk = any(p.is_dir() and p.name.lower() == split.lower() for p in index.root.iterdir())
    if not on_disk and not any(s.lower() == split.lower() for s in available):
        raise DataError(f"{display_name(index.root)}: no split '{split}' (available: "
                        f"{', '.join(s or '(no split folders)' for s in available)})")
    records = index.in_split(split)
    if not records:
        raise DataError(f"{display_name(index.root)}: split '{split}' has no images")
    return records


def _check_same_classes(run_classes: Sequence[str], data_classes: Sequence[str]) -> None:
    from melanoma.data import DataError

    if list(run_classes) != list(data_classes):
        missing = sorted(set(run_classes) - set(data_classes))
        extra = sorted(set(data_classes) - set(run_classes))
        raise DataError("the data's classes differ from the run's: "
                        + (f"missing from the data: {', '.join(missing)}; " if missing else "")
                        + (f"not known to the model: {', '.join(extra)}; " if extra else "")
                        + f"run: {', '.join(run_classes)} | data: {', '.join(data_classes)}")


def _audit_rows(run_dir, run_config: dict, index, records) -> list[dict]:
    """The clean-manifest rows of the audit the run trained with (its --audit folder or its own), when that audit
    covers ``records``; else a fresh audit of ``index``."""
    import csv as csv_module

    from melanoma.consistency import audit_folder
    from melanoma.splits import record_key, rows_by_key

    manifest_path = audit_folder(run_config, run_dir) / "clean_manifest.csv"
    rows: list[dict] = []
    if manifest_path.is_file():  # written with surrogateescape: a file name that is not UTF-8 reads back as it was
        with open(manifest_path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            rows = list(csv_module.DictReader(handle))
    by_key = rows_by_key(rows)
    if not rows or not all(record_key(r, by_key) in by_key for r in records):
        from melanoma.audit import run_audit

        rows = run_audit(index).manifest
    return rows


def _log_evaluation(report: dict, out_dir, log) -> None:
    for subset in ("all", "clean"):
        m = report[subset]
        ci = m.get("ci", {})
        balanced = _with_ci(ci, "balanced_accuracy", m["balanced_accuracy"])
        parts = [f"{subset} (n={m['n']}): balanced accuracy {balanced}",
                 f"macro F1 {m['macro_f1']:.3f}"]
        if "melanoma" in m:
            parts.append(f"melanoma AUC {_with_ci(ci, 'melanoma_auc', m['melanoma']['auc'])}")
            if m["melanoma"].get("sensitivity") is not None:
                parts.append(f"sensitivity {_with_ci(ci, 'melanoma_sensitivity', m['melanoma']['sensitivity'])} / "
                             f"specificity {_with_ci(ci, 'melanoma_specificity', m['melanoma']['specificity'])} "
                             f"at threshold {report['alert_threshold']:.3f}")
        log("  " + ", ".join(parts))
    _log_subgroups(report.get("subgroups") or {}, log)
    log(f"wrote {out_dir}")


def _log_subgroups(section: dict, log) -> None:
    from melanoma.subgroups import subgroup_lines

    for split, table in section.items():
        if isinstance(table, dict) and all(isinstance(part, dict) and "groups" in part for part in table.values()):
            log(f"per subgroup ({split}; 'too small to read': under {section['min_images']} images or "
                f"{section['min_melanomas']} melanomas):")
            for line in subgroup_lines(table):
                log("  " + line)


def _with_ci(ci: dict, name: str, value) -> str:
    if value is None:
        return "n/a"
    bounds = ci.get(name)
    if not bounds or bounds["low"] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{bounds['low']:.3f}, {bounds['high']:.3f}]"
