"""External validation of finished runs on images none of them was trained, calibrated or thresholded on
(issue #25, item 3): by default ../shared/data/external-dev (315 ISIC 2017 challenge images: melanoma, nevus,
seborrheic keratosis; see its README).

Per run: melanoma AUC with its 95 % bootstrap interval, melanoma-vs-nevus AUC with its interval, sensitivity and
specificity at the run's own alert threshold (chosen on its validation split), and the median p(melanoma) of the
melanomas and of the rest. Paired differences between runs: benchmarks/compare_runs.py.

    python benchmarks/external.py RUN [RUN ...] [--data DIR] [--resamples N] [--json FILE]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _common import REPO, print_table, write_results

from melanoma.assess.external import external_validation
from melanoma.runs.run import Run

EXTERNAL_DEV = REPO.parent / "shared" / "data" / "external-dev"


def score(run_dir: Path, folder: Path, resamples: int) -> dict:
    run = Run.load(run_dir)
    return {"run": str(run_dir), "threshold": run.threshold} | external_validation(
        folder, run.probabilities, run.classes, run.image_size, run.threshold, resamples=resamples)


def _interval(part: dict) -> str:
    if part.get("value") is None:
        return "n/a"
    low = f" [{part['low']:.3f}, {part['high']:.3f}]" if part.get("low") is not None else ""
    return f"{part['value']:.3f}{low}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=EXTERNAL_DEV, help=f"default: {EXTERNAL_DEV}")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--json", help="output file (default: benchmarks/results/external.json)")
    args = parser.parse_args()
    results = [score(run, args.data, args.resamples) for run in args.runs]
    rows = []
    for r in results:
        mel = r["melanoma"] or {}
        ci = r.get("ci", {})
        rows.append({"run": r["run"], "n": r["n"], "melanomas": mel.get("positives"),
                     "melanoma AUC [95% CI]": _interval(r["melanoma_auc"]),
                     "mel vs nevus AUC [95% CI]": _interval(r.get("melanoma_vs_nevus_auc", {})),
                     "sensitivity at alert": _interval(ci.get("melanoma_sensitivity", {})),
                     "specificity at alert": _interval(ci.get("melanoma_specificity", {})),
                     "median p(mel) mel / rest": "{:.3f} / {:.3f}".format(*r["median_p_melanoma"].values())})
    print_table(rows, list(rows[0]))
    write_results("external", {"data": str(args.data), "resamples": args.resamples, "results": results}, args.json)


if __name__ == "__main__":
    main()
