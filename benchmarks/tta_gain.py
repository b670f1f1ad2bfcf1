"""Is 8-view test-time augmentation worth its cost? A validation-only measurement for one trained run.

Re-scores the run's own validation split (drawn from its training data; nothing from Test) with and without the 8
dihedral views, with the run's best checkpoint, and reports balanced accuracy and melanoma AUC over all validation
images and within the 2016-17 archive era, beside the seconds per image each setting costs on this machine. The
recipe (and the server) keep TTA only where the gain is worth the cost; see docs/results.md for the rule.

    python benchmarks/tta_gain.py RUN [--json FILE]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import print_table, write_results

from melanoma.assess.metrics import compute_metrics
from melanoma.config import TrainConfig
from melanoma.data.records import ERAS, MELANOMA, acquisition_era
from melanoma.models.probabilities import predict_probabilities
from melanoma.runs.checkpoint import load_checkpoint, model_from_checkpoint
from melanoma.runs.layout import BEST, CHECKPOINT_DIR, CONFIG, read_run_json
from melanoma.train.prepare import prepare_data


def validation_split(run_dir: Path):
    """The run's validation images and labels, re-made from its own config and audit (no re-hashing)."""
    config = TrainConfig.from_dict(read_run_json(run_dir / CONFIG, require="config")["config"])
    config.test_split = ""
    if (run_dir / "audit" / "clean_manifest.csv").is_file():
        config.audit = str(run_dir / "audit")
    data = prepare_data(config, log=lambda *_: None)
    names = [row["path"] for row in data.split_rows if row["role"] == "val"]
    return data, np.array([acquisition_era(name) == ERAS[0] for name in names])


def scores(labels: np.ndarray, probs: np.ndarray, classes: list[str], old: np.ndarray) -> dict:
    result = {}
    for name, mask in (("all", np.ones(len(labels), dtype=bool)), ("old era", old)):
        metrics = compute_metrics(labels[mask], probs[mask], classes)
        result[name] = {"n": int(mask.sum()), "balanced_accuracy": metrics["balanced_accuracy"],
                        "melanoma_auc": metrics["per_class"][MELANOMA]["auc"]}  # None where one side is empty
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--json")
    args = parser.parse_args()
    data, old = validation_split(args.run)
    model, spec = model_from_checkpoint(load_checkpoint(args.run / CHECKPOINT_DIR / BEST))
    rows, results = [], {}
    for tta in (False, True):
        started = time.perf_counter()
        probs = predict_probabilities(model, data.val_images, spec.image_size, tta=tta)
        seconds = (time.perf_counter() - started) / len(data.val_images)
        results["tta" if tta else "no_tta"] = {"seconds_per_image": seconds} | scores(data.val_labels, probs,
                                                                                     data.classes, old)
        part = results["tta" if tta else "no_tta"]
        rows.append({"views": 8 if tta else 1, "ms per image": seconds * 1000,
                     "val bal acc": part["all"]["balanced_accuracy"], "val mel AUC": part["all"]["melanoma_auc"],
                     "old-era bal acc": part["old era"]["balanced_accuracy"],
                     "old-era mel AUC": part["old era"]["melanoma_auc"]})
    print_table(rows, list(rows[0]))
    write_results("tta_gain", {"run": str(args.run), "validation_images": int(len(data.val_labels)),
                               "old_era_images": int(old.sum()), **results}, args.json)


if __name__ == "__main__":
    main()
