"""Does a run tell melanoma from nevus by the lesion, or by the image's age? A validation-only diagnostic.

The "old era" is melanoma.data.records.ERAS[0], the 2016-17 archive: ISIC ids below ISIC_0024306, the archive's images
of the ISIC 2016 and 2017 challenges, before HAM10000 (until issue #25 it was ids below ISIC_0010000, which left most
challenge images in "later"). In this dataset most Train nevi are from the old archive while most Train melanomas are
newer, so "new-looking image" is a shortcut to "not a nevus" that a validation score over all images rewards.
This script re-scores each run's own validation split (drawn from Train; nothing from Test is scored) and reports
melanoma-vs-rest AUC and melanoma recall at the run's alert threshold over all validation images and over the
old-era ones only, where the shortcut is no use.

    python benchmarks/era_shift.py REFERENCE_RUN [RUN ...] [--resamples N] [--json FILE]

Each run's old-era AUC gets a 95% bootstrap interval, and each later run its paired difference from the first (the
same resampled images for every run), because 33 old-era melanomas cannot separate small differences.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _common import print_table, write_results

from melanoma.assess.intervals import percentile_interval, stratified_resamples
from melanoma.assess.metrics import auc
from melanoma.config import TrainConfig
from melanoma.core.io import read_json
from melanoma.data.records import ERAS, MELANOMA, acquisition_era
from melanoma.runs.run import Run
from melanoma.train.prepare import prepare_data


def era_scores(run_dir: Path) -> dict:
    config = TrainConfig.from_dict(read_json(run_dir / "config.json")["config"])
    config.test_split = ""  # the validation split only
    data = prepare_data(config, log=lambda *_: None)
    names = [row["path"] for row in data.split_rows if row["role"] == "val"]
    run = Run.load(run_dir)
    probs = run.probabilities(data.val_images)
    melanoma = data.classes.index(MELANOMA)
    nevus = data.classes.index("nevus")
    is_melanoma = data.val_labels == melanoma
    old = np.array([acquisition_era(name) == ERAS[0] for name in names])
    alert = probs[:, melanoma] >= run.threshold

    def summary(mask: np.ndarray) -> dict:
        positives = is_melanoma & mask
        return {"images": int(mask.sum()), "melanomas": int(positives.sum()),
                "melanoma_auc": auc(is_melanoma[mask], probs[mask, melanoma]),
                "melanoma_recall_at_alert": float(alert[positives].mean()),
                "melanomas_called_nevus": float((probs[positives].argmax(1) == nevus).mean())}

    validation = read_json(run_dir / "metrics.json")["validation"]
    return {"run": str(run_dir), "threshold": run.threshold,
            "validation_balanced_accuracy": validation["balanced_accuracy"],
            "all": summary(np.ones(len(old), dtype=bool)), "old_era": summary(old),
            "_paired": {"names": names, "old": old, "is_melanoma": is_melanoma, "labels": data.val_labels,
                        "score": probs[:, melanoma]}}


def paired_old_era_bootstrap(results: list[dict], resamples: int = 2000, seed: int = 0) -> None:
    """95% intervals of each run's old-era melanoma AUC and of its difference from the first run's, from the same
    resamples of the old-era validation images (within each class, melanoma.assess.intervals). Adds them in place."""
    first = results[0]["_paired"]
    for result in results[1:]:
        if result["_paired"]["names"] != first["names"]:
            raise SystemExit(f"{result['run']} has another validation split than {results[0]['run']}: "
                             "paired comparison needs the same split (train with the same --split-seed)")
    old = np.flatnonzero(first["old"])
    truth = first["is_melanoma"][old]
    aucs = np.array([[auc(truth[rows], result["_paired"]["score"][old][rows]) for result in results]
                     for rows in stratified_resamples(first["labels"][old], resamples, seed)])
    for column, result in enumerate(results):
        difference = aucs[:, column] - aucs[:, 0]
        result["old_era"]["melanoma_auc_ci95"] = list(percentile_interval(aucs[:, column]))
        if column:
            result["old_era"]["auc_minus_first_ci95"] = list(percentile_interval(difference))
            result["old_era"]["share_of_resamples_above_first"] = float((difference > 0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the reference")
    parser.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples (default: 2000)")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = [era_scores(run) for run in args.runs]
    paired_old_era_bootstrap(results, args.resamples)
    rows = []
    for r in results:
        old = r["old_era"]
        difference = old.get("auc_minus_first_ci95")
        rows.append({"run": r["run"], "val bal acc": r["validation_balanced_accuracy"],
                     "AUC all (n mel)": f"{r['all']['melanoma_auc']:.3f} ({r['all']['melanomas']})",
                     "AUC old era (n mel)": f"{old['melanoma_auc']:.3f} ({old['melanomas']})",
                     "old-era 95% CI": "[{:.3f}, {:.3f}]".format(*old["melanoma_auc_ci95"]),
                     "minus first, 95% CI": "[{:+.3f}, {:+.3f}]".format(*difference) if difference else "",
                     "old-era recall at alert": old["melanoma_recall_at_alert"],
                     "old-era melanomas called nevus": old["melanomas_called_nevus"]})
    print_table(rows, list(rows[0]))
    for r in results:
        del r["_paired"]
    write_results("era_shift", {"results": results, "resamples": args.resamples}, args.json)


if __name__ == "__main__":
    main()
