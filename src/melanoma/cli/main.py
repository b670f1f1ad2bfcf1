"""The ``melanoma`` command line: one verb per stage.

    melanoma audit DATA --truth ../shared/data/groundtruth/*.csv --out runs/audit
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from melanoma.cli.arguments import build_parser, config_from_args
from melanoma.core.errors import DataError, MelanomaError, RunInterrupted


def _progress(description: str):
    """A progress bar over (iterable, total) images; silent where stderr is not a terminal (a log file)."""
    from tqdm import tqdm

    def wrap(iterable, total: int):
        return tqdm(iterable, total=total, desc=description, unit="img", file=sys.stderr, dynamic_ncols=True,
                    disable=None)

    return wrap


def _image_counter(description: str, total: int):
    """A progress bar advanced by a number of images at a time (``bar.update(n)``); silent in a log file."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, dynamic_ncols=True, disable=None)


def cmd_audit(args: argparse.Namespace) -> int:
    from melanoma.audit.audit import AuditConfig, run_audit
    from melanoma.audit.report import write_audit
    from melanoma.data.sources import load_dataset, source_summary
    from melanoma.data.truth import load_ground_truth
    from melanoma.runs.guards import check_audit_output

    writable_output(args.out, folder=True)
    check_audit_output(args.out, [*args.data, *(args.truth or []), *([args.image_root] if args.image_root else [])])
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


def writable_output(path: str, folder: bool) -> None:
    """Refuse an --out that cannot be written, before any work: a file where a folder is wanted (or the reverse),
    or a place this process cannot write to. Probed by writing, so read-only file systems count too."""
    import tempfile
    from pathlib import Path

    target = Path(path)
    if folder and target.exists() and not target.is_dir():
        raise DataError(f"--out {path}: is a file; it must be a folder")
    if not folder and target.is_dir():
        raise DataError(f"--out {path}: is a folder; it must be a file name")
    probe_in = target if folder and target.is_dir() else target.parent
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise DataError(f"--out {path}: {probe_in} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe_in):
            pass
    except OSError as exc:
        raise DataError(f"--out {path}: cannot write in {probe_in} ({exc.strerror or exc})") from None


def cmd_train(args: argparse.Namespace) -> int:
    from melanoma.core.errors import RunError
    from melanoma.train.distributed import is_launch_rank_zero
    from melanoma.train.loop import quiet_lightning
    from melanoma.train.pipeline import train

    if not args.data and not args.resume:
        raise RunError("--data is required (only `--out RUN --resume` can do without it: the run knows its data)")
    quiet_lightning()
    run_dir = train(config_from_args(args))
    if is_launch_rank_zero():
        print(f"run folder: {run_dir}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from melanoma.train.loop import quiet_lightning
    from melanoma.train.seed_study import run_seed_study

    quiet_lightning()
    base = config_from_args(args)
    run_seed_study(base, args.out, epochs=args.study_epochs, experiments=tuple(args.only or ()))
    print(f"comparison: {args.out}/seed_study.md")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from melanoma.assess.evaluate import evaluate_run

    if args.out:
        writable_output(args.out, folder=True)
    evaluate_run(args.run, data=args.data, split=args.split, out=args.out, resamples=args.bootstrap,
                 target_sensitivity=args.target_sensitivity, metadata=args.metadata)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from melanoma.core.io import atomic_write_text, write_csv
    from melanoma.data.records import melanoma_notice
    from melanoma.deploy.predict import (
        collect_inputs,
        predict_files,
        predict_sharded,
        prediction_columns,
        prediction_rows,
    )
    from melanoma.runs.run import Run

    writable_output(args.out, folder=False)
    run = Run.load(args.run, threshold=args.threshold)  # a bad run folder fails here, before any process starts
    inputs = collect_inputs(args.inputs)
    with _image_counter("predicting", len(inputs)) as bar:
        if args.devices > 1:
            predictions = predict_sharded(args.run, inputs, args.devices, args.accelerator, threshold=args.threshold,
                                          batch_size=args.batch_size, progress=bar.update)
        else:
            predictions = predict_files(run, inputs, batch_size=args.batch_size, progress=bar.update)
    rows = prediction_rows(predictions, run.classes)
    if args.out.endswith(".json"):
        atomic_write_text(args.out, json.dumps(rows, indent=2) + "\n")
    else:
        write_csv(args.out, rows, prediction_columns(run.classes))
    if notice := melanoma_notice(run.classes):
        print(f"note: {notice}")
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
              f"{'n/a' if p.melanoma_probability is None else f'{p.melanoma_probability:.3f}':>11}  {alert}")
    if len(predictions) > limit:
        print(f"... {len(predictions) - limit} more in the output file")


def cmd_report(args: argparse.Namespace) -> int:
    from melanoma.assess.model_card import write_model_card
    from melanoma.assess.report import write_run_report

    print(f"wrote {write_run_report(args.run)}")
    print(f"wrote {write_model_card(args.run)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from melanoma.assess.report import compare_runs
    from melanoma.core.io import atomic_write_text

    if args.out:
        writable_output(args.out, folder=False)
    _, table = compare_runs(args.runs, subset=args.subset)
    print(f"Test ({args.subset}) metrics with 95% bootstrap CIs\n")
    print(table)
    if args.out:
        atomic_write_text(args.out, table)
        print(f"wrote {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from melanoma.deploy.export import export_onnx

    if args.format != "onnx":
        raise DataError(f"unknown export format '{args.format}' (onnx)")
    export_onnx(args.run, opset=args.opset)
    return 0


def cmd_fit_ood(args: argparse.Namespace) -> int:
    from melanoma.train.ood_fit import fit_existing_run

    fit_existing_run(args.run, detector=args.detector, data=args.data)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from melanoma.assess.explain import explain_files, write_explanations
    from melanoma.deploy.predict import collect_inputs
    from melanoma.runs.run import Run

    writable_output(args.out, folder=True)
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
    from melanoma.core.errors import ServeError
    from melanoma.deploy.limits import DEFAULT_ALLOWED_HOSTS, SERVE_TTA, ServeConfig
    from melanoma.deploy.serve import serve

    # arguments.py parses each flag; the ranges that need several flags, the token (also from MELANOMA_TOKEN) and the
    # host names are checked by ServeConfig, still before the run is loaded: a ServeError, one line and exit code 2
    for flag, value in (("--max-upload-mb", args.max_upload_mb),
                        ("--max-request-megapixels", args.max_request_megapixels)):
        if not value > 0:
            raise ServeError(f"{flag} must be above 0, not {value:g}")
    config = ServeConfig(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                         max_request_pixels=int(args.max_request_megapixels * 1_000_000),
                         max_concurrent=args.concurrency, queue_size=args.queue, token=args.token,
                         max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, body_timeout_s=args.body_timeout,
                         keep_alive_s=args.keep_alive, allowed_hosts=(*DEFAULT_ALLOWED_HOSTS, *args.allowed_hosts),
                         tta=SERVE_TTA if args.tta is None else args.tta)
    serve(args.run, host=args.host, port=args.port, config=config)
    return 0


COMMANDS = {"audit": cmd_audit, "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "report": cmd_report, "compare": cmd_compare, "explain": cmd_explain, "export": cmd_export,
            "serve": cmd_serve, "experiment": cmd_experiment, "fit-ood": cmd_fit_ood}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MelanomaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a permission, a vanished file: the file and the reason, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
