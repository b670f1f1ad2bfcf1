"""Experiment tracking through Lightning's loggers: ``melanoma train --logger tensorboard`` writes event files into the
run folder, ``--logger mlflow`` logs to an MLflow tracking store (``--tracking-uri``, default: MLflow's own default,
``sqlite:///mlflow.db`` in the working folder for MLflow 3). Logged: the resolved config as parameters, train and
validation loss and accuracy and the learning rate per epoch (step = epoch, the numbers of history.csv), and at the
end report.html, curves.png and confusion.png (MLflow artifacts; TensorBoard images of the two figures). Only global
rank 0 logs; with the default ``--logger none`` nothing here imports tensorboard or mlflow.

    melanoma train --data DATA --out runs/a --logger tensorboard       # then: tensorboard --logdir runs
    melanoma train --data DATA --out runs/b --logger mlflow --tracking-uri sqlite:///runs/mlflow.db

``tracking.json`` in the run folder names the logger and, for MLflow, the store and run id, so ``--resume`` continues
the same MLflow run and the end-of-run artifacts find it.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from urllib.parse import urlsplit

from melanoma.config import choices_of
from melanoma.core.errors import RunError
from melanoma.core.io import write_json
from melanoma.runs.layout import CONFUSION, CURVES, REPORT, read_run_json

LOGGERS = choices_of("logger")
TENSORBOARD_DIR = "tensorboard"
TRACKING_FILE = "tracking.json"
EXPERIMENT = "melanoma"
ARTIFACTS = (REPORT, CURVES, CONFUSION)
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
_SERVERS = ("http", "https", "databricks", "databricks-uc", "uc")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # import name; pyproject pins the distributions


def check_tracking(logger: str, tracking_uri: str | None) -> None:
    """--logger and --tracking-uri checked before any work, each problem a one-line RunError. Looks packages up
    without importing them."""
    if logger not in LOGGERS:
        raise RunError(f"unknown --logger '{logger}' (choose from: {', '.join(LOGGERS)})")
    if tracking_uri is not None and logger != "mlflow":
        raise RunError("--tracking-uri goes with --logger mlflow")
    package = _PACKAGES.get(logger)
    if package and importlib.util.find_spec(package) is None:
        raise RunError(f"--logger {logger} needs the '{package}' package, which is not installed: "
                       "pip install -e '.[tracking]'")
    if tracking_uri is not None:
        _check_uri(tracking_uri)


def _check_uri(uri: str) -> None:
    scheme = urlsplit(uri).scheme.lower()
    base = scheme.split("+")[0]
    if not uri.strip():
        raise RunError("--tracking-uri is empty (leave it out for MLflow's default store)")
    if base in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise RunError(f"--tracking-uri {uri}: MLflow 3 refuses its file store (set MLFLOW_ALLOW_FILE_STORE=true "
                           "to use it anyway); give a database such as sqlite:///runs/mlflow.db")
    elif base in _DATABASES:
        if importlib.util.find_spec("sqlalchemy") is None:
            raise RunError(f"--tracking-uri {uri}: an MLflow database store needs 'sqlalchemy' and 'alembic'")
    elif base not in _SERVERS:
        raise RunError(f"--tracking-uri {uri}: MLflow has no '{scheme}:' store (use sqlite:///PATH.db, another "
                       f"database URL, http(s)://SERVER or databricks)")


def build_logger(logger: str, tracking_uri: str | None, run_dir: Path, resume: bool):
    """The Lightning logger for this process (None for 'none'). A resumed run continues its MLflow run."""
    if logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name=TENSORBOARD_DIR, version="", default_hp_metric=False)
    if logger == "mlflow":
        import mlflow
        from lightning.pytorch.loggers import MLFlowLogger

        saved = read_tracking(run_dir) if resume else {}
        uri = saved.get("tracking_uri") or tracking_uri or mlflow.get_tracking_uri()
        database = _sqlite_path(uri)
        if database is not None:  # sqlite makes the file, not its folder (sqlite:///runs/mlflow.db before runs/)
            database.parent.mkdir(parents=True, exist_ok=True)
        # a new experiment in a sqlite store keeps its artifacts beside the database, not in the working folder
        artifacts = (database.parent / "mlartifacts").resolve().as_uri() if database is not None else None
        return MLFlowLogger(experiment_name=EXPERIMENT, run_name=run_dir.name, tracking_uri=uri,
                            run_id=saved.get("run_id"), tags={"run_folder": str(run_dir.resolve())},
                            artifact_location=artifacts)
    return None


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return Path(uri[len("sqlite:///"):]).expanduser()
    return None


def start_tracking(logger, run_dir: Path, params: dict, resume: bool) -> None:
    """At fit start on global rank 0: the parameters (once: a resumed run already has them) and tracking.json."""
    if logger is None:
        return
    if not resume:
        logger.log_hyperparams(params)
        if _is_tensorboard(logger):  # the HPARAMS tab: the config, linked to the validation curves
            from torch.utils.tensorboard.summary import hparams

            experiment, start, end = hparams(logger._sanitize_params(params), {"val_loss": 0.0, "val_acc": 0.0})
            writer = logger.experiment._get_file_writer()
            for summary in (experiment, start, end):
                writer.add_summary(summary)
    record = {"logger": "tensorboard", "log_dir": TENSORBOARD_DIR} if _is_tensorboard(logger) else {
        "logger": "mlflow", "tracking_uri": logger._tracking_uri, "experiment_id": logger.experiment_id,
        "run_id": logger.run_id}
    write_json(run_dir / TRACKING_FILE, record)
    logger.save()


def log_epoch(logger, row: dict) -> None:
    """One history.csv row as metrics at step = its epoch (metrics without a value that epoch are left out)."""
    if logger is None:
        return
    metrics = {name: float(row[name]) for name in EPOCH_METRICS
               if row.get(name) is not None and math.isfinite(float(row[name]))}
    logger.log_metrics(metrics, step=int(row["epoch"]))
    logger.save()  # flushed each epoch: a killed run keeps what it logged


def read_tracking(run_dir: Path) -> dict:
    path = Path(run_dir) / TRACKING_FILE
    return read_run_json(path) if path.is_file() else {}  # a damaged file is a one-line RunError


def log_run_artifacts(run_dir: Path) -> list[str]:
    """After scoring, on global rank 0: the run's report.html, curves.png and confusion.png to its MLflow run, or the
    two figures as TensorBoard images. Returns the names logged ([] for a run without tracking)."""
    run_dir = Path(run_dir)
    record = read_tracking(run_dir)
    present = [name for name in ARTIFACTS if (run_dir / name).is_file()]
    if record.get("logger") == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(record["tracking_uri"])
        for name in present:
            client.log_artifact(record["run_id"], str(run_dir / name))
        return present
    if record.get("logger") == "tensorboard":
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard import SummaryWriter

        figures = [name for name in present if name.endswith(".png")]
        with SummaryWriter(str(run_dir / record["log_dir"])) as writer:
            for name in figures:
                pixels = np.asarray(Image.open(run_dir / name).convert("RGB"))
                writer.add_image(Path(name).stem, pixels, dataformats="HWC")
        return figures
    return []


def _is_tensorboard(logger) -> bool:
    return type(logger).__name__ == "TensorBoardLogger"
