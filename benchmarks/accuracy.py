"""Train the default recipe (ImageNet EfficientNet-Lite0 fine-tuning) on the shared data, leak-cleaned, and report
Test metrics with 95% stratified-bootstrap CIs on "all" and "clean" (not leaked into Train) Test images.

    python benchmarks/accuracy.py [--out runs/bench-accuracy] [--json FILE] [any `melanoma train` flag ...]

e.g. `--epochs 8 --image-size 180`, `--model tf_efficientnet_lite2`, `--era-balance`, `--accelerator gpu`. The
data (the README main job's: the course set and isic-extra, unless `--data` is given), truth files, --overwrite and
--no-progress are filled in; everything else means what `melanoma train --help` says. Without --json the result goes
to benchmarks/results/accuracy_<model>[_gpu].json.

Targets (issue #17): clean Test balanced accuracy >= 0.75 and melanoma AUC >= 0.90, old-era validation melanoma AUC
>= 0.90; the README main job, install included, <= 20 minutes on a 2-core CPU. Everything is chosen on the
validation split; Test is only scored.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import TRUTH_FILES, default_sources, print_table, write_results
from melanoma.arguments import build_parser
from melanoma.cli import _quiet_lightning, _train_config
from melanoma.config import TrainConfig
from melanoma.training import train

ROWS = ("balanced_accuracy", "macro_f1", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def benchmark_config(out: str, train_flags: list[str]) -> TrainConfig:
    """The config `melanoma train` would build from these flags, on the shared data with the official truth."""
    data = [] if "--data" in train_flags else ["--data", *map(str, default_sources())]
    argv = ["train", *data, "--truth", *map(str, TRUTH_FILES), "--out", out, "--overwrite", "--no-progress",
            *train_flags]
    return _train_config(build_parser().parse_args(argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-accuracy")
    parser.add_argument("--json", help="result file (default: benchmarks/results/accuracy_<model>[_gpu].json)")
    args, train_flags = parser.parse_known_args()
    config = benchmark_config(args.out, train_flags)
    _quiet_lightning()
    start = time.perf_counter()
    run_dir = train(config)
    minutes = (time.perf_counter() - start) / 60
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    rows = []
    for subset in ("all", "clean"):
        test = metrics["test"][subset]
        for name in ROWS:
            ci = test["ci"][name]
            rows.append({"test": f"{subset} (n={test['n']})", "metric": name, "value": ci["value"],
                         "ci95_low": ci["low"], "ci95_high": ci["high"]})
    print_table(rows, ["test", "metric", "value", "ci95_low", "ci95_high"])
    print(f"alert threshold {metrics['alert']['threshold']:.3f} (validation sensitivity "
          f"{metrics['alert']['sensitivity']:.2f}); trained in {minutes:.1f} min; run folder {run_dir}")
    config_used = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    # write_results adds the machine (processor, GPU model) to the JSON
    write_results(f"accuracy_{config.model}" + ("" if config.accelerator == "cpu" else "_gpu"),
                  {"run": str(run_dir), "train_minutes": round(minutes, 2), "train_flags": train_flags,
                   "config": config_used, "alert": metrics["alert"],
                   "validation_balanced_accuracy": metrics["validation"]["balanced_accuracy"],
                   **{key: {name: {"n": part["n"], "balanced_accuracy": part["balanced_accuracy"],
                                   "melanoma_auc": part["per_class"]["melanoma"]["auc"]}
                            for name, part in metrics.get(key, {}).items()}
                      for key in ("validation_by_era", "validation_by_source")},
                   "results": rows}, args.json)


if __name__ == "__main__":
    main()
