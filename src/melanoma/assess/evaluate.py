"""``melanoma evaluate``: a finished run scored on a split of its data (Test by default), on the images the
run's audit keeps, with metrics, intervals, curves and per-subgroup tables."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from melanoma.assess.intervals import bootstrap_ci
from melanoma.assess.metrics import compute_metrics, threshold_for_sensitivity
from melanoma.assess.subgroups import subgroup_report
from melanoma.data.records import MELANOMA
from melanoma.runs.layout import CONFUSION, METRICS, PR, ROC

# ---------------------------------------------------------------------------------------------------------------
# melanoma evaluate RUN


def evaluate_run(run_dir: str, data: str | None = None, split: str = "Test", out: str | None = None,
                 resamples: int = 1000, target_sensitivity: float = 0.9, log=print,
                 metadata: Sequence[str] = ()) -> dict:
    """Score a trained run on one split of a dataset: metrics with CIs on all and clean images, per subgroup (with
    ``metadata``: --metadata files besides the run's own), plots, predictions."""
    from pathlib import Path

    from melanoma.audit.manifest import HELDOUT_COPIES, select_heldout
    from melanoma.core.io import save_figure, write_csv, write_json
    from melanoma.core.plots import confusion_figure, roc_pr_figures
    from melanoma.core.text import display_name
    from melanoma.data.images import build_cache
    from melanoma.data.metadata import check_metadata_files
    from melanoma.data.sources import load_dataset
    from melanoma.runs.run import Run

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
    from melanoma.assess.consistency import consistency_summary, stress_consistency

    report["consistency"] = {"stresses": stress_consistency(run.probabilities, cache.images[ok], run.classes,
                                                            run.threshold, base=probs)}
    log(consistency_summary(report["consistency"]))
    report["subgroups"] = subgroup_report(
        {split.lower(): ([records[i].rel_path for i in ok], [records[i].source for i in ok], labels, probs)},
        run.classes, run.threshold, index, *_run_metadata_files(run.config["config"], metadata, log),
        resamples=resamples, log=log)
    out_dir = Path(out or Path(run_dir) / f"evaluation-{split.lower()}")
    write_json(out_dir / METRICS, report)
    save_figure(confusion_figure(report["all"]["confusion_matrix"], run.classes, f"{split} (n={len(ok)})"),
                out_dir / CONFUSION)
    roc, pr = roc_pr_figures(labels, probs, run.classes)
    save_figure(roc, out_dir / ROC)
    save_figure(pr, out_dir / PR)
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
    from melanoma.core.errors import DataError
    from melanoma.core.text import display_name

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
    from melanoma.core.errors import DataError

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
    from melanoma.audit.manifest import manifest_file, read_clean_manifest, record_key, rows_by_key
    from melanoma.audit.report import audit_now
    from melanoma.runs.layout import audit_folder

    folder = audit_folder(run_config, run_dir)
    rows = read_clean_manifest(folder) if manifest_file(folder).is_file() else []
    by_key = rows_by_key(rows)
    if not rows or not all(record_key(r, by_key) in by_key for r in records):
        rows = audit_now(index)
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
    from melanoma.assess.subgroups import subgroup_lines

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
