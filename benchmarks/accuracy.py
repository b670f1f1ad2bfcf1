"""Train the default recipe (ImageNet EfficientNet-Lite0 fine-tuning) on the shared data, leak-cleaned, and report
Test metrics with 95% stratified-bootstrap CIs on "all" and "clean" (not leaked into Train) Test images.

    python benchmarks/accuracy.py [--out runs/bench-accuracy] [--json FILE] [any `melanoma train` flag ...]
    python benchmarks/accuracy.py --from-run runs/lite0 --json FILE   # the same summary of a finished run

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
import time
from pathlib import Path

from _common import TRUTH_FILES, default_sources, print_table, write_results

from melanoma.cli.arguments import build_parser
from melanoma.cli.arguments import config_from_args
from melanoma.train.loop import quiet_lightning
from melanoma.config import TrainConfig
from melanoma.runs.layout import read_run_json
from melanoma.train.pipeline import train

ROWS = ("balanced_accuracy", "macro_f1", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def benchmark_config(out: str, train_flags: list[str]) -> TrainConfig:
    """The config `melanoma train` would build from these flags, on the shared data with the official truth."""
    data = [] if "--data" in train_flags else ["--data", *map(str, default_sources())]
    argv = ["train", *data, "--truth", *map(str, TRUTH_FILES), "--out", out, "--overwrite", "--no-progress",
            *train_flags]
    return config_from_args(build_parser().parse_args(argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-accuracy")
    parser.add_argument("--json", help="result file (default: benchmarks/results/accuracy_<model>[_gpu].json)")
    parser.add_argument("--from-run", metavar="RUN", help="summarise this finished run (e.g. the README main job's "
                                                          "runs/lite0) instead of training; no train flags")
    args, train_flags = parser.parse_known_args()
    if args.from_run:
        if train_flags:
            parser.error(f"--from-run takes no train flags (got {' '.join(train_flags)})")
        run_dir, minutes = Path(args.from_run), None
    else:
        config = benchmark_config(args.out, train_flags)
        quiet_lightning()
        start = time.perf_counter()
        run_dir = train(config)
        minutes = round((time.perf_counter() - start) / 60, 2)
    summarize(Path(run_dir), minutes, train_flags, args.json)


def summarize(run_dir: Path, minutes: float | None, train_flags: list[str], json_path: str | None) -> None:
    """Print the Test table of a finished run and write its result JSON (minutes None: not trained here)."""
    metrics = read_run_json(run_dir / "metrics.json", require="test")
    config_used = read_run_json(run_dir / "config.json", require="config")["config"]
    rows = []
    for subset in ("all", "clean"):
        test = metrics["test"][subset]
        for name in ROWS:
            ci = test["ci"][name]
            rows.append({"test": f"{subset} (n={test['n']})", "metric": name, "value": ci["value"],
                         "ci95_low": ci["low"], "ci95_high": ci["high"]})
    print_table(rows, ["test", "metric", "value", "ci95_low", "ci95_high"])
    timing = "not trained here" if minutes is None else f"trained in {minutes:.1f} min"
    print(f"alert threshold {metrics['alert']['threshold']:.3f} (validation sensitivity "
          f"{metrics['alert']['sensitivity']:.2f}); {timing}; run folder {run_dir}")
    # write_results adds the machine (processor, GPU model) to the JSON
    write_results(f"accuracy_{config_used['model']}" + ("" if config_used["accelerator"] == "cpu" else "_gpu"),
                  {"run": str(run_dir), "train_minutes": minutes, "train_flags": train_flags,
                   "config": config_used, "alert": metrics["alert"],
                   "validation_balanced_accuracy": metrics["validation"]["balanced_accuracy"],
                   **{key: {name: {"n": part["n"], "balanced_accuracy": part["balanced_accuracy"],
                                   "melanoma_auc": part["per_class"]["melanoma"]["auc"]}
                            for name, part in metrics.get(key, {}).items()}
                      for key in ("validation_by_era", "validation_by_source")},
                   "results": rows}, json_path)


if __name__ == "__main__":
    main()
