"""Is run B better than run A, or is the difference noise? The paired bootstrap of the recipe rule (issue #25,
item 3).

Both runs score the same images: their common validation split (they must have been trained with the same split:
same data, audit and --split-seed) and the external set (by default ../shared/data/external-dev, never trained,
calibrated or thresholded on). For all validation images, each acquisition era (melanoma.data.records.ERAS), each
block of ISIC ids (melanoma.data.records.ID_BLOCKS, in validation and the external set) and the external set it prints
each run's melanoma AUC, B minus A, and the 95 % interval of that difference from the same resamples for both runs
(the project's one resampler, melanoma.assess.intervals: within each class). A difference counts only when its
interval excludes 0 ("outside noise").

The rule's other signals come from the same paired resamples of images (or copy pairs): validation balanced accuracy,
top-class agreement between the two files of each picture the audit found in two sources, and the share of
validation images whose melanoma alert changes when re-rendered (each run at its own threshold). For the last one
lower is better, so B - A < 0 is a gain.

    python benchmarks/compare_runs.py RUN_A RUN_B [--external DIR | --no-external] [--resamples N] [--json FILE]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import REPO, print_table, write_results

from melanoma.assess.consistency import copy_pairs, stressed
from melanoma.assess.external import read_external
from melanoma.assess.intervals import paired_auc_difference, paired_difference
from melanoma.assess.metrics import compute_metrics
from melanoma.data.images import build_cache
from melanoma.data.records import COLLECTIONS, ERAS, MELANOMA, ImageRecord, acquisition_era, id_block
from melanoma.runs.layout import audit_folder, run_split
from melanoma.runs.run import Run

EXTERNAL_DEV = REPO.parent / "shared" / "data" / "external-dev"


@dataclass
class Validation:
    """One run's validation split, decoded and scored once: every signal below reads it."""

    run: Run
    names: list[str]
    labels: np.ndarray
    probs: np.ndarray
    images: np.ndarray
    root: Path

    @classmethod
    def of(cls, run_dir: Path) -> "Validation":
        run = Run.load(run_dir)
        names, labels, images, root = run_split(run_dir, "val", run.image_size)
        return cls(run, names, labels, run.probabilities(images), images, Path(root))

    @property
    def melanoma(self) -> int:
        return self.run.classes.index(MELANOMA)


def mean_difference(a: np.ndarray, b: np.ndarray, strata: np.ndarray, resamples: int, seed: int) -> dict:
    return paired_difference(lambda rows: a[rows].mean(), lambda rows: b[rows].mean(), strata, resamples, seed)


def balanced_accuracy_difference(a: Validation, b: Validation, resamples: int, seed: int) -> dict:
    def balanced(probs: np.ndarray):
        return lambda rows: compute_metrics(a.labels[rows], probs[rows], a.run.classes, None)["balanced_accuracy"]
    return paired_difference(balanced(a.probs), balanced(b.probs), a.labels, resamples, seed)


def copy_agreement_difference(a: Validation, b: Validation, resamples: int, seed: int) -> dict:
    """Top-class agreement between the two files of every cross-source copy pair, per run, paired by pair."""
    pairs = copy_pairs(audit_folder(a.run.config["config"], a.run.path))
    if not pairs:
        raise SystemExit(f"{a.run.path}: its audit found no picture in two sources; nothing to compare")
    records = [ImageRecord(path=a.root / f, rel_path=f, label="") for pair in pairs for f in pair["files"]]
    agree = []
    for side in (a, b):
        cache = build_cache(records, size=side.run.image_size)
        if cache.errors:
            raise SystemExit(f"unreadable copy files: {'; '.join(list(cache.errors.values())[:3])}")
        top = side.run.probabilities(cache.images).argmax(1)
        agree.append((top[0::2] == top[1::2]).astype(float))
    return mean_difference(*agree, np.array([pair["label"] for pair in pairs]), resamples, seed)


def rerender_alert_difference(a: Validation, b: Validation, resamples: int, seed: int) -> dict:
    """Share of validation images whose melanoma alert changes when re-rendered, per run at its own threshold."""
    changed = []
    for side in (a, b):
        after = side.run.probabilities(stressed(side.images, "re-render", seed))[:, side.melanoma]
        before = side.probs[:, side.melanoma]
        changed.append(((before >= side.run.threshold) != (after >= side.run.threshold)).astype(float))
    return mean_difference(*changed, a.labels, resamples, seed)


def external_scores(run: Run, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The external images' class labels, the run's p(melanoma) for each, and each one's block of ISIC ids."""
    records = read_external(folder, run.classes)
    cache = build_cache(records, size=run.image_size)
    if cache.errors:
        raise SystemExit(f"unreadable external images: {'; '.join(cache.errors.values())}")
    return (np.array([run.classes.index(r.label) for r in records]),
            run.probabilities(cache.images)[:, run.classes.index(MELANOMA)],
            np.array([id_block(r.image_id or r.rel_path) for r in records]))


def compare(run_a: Path, run_b: Path, external: Path | None, resamples: int, seed: int = 0,
            rule_signals: bool = True) -> dict:
    a, b = Validation.of(run_a), Validation.of(run_b)
    if a.names != b.names:
        raise SystemExit(f"{run_a} and {run_b} have different validation splits: a paired comparison needs the same "
                         "images (train both with the same data, audit and --split-seed)")
    is_melanoma = a.labels == a.melanoma
    eras = np.array([acquisition_era(name) for name in a.names])
    blocks = np.array([id_block(name) for name in a.names])
    parts = {"validation": np.ones(len(a.names), dtype=bool)} | {f"validation, {era}": eras == era for era in ERAS
                                                                  if (eras == era).any()} \
        | {f"validation, ids {block}": blocks == block for block in COLLECTIONS if (blocks == block).any()}
    result = {name: paired_auc_difference(a.labels[mask], is_melanoma[mask], a.probs[mask, a.melanoma],
                                          b.probs[mask, b.melanoma], resamples, seed)
              for name, mask in parts.items()}
    if external is not None:
        labels, ext_a, ext_blocks = external_scores(a.run, external)
        _, ext_b, _ = external_scores(b.run, external)
        result["external"] = paired_auc_difference(labels, labels == a.melanoma, ext_a, ext_b, resamples, seed)
        for block in (block for block in COLLECTIONS if (ext_blocks == block).any()):
            mask = ext_blocks == block
            result[f"external, ids {block}"] = paired_auc_difference(labels[mask], labels[mask] == a.melanoma,
                                                                     ext_a[mask], ext_b[mask], resamples, seed)
    if rule_signals:
        result["balanced accuracy, validation"] = balanced_accuracy_difference(a, b, resamples, seed)
        result["copy agreement"] = copy_agreement_difference(a, b, resamples, seed)
        result["re-render alert changes"] = rerender_alert_difference(a, b, resamples, seed)
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
