"""The ``melanoma`` command line: one verb per stage.

    melanoma audit DATA --truth ../shared/data/groundtruth/*.csv --out runs/audit
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from melanoma.data import DataError

DESCRIPTION = """\
Train, check and serve CNN classifiers for dermoscopic skin-lesion images, with a melanoma alert.
A research tool, not a medical device.

Start with `melanoma audit DATA` to see what is wrong with a dataset before training on it."""


def _progress(description: str):
    from tqdm import tqdm

    def wrap(iterable, total: int):
        return tqdm(iterable, total=total, desc=description, unit="img", file=sys.stderr, dynamic_ncols=True)

    return wrap


def cmd_audit(args: argparse.Namespace) -> int:
    from melanoma.audit import AuditConfig, run_audit, write_audit
    from melanoma.data import load_dataset
    from melanoma.truth import load_ground_truth

    index = load_dataset(args.data, image_root=args.image_root)
    truth = load_ground_truth(args.truth) if args.truth else None
    config = AuditConfig(near_threshold=args.near_threshold, workers=args.workers, seed=args.seed)
    for warning in index.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    result = run_audit(index, truth, config, progress=_progress("hashing"))
    written = write_audit(result, index, args.out)
    _print_audit_summary(result, written)
    return 0


def _print_audit_summary(result, written) -> None:
    s = result.summary
    print(f"{s['images']} images in {s['classes']} classes ({', '.join(f'{k}: {v}' for k, v in s['splits'].items())})")
    print(f"  duplicate groups:            {s['duplicate_groups']} {s['duplicate_groups_by_kind']}")
    print(f"  ids filed under 2+ classes:  {s['image_ids_in_several_classes']}")
    print(f"  held-out images leaked:      {s['leaked_heldout_images']} {s['leaks_by_reason']}")
    if s["truth_disagreements"] is not None:
        print(f"  contradicted by truth:       {s['truth_disagreements']} "
              f"({s['images_without_official_label']} images have no official label)")
    print(f"  unreadable or skipped:       {s['unreadable']}")
    print(f"  recommended actions:         {s['actions']}")
    print(f"wrote {', '.join(str(p) for p in written.values())}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melanoma", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    audit = verbs.add_parser(
        "audit", help="find duplicates, label conflicts, Train/Test leaks and unreadable images",
        description="Audit a labelled image set before training on it. Writes audit.json, audit.md, "
                    "clean_manifest.csv (a recommended action per image) and plots to --out.")
    audit.add_argument("data", help="ROOT/<class>/*, ROOT/{Train,Test}/<class>/* or a CSV manifest "
                                    "(columns image,label[,lesion_id,split])")
    audit.add_argument("--truth", nargs="+", metavar="CSV",
                       help="official ISIC label files (HAM10000 metadata, ISIC 2019 / 2017 ground truth)")
    audit.add_argument("--out", default="runs/audit", help="output folder (default: runs/audit)")
    audit.add_argument("--image-root", help="folder that manifest image paths are relative to "
                                            "(default: the manifest's folder)")
    audit.add_argument("--near-threshold", type=int, default=20,
                       help="pHash bits (of 256) below which two images count as copies (default: 20)")
    audit.add_argument("--workers", type=int, default=4, help="decoding threads (default: 4)")
    audit.add_argument("--seed", type=int, default=0, help="seed for the sample grid (default: 0)")
    audit.set_defaults(func=cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
