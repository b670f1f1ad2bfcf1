"""Rendering consistency of a finished run: does its answer depend on how a picture was resized and saved, or on
which way up it lies? (issue #25, item 1)

For the pictures the run's audit found in more than one source (the course set's 180x180 file and isic-extra's
200x150 or 256x192 file of one ISIC id), the share of pairs whose top class differs and the mean |difference in
p(melanoma)|; and for the run's validation images under each stress (re-rendering: white balance +-5 %, gamma +-10 %,
downscale to 0.5-0.8 and JPEG quality 50-90; rotation 90 and 20 degrees, horizontal flip, brightness +20 %,
contrast -20 %), the share whose top class changes, whose melanoma alert changes at the run's own threshold, and the
mean |change in p(melanoma)|. The right answer is "no change" everywhere.

    python benchmarks/consistency.py RUN [--pairs N] [--images N] [--seed S] [--json FILE]

By default every copy pair and every validation image is used (training scores seeded subsets to stay fast);
--pairs / --images take seeded subsets. Probabilities are the run's calibrated ones (Run.probabilities).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import print_table, write_results

from melanoma.assess.consistency import measure_consistency
from melanoma.runs.layout import audit_folder, run_split, trained_files
from melanoma.runs.run import Run


def measure(run_dir: Path, pairs: int | None, images: int | None, seed: int) -> dict:
    run = Run.load(run_dir)
    started = time.perf_counter()
    _, _, val_images, root = run_split(run_dir, "val", run.image_size)
    decoded = time.perf_counter() - started
    result = measure_consistency(run.probabilities, classes=run.classes, threshold=run.threshold,
                                 image_size=run.image_size, val_images=val_images, root=root,
                                 audit_dir=audit_folder(run.config["config"], run_dir),
                                 trained=trained_files(run_dir), seed=seed, copy_limit=pairs, stress_limit=images)
    return {"run": str(run_dir), "tta": run.tta, "decode_validation_seconds": round(decoded, 1)} | result


def table_rows(result: dict) -> list[dict]:
    rows = []
    copies = result.get("copies")
    if copies:
        for name, part in (("copies, all pairs", copies["all"]), ("copies, not trained on", copies["not_trained_on"])):
            rows.append({"renderings": name, "n": part["n"], "top class changed": part["top_class_changed"],
                         "alert changed": part.get("alert_changed"),
                         "mean |dp(mel)|": part.get("mean_abs_delta_melanoma"),
                         "mean dp(mel)": part.get("mean_delta_melanoma")})
    for name, part in result.get("stresses", {}).get("stresses", {}).items():
        rows.append({"renderings": f"validation, {name}", "n": part["n"],
                     "top class changed": part["top_class_changed"], "alert changed": part.get("alert_changed"),
                     "mean |dp(mel)|": part.get("mean_abs_delta_melanoma"),
                     "mean dp(mel)": part.get("mean_delta_melanoma")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--pairs", type=int, help="a seeded subset of the copy pairs (default: all)")
    parser.add_argument("--images", type=int, help="a seeded subset of the validation images (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is faster on a busy machine)")
    parser.add_argument("--json", help="output file (default: benchmarks/results/consistency-RUNNAME.json)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = measure(args.run, args.pairs, args.images, args.seed)
    print_table(table_rows(result), ["renderings", "n", "top class changed", "alert changed", "mean |dp(mel)|",
                                     "mean dp(mel)"])
    copies = result.get("copies")
    if copies:
        print(f"copy pairs: {copies['pairs']} of {copies['of']} ({' vs '.join(copies['sources'][0])}; dp = second "
              "minus first); top class changed by class of the first file:")
        print_table([{"class": c, "n": p["n"], "top class changed": p["top_class_changed"],
                      "mean dp(mel)": p.get("mean_delta_melanoma")} for c, p in copies["by_class"].items()],
                    ["class", "n", "top class changed", "mean dp(mel)"])
    print(f"alert threshold {result['threshold']}; measured in {result['seconds']} s ({result['cpu_seconds']} CPU s) "
          f"(+{result['decode_validation_seconds']} s decoding validation)")
    write_results(f"consistency-{args.run.resolve().name}", result, args.json)


if __name__ == "__main__":
    main()
