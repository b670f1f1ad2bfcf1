"""Is run B better than run A, or is the difference noise? The paired bootstrap of the recipe rule (issue #25,
item 3).

Both runs score the same images: their common validation split (they must have been trained with the same split:
same data, audit and --split-seed) and the external set (by default ../shared/data/external-dev, never trained,
calibrated or thresholded on). For all validation images, each acquisition era (melanoma.data.ERAS) and the external
set it prints each run's melanoma AUC, B minus A, and the 95 % interval of that difference from the same stratified
resamples for both runs. A difference counts only when its interval excludes 0 ("outside noise").

The rule's other signals come from the same paired resamples of images (or copy pairs): validation balanced accuracy,
top-class agreement between the two files of each picture the audit found in two sources, and the share of
validation images whose melanoma alert changes when re-rendered (each run at its own threshold). For the last one
lower is better, so B - A < 0 is a gain.

    python benchmarks/compare_runs.py RUN_A RUN_B [--external DIR | --no-external] [--resamples N] [--json FILE]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import REPO, print_table, write_results
from melanoma.consistency import audit_folder, copy_pairs, run_split, stressed
from melanoma.data import ERAS, MELANOMA, ImageRecord, acquisition_era, build_cache
from melanoma.evaluation import compute_metrics
from melanoma.external import paired_auc_difference, read_external
from melanoma.run import Run

EXTERNAL_DEV = REPO.parent / "shared" / "data" / "external-dev"


def validation_scores(run_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, labels, probs, _ = validation_probabilities(run_dir)
    m = Run.load(run_dir).classes.index(MELANOMA)
    return names, labels == m, probs[:, m]


def validation_probabilities(run_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(names, labels, probabilities, images) of the run's validation split."""
    run = Run.load(run_dir)
    names, labels, images, _ = run_split(run_dir, "val", run.image_size)
    return names, labels, run.probabilities(images), images


def paired_difference(statistic, a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> dict:
    """statistic(b) - statistic(a) on the same resampled rows, with its 95 % interval."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, len(a), len(a)) for _ in range(resamples)]
    differences = np.array([statistic(b[r]) - statistic(a[r]) for r in rows])
    low, high = (float(v) for v in np.percentile(differences, [2.5, 97.5]))
    return {"a": float(statistic(a)), "b": float(statistic(b)), "difference": float(statistic(b) - statistic(a)),
            "low": low, "high": high, "n": len(a), "resamples": resamples, "outside_noise": bool(low > 0 or high < 0)}


def balanced_accuracy_difference(run_a: Path, run_b: Path, resamples: int, seed: int) -> dict:
    _, labels, probs_a, _ = validation_probabilities(run_a)
    _, _, probs_b, _ = validation_probabilities(run_b)
    classes = Run.load(run_a).classes
    rows = np.column_stack([labels, probs_a.argmax(1), probs_b.argmax(1)])

    def balanced(which: int):
        return lambda part: compute_metrics(part[:, 0], np.eye(len(classes))[part[:, which]], classes,
                                            None)["balanced_accuracy"]
    a, b = balanced(1), balanced(2)
    return paired_difference(lambda part: b(part) - a(part), np.zeros_like(rows), rows, resamples, seed) | {
        "a": a(rows), "b": b(rows)}


def copy_agreement_difference(run_a: Path, run_b: Path, resamples: int, seed: int) -> dict:
    """Top-class agreement between the two files of every cross-source copy pair, per run, paired by pair."""
    reference = Run.load(run_a)
    pairs = copy_pairs(audit_folder(reference.config["config"], Path(run_a)))
    root = run_split(run_a, "val", reference.image_size)[3]
    files = [file for pair in pairs for file in pair["files"]]
    if not pairs:
        raise SystemExit(f"{run_a}: its audit found no picture in two sources; nothing to compare")
    agree = []
    for run_dir in (run_a, run_b):
        run = Run.load(run_dir)
        cache = build_cache([ImageRecord(path=root / f, rel_path=f, label="") for f in files], size=run.image_size)
        if cache.errors:
            raise SystemExit(f"unreadable copy files: {'; '.join(list(cache.errors.values())[:3])}")
        top = run.probabilities(cache.images).argmax(1)
        agree.append((top[0::2] == top[1::2]).astype(float))
    return paired_difference(np.mean, agree[0], agree[1], resamples, seed)


def rerender_alert_difference(run_a: Path, run_b: Path, resamples: int, seed: int) -> dict:
    """Share of validation images whose melanoma alert changes when re-rendered, per run at its own threshold."""
    changed = []
    for run_dir in (run_a, run_b):
        run = Run.load(run_dir)
        _, _, probs, images = validation_probabilities(run_dir)
        m = run.classes.index(MELANOMA)
        after = run.probabilities(stressed(images, "re-render", seed))
        changed.append(((probs[:, m] >= run.threshold) != (after[:, m] >= run.threshold)).astype(float))
    return paired_difference(np.mean, changed[0], changed[1], resamples, seed)
def external_scores(run_dir: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    run = Run.load(run_dir)
    records = read_external(folder, run.classes)
    cache = build_cache(records, size=run.image_size)
    if cache.errors:
        raise SystemExit(f"unreadable external images: {'; '.join(cache.errors.values())}")
    m = run.classes.index(MELANOMA)
    return np.array([r.label == MELANOMA for r in records]), run.probabilities(cache.images)[:, m]


def compare(run_a: Path, run_b: Path, external: Path | None, resamples: int, seed: int = 0,
            rule_signals: bool = True) -> dict:
    names, is_melanoma, score_a = validation_scores(run_a)
    names_b, _, score_b = validation_scores(run_b)
    if names != names_b:
        raise SystemExit(f"{run_a} and {run_b} have different validation splits: a paired comparison needs the same "
                         "images (train both with the same data, audit and --split-seed)")
    eras = np.array([acquisition_era(name) for name in names])
    parts = {"validation": np.ones(len(names), dtype=bool)} | {f"validation, {era}": eras == era for era in ERAS
                                                                if (eras == era).any()}
    result = {name: paired_auc_difference(is_melanoma[mask], score_a[mask], score_b[mask], resamples, seed)
              for name, mask in parts.items()}
    if external is not None:
        truth, ext_a = external_scores(run_a, external)
        _, ext_b = external_scores(run_b, external)
        result["external"] = paired_auc_difference(truth, ext_a, ext_b, resamples, seed)
    if rule_signals:
        result["balanced accuracy, validation"] = balanced_accuracy_difference(run_a, run_b, resamples, seed)
        result["copy agreement"] = copy_agreement_difference(run_a, run_b, resamples, seed)
        result["re-render alert changes"] = rerender_alert_difference(run_a, run_b, resamples, seed)
    return result


def _row(name: str, part: dict) -> dict:
    auc = isinstance(part["a"], dict)
    return {"signal": name if not auc else f"melanoma AUC, {name}",
            "n": part["a"]["positives"] + part["a"]["negatives"] if auc else part["n"],
            "melanomas": part["a"]["positives"] if auc else "",
            "A": part["a"]["value"] if auc else part["a"], "B": part["b"]["value"] if auc else part["b"],
            "B - A": part["difference"],
            "95% CI": "" if part["low"] is None else f"[{part['low']:+.3f}, {part['high']:+.3f}]",
            "outside noise": part["outside_noise"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path, help="the reference (e.g. the current default)")
    parser.add_argument("run_b", type=Path, help="the candidate")
    parser.add_argument("--external", type=Path, default=EXTERNAL_DEV, help=f"default: {EXTERNAL_DEV}")
    parser.add_argument("--no-external", action="store_true")
    parser.add_argument("--auc-only", action="store_true", help="melanoma AUCs only (skip the rule's other signals)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="output file (default: benchmarks/results/compare_runs.json)")
    args = parser.parse_args()
    external = None if args.no_external or not args.external.is_dir() else args.external
    result = compare(args.run_a, args.run_b, external, args.resamples, args.seed, not args.auc_only)
    rows = [_row(name, part) for name, part in result.items()]
    print_table(rows, list(rows[0]))
    write_results("compare_runs", {"run_a": str(args.run_a), "run_b": str(args.run_b), "resamples": args.resamples,
                                   "external": str(external) if external else None, "results": result}, args.json)


if __name__ == "__main__":
    main()
