"""Every verb's flags, their help and their checks: each value is parsed and range-checked here, so a bad one stops
the command with a one-line error before any work starts. :mod:`melanoma.cli.main` runs the verbs."""
from __future__ import annotations

import argparse
import dataclasses
import math

from melanoma.config import TrainConfig, flag_of, option_of
from melanoma.models.catalog import DEFAULT_DETECTOR, DETECTORS

DESCRIPTION = """\
Train, check and serve CNN classifiers for dermoscopic skin-lesion images, with a melanoma alert.
A research tool, not a medical device.

Start with `melanoma audit DATA` to see what is wrong with a dataset before training on it."""


def _finite_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {value}")
    return number


def _probability(value: str) -> float:
    number = _finite_float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability between 0 and 1, not {value}")
    return number


def _sensitivity(value: str) -> float:
    number = _finite_float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be a sensitivity above 0 and at most 1, not {value}")
    return number


def _near_distance(value: str) -> float:
    number = _finite_float(value)
    if not 0 <= number <= 2:
        raise argparse.ArgumentTypeError(f"must be a near-copy distance between 0 and 2, not {value}")
    return number


def _bounded_int(low: int, high: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{value}' is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:,} and {high:,}, not {number}")
        return number

    parse.__name__ = f"whole number from {low} to {high}"
    return parse


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


PARSERS = {"float": float, "int": int, "finite_float": _finite_float, "sensitivity": _sensitivity, "devices": _devices}
# The training flags' --help sections: (title, description)
TRAINING_GROUPS = {
    "data": ("data", None),
    "model": ("model and recipe", "Unset values come from the recipe: 'finetune' for timm backbones (the default: "
              "ImageNet EfficientNet-Lite0 at 128 px for 28,000 images drawn, dermoscopy augmentation, balanced "
              "sampling, AdamW + cosine, head warm-up, EMA, a blur that hides the source's sharpness), 'seed' for the "
              "course notebook's CNNs (Adam 1e-3, 180 px, from scratch)."),
    "run": ("run", None),
}


def _training_argument(spec, default_out: str, data_required: bool) -> dict:
    """argparse settings of one TrainConfig field, from its type and :class:`melanoma.config.Option`."""
    option = option_of(spec)
    flag = flag_of(spec)
    settings: dict = {"dest": spec.name, "help": option.help}
    if spec.type == "bool":  # a switch: --relabel sets True; --no-clean sets the field False
        return settings | {"action": "store_false" if spec.default else "store_true"}
    if spec.type == "bool | None":
        return settings | {"action": argparse.BooleanOptionalAction}
    settings["metavar"] = option.metavar or flag.removeprefix("--").replace("-", "_").upper()
    if spec.type == "list[str]":
        settings |= {"nargs": "+", "action": "extend"}
    if option.choices:
        settings |= {"choices": option.choices, "metavar": option.metavar}
    if option.parse == "bounded_int":
        low, high = option.range[:2]
        settings["type"] = _bounded_int(int(low), int(high))
    elif option.parse:
        settings["type"] = PARSERS[option.parse]
    if spec.name == "data":
        settings["required"] = data_required
        settings["help"] += "" if data_required else "; not needed with --resume"
    elif spec.name == "out":
        settings["default"] = default_out
        settings["help"] = option.help.format(default=default_out)
    elif spec.type != "list[str]" and spec.default is not dataclasses.MISSING:
        settings["default"] = spec.default
    return settings


def _add_training_flags(parser: argparse.ArgumentParser, default_out: str, data_required: bool = True) -> None:
    """Every TrainConfig field that has a flag, in the order and sections the config gives (melanoma.config)."""
    groups = {name: parser.add_argument_group(title, description)
              for name, (title, description) in TRAINING_GROUPS.items()}
    exclusive: dict = {}
    for spec in dataclasses.fields(TrainConfig):
        option = option_of(spec)
        if not option.cli:
            continue
        group = groups[option.group]
        if option.exclusive:
            if option.exclusive not in exclusive:
                exclusive[option.exclusive] = group.add_mutually_exclusive_group()
            group = exclusive[option.exclusive]
        group.add_argument(flag_of(spec), **_training_argument(spec, default_out, data_required))


def config_from_args(args: argparse.Namespace):
    """The :class:`melanoma.config.TrainConfig` that the training flags of ``args`` ask for (a list flag not given is
    an empty list)."""
    values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(TrainConfig) if option_of(spec).cli}
    lists = {spec.name for spec in dataclasses.fields(TrainConfig) if spec.type == "list[str]"}
    return TrainConfig(**{name: [] if value is None and name in lists else value for name, value in values.items()})


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
    audit.add_argument("--truth", nargs="+", action="extend", metavar="CSV",
                       help="official ISIC label files (HAM10000 metadata, ISIC 2019 / 2017 ground truth)")
    audit.add_argument("--out", default="runs/audit", help="output folder (default: runs/audit)")
    audit.add_argument("--image-root", help="folder that manifest image paths are relative to "
                                            "(default: the manifest's folder)")
    audit.add_argument("--near-threshold", type=_near_distance, default=0.25,
                       help="near-copy distance (0-2) within which two images count as one picture, whatever their "
                            "size, aspect, crop (up to 20%% a side) or colours (default: 0.25)")
    audit.add_argument("--workers", type=_bounded_int(1, 256), default=4, help="decoding threads (default: 4)")
    audit.add_argument("--seed", type=int, default=0, help="seed for the sample grid (default: 0)")
    audit.set_defaults(command="audit")

    train = verbs.add_parser(
        "train", help="train a model and write a self-contained run folder",
        description="Train on the Train split (cleaned by the audit unless --no-clean), validate on a lesion-grouped "
                    "split of it, and score the best checkpoint on the Test split. Writes config, checkpoints, "
                    "history.csv, curves.png and metrics.json to --out.")
    _add_training_flags(train, "runs/train", data_required=False)
    train.set_defaults(command="train")

    evaluate = verbs.add_parser(
        "evaluate", help="score a trained run on a split: metrics with 95%% CIs, confusion matrix, ROC/PR curves",
        description="Accuracy, balanced accuracy, macro F1, per-class table, confusion matrix, one-vs-rest ROC and "
                    "PR curves, and melanoma sensitivity/specificity at the run's alert threshold, with stratified "
                    "bootstrap CIs, on all images of the split and on the 'clean' ones (not leaked into Train).")
    evaluate.add_argument("run", help="a run folder written by `melanoma train`")
    evaluate.add_argument("--data", nargs="+", action="extend", metavar="SOURCE",
                          help="data sources holding the split (default: the run's training data)")
    evaluate.add_argument("--split", default="Test", help="split folder to score (default: Test)")
    evaluate.add_argument("--metadata", nargs="+", action="extend", metavar="CSV", default=[],
                          help="image metadata keyed by image id for the per-subgroup metrics, besides the run's own "
                               "(--truth, --metadata of training) and the sources'; repeatable")
    evaluate.add_argument("--out", help="output folder (default: RUN/evaluation-<split>)")
    evaluate.add_argument("--bootstrap", type=_bounded_int(0, 100_000), default=1000,
                          help="bootstrap resamples (default: 1000; 0 = none)")
    evaluate.add_argument("--target-sensitivity", type=_sensitivity, default=0.9,
                          help="also report the threshold this split would need for this sensitivity")
    evaluate.set_defaults(command="evaluate")

    predict = verbs.add_parser(
        "predict", help="predict images, folders or CSV manifests; writes the ISIC submission layout",
        description="One row per image: image id, one probability column per class, melanoma_alert (0/1) at the "
                    "run's threshold, top_class, and an error for images that cannot be read (the rest go on).")
    predict.add_argument("run", help="a run folder written by `melanoma train`")
    predict.add_argument("inputs", nargs="+", help="image files, folders, or CSV manifests with an 'image' column")
    predict.add_argument("--out", default="predictions.csv", help="output .csv or .json (default: predictions.csv)")
    predict.add_argument("--threshold", type=_probability,
                         help="melanoma alert threshold (default: the run's, chosen on validation)")
    predict.add_argument("--batch-size", type=_bounded_int(1, 4096), default=32)
    predict.add_argument("--devices", type=_positive_int, default=1,
                         help="processes to share the inputs between (one per GPU with --accelerator gpu, else each "
                              "with a share of the CPU cores); the output keeps the input order (default: 1)")
    predict.add_argument("--accelerator", choices=["cpu", "gpu", "auto"], default="cpu",
                         help="where the processes predict (default: cpu)")
    predict.set_defaults(command="predict")

    report = verbs.add_parser("report", help="(re)build RUN/report.html: a self-contained page of the run's results",
                              description="Headline metrics with CIs, data summary, curves, confusion matrix, ROC, "
                                          "per-class table, worst misclassified Test images and the config, in one "
                                          "HTML file with embedded figures (readable offline, printable).")
    report.add_argument("run", help="a run folder written by `melanoma train`")
    report.set_defaults(command="report")

    compare = verbs.add_parser("compare", help="a table of several runs' headline Test metrics with CIs")
    compare.add_argument("runs", nargs="+", help="run folders")
    compare.add_argument("--subset", choices=["all", "clean"], default="clean",
                         help="Test images to compare on (default: clean, i.e. not leaked into Train)")
    compare.add_argument("--out", help="also write the markdown table to this file")
    compare.set_defaults(command="compare")

    explain = verbs.add_parser(
        "explain", help="Grad-CAM panels (image, heatmap, overlay) showing where the model looked",
        description="For each image: the predicted class and probability, and a Grad-CAM heatmap for that class "
                    "from the last convolutional layer. Unreadable images are reported; the others go on.")
    explain.add_argument("run", help="a run folder written by `melanoma train`")
    explain.add_argument("images", nargs="+", help="image files, folders or CSV manifests")
    explain.add_argument("--out", default="explanations", help="output folder (default: explanations)")
    explain.set_defaults(command="explain")

    export = verbs.add_parser(
        "export", help="export a run's model to ONNX (verified against PyTorch) for fast CPU inference",
        description="Writes RUN/model.onnx: dynamic batch, float pixels in [0, 255] in, probabilities out, class "
                    "names and preprocessing in the metadata. Checks max |probability difference| < 1e-4 against "
                    "PyTorch at batch sizes 1 and 16 before writing. predict/serve then use onnxruntime.")
    export.add_argument("run", help="a run folder written by `melanoma train`")
    export.add_argument("--format", default="onnx", help="onnx (the only format)")
    export.add_argument("--opset", type=_bounded_int(13, 20), default=17,
                        help="ONNX opset, 13 to 20 (what PyTorch's exporter writes and onnxruntime reads; default: 17)")
    export.set_defaults(command="export")

    fit_ood = verbs.add_parser(
        "fit-ood", help="fit a run's out-of-distribution gate without retraining (RUN/ood_gate.npz)",
        description="Reads the run's own training and validation images (its data sources and split.csv), fits the "
                    "detector on the training images' pooled features and sets the threshold so that 95%% of the "
                    "validation images pass. predict, serve and the web page then gate every image with it.")
    fit_ood.add_argument("run", help="a run folder written by `melanoma train`")
    fit_ood.add_argument("--detector", default=DEFAULT_DETECTOR, choices=DETECTORS,
                         help="the score (default: knn; docs/ood.md compares them)")
    fit_ood.add_argument("--data", nargs="+", action="extend", metavar="SOURCE",
                         help="data sources the run was trained on (default: the run's config)")
    fit_ood.set_defaults(command="fit-ood")

    serve = verbs.add_parser(
        "serve", help="serve a run over HTTP: REST API and a web page (/) for the clinic",
        description="FastAPI + uvicorn. GET /health, GET /v1/model, POST /v1/predict (multipart 'files', "
                    "?explain=true for a Grad-CAM overlay), a drag-and-drop page at /, an offline API reference at "
                    "/docs and the schema at /openapi.json. Concurrent requests are batched (one model call per "
                    "worker's share). "
                    "Uses onnxruntime when the run has model.onnx. Research tool, not a medical device.")
    serve.add_argument("run", help="a run folder written by `melanoma train`")
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=_bounded_int(1, 65535), default=8000, help="1-65535 (default: 8000)")
    serve.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every path but / and /health (or "
                                       "set MELANOMA_TOKEN); an empty token is an error")
    serve.add_argument("--allowed-hosts", nargs="+", action="extend", default=[], metavar="NAME",
                       help="more Host header names to accept besides localhost, 127.0.0.1, ::1 and --host "
                            "(repeatable; '*.example.org' patterns; '*' accepts any, which re-opens DNS rebinding)")
    serve.add_argument("--max-upload-mb", type=_finite_float, default=10.0,
                       help="per-image upload limit; a request may carry 16 such images (default: 10)")
    serve.add_argument("--max-request-megapixels", type=_finite_float, default=100.0,
                       help="pixels of all images of one request together, read from their headers before decoding "
                            "(default: 100, four 6000x4000 originals)")
    serve.add_argument("--concurrency", type=_bounded_int(1, 256), default=2,
                       help="inference workers, each running one model call at a time on its share of the cores "
                            "(default: 2)")
    serve.add_argument("--queue", type=_bounded_int(0, 100_000), default=32,
                       help="requests that may be in flight beyond --concurrency before 503 (default: 32)")
    serve.add_argument("--max-batch", type=_bounded_int(1, 4096), default=32,
                       help="images per model call (default: 32)")
    serve.add_argument("--batch-wait-ms", type=_finite_float, default=5.0,
                       help="how long a free worker's first request waits for concurrent ones to join its batch, "
                            "0 to 1000 (default: 5)")
    serve.add_argument("--body-timeout", type=_finite_float, default=30.0, metavar="SECONDS",
                       help="the whole request body must arrive within this, else 408 (default: 30)")
    serve.add_argument("--keep-alive", type=_bounded_int(1, 3600), default=5, metavar="SECONDS",
                       help="close idle keep-alive connections after this (default: 5)")
    serve.add_argument("--tta", action=argparse.BooleanOptionalAction,
                       help="8-view test-time augmentation, 8x the compute per image (default: off for serving, "
                            "melanoma.deploy.limits.SERVE_TTA; /v1/model reports it)")
    serve.set_defaults(command="serve")

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
    seed_study.add_argument("--only", nargs="+", action="extend", choices=["baseline", "augmented", "rebalanced"])
    seed_study.set_defaults(command="experiment")
    return parser
