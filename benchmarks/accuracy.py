"""Train the default recipe (ImageNet EfficientNet-Lite0 fine-tuning) on the shared data, leak-cleaned, and report
Test metrics with 95% stratified-bootstrap CIs on "all" and "clean" (not leaked into Train) Test images.

    python benchmarks/accuracy.py [--out runs/bench-accuracy] [--epochs N] [--json FILE] [extra `melanoma train` flags]

Targets (issue #5): clean Test balanced accuracy >= 0.70 and melanoma AUC >= 0.90, trained in <= 20 minutes on a
2-core CPU. Everything is chosen on the validation split; Test is only scored.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import TRUTH_FILES, print_table, require_shared_data, write_results
from melanoma.cli import _quiet_lightning
from melanoma.training import TrainConfig, train

ROWS = ("balanced_accuracy", "macro_f1", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-accuracy")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (a GPU needs several)")
    parser.add_argument("--json")
    args = parser.parse_args()
    _quiet_lightning()
    config = TrainConfig(data=str(require_shared_data()), out=args.out, model=args.model, epochs=args.epochs,
                         image_size=args.image_size, truth=[str(p) for p in TRUTH_FILES], overwrite=True,
                         progress=False, accelerator=args.accelerator, devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", num_workers=args.workers)
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
    write_results(f"accuracy_{args.model}" + ("" if args.accelerator == "cpu" else "_gpu"),
                  {"run": str(run_dir), "train_minutes": round(minutes, 2), "config": config_used,
                   "alert": metrics["alert"],
                   "validation_balanced_accuracy": metrics["validation"]["balanced_accuracy"],
                   "results": rows}, args.json)


if __name__ == "__main__":
    main()
