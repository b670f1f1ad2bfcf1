"""Does a run tell melanoma from nevus by the lesion, or by the image's age? A validation-only diagnostic.

ISIC ids below ISIC_0010000 are the archive's oldest images (the 2016-2017 challenge era). In this dataset almost
every training nevus is from that era while half of the training melanomas are newer, so "new-looking image" is a
shortcut to "not a nevus" that a validation score over all images rewards. This script re-scores each run's own
validation split (drawn from Train; nothing from Test is scored) and reports melanoma-vs-rest AUC and melanoma recall
at the run's alert threshold over all validation images and over the old-era ones only, where the shortcut is no use.

    python benchmarks/era_shift.py RUN [RUN ...] [--json FILE]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from _common import print_table, write_results
from melanoma.data import ERAS, MELANOMA, acquisition_era
from melanoma.inference import Run
from melanoma.io import read_json
from melanoma.training import TrainConfig, prepare_data

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
                "melanoma_auc": float(roc_auc_score(is_melanoma[mask], probs[mask, melanoma])),
                "melanoma_recall_at_alert": float(alert[positives].mean()),
                "melanomas_called_nevus": float((probs[positives].argmax(1) == nevus).mean())}

    return {"run": str(run_dir), "threshold": run.threshold, "all": summary(np.ones(len(old), dtype=bool)),
            "old_era": summary(old)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = [era_scores(run) for run in args.runs]
    rows = [{"run": r["run"], "validation images": subset, "n (melanomas)": f"{r[subset]['images']} "
             f"({r[subset]['melanomas']})", "melanoma AUC": r[subset]["melanoma_auc"],
             "recall at alert": r[subset]["melanoma_recall_at_alert"],
             "melanomas called nevus": r[subset]["melanomas_called_nevus"]}
            for r in results for subset in ("all", "old_era")]
    print_table(rows, list(rows[0]))
    write_results("era_shift", {"results": results}, args.json)


if __name__ == "__main__":
    main()
