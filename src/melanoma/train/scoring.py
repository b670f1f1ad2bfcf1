"""After training: score the best checkpoint on validation (overall and per acquisition era) and on Test (all
images and the clean ones), fit the calibration temperature and choose the melanoma alert threshold on validation,
and write metrics.json, test_predictions.csv, curves.png and report.html."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from melanoma.assess.calibration import calibration_summary, fit_temperature, reliability_figure
from melanoma.assess.consistency import Predict, consistency_summary, measure_consistency
from melanoma.assess.external import external_summary, external_validation
from melanoma.assess.intervals import bootstrap_ci
from melanoma.assess.metrics import compute_metrics, threshold_for_sensitivity
from melanoma.assess.model_card import write_model_card
from melanoma.assess.report import write_run_report
from melanoma.assess.subgroups import subgroup_report
from melanoma.config import TrainConfig
from melanoma.core.hardware import evaluation_device
from melanoma.core.io import save_figure, write_csv, write_json
from melanoma.core.plots import training_curves_figure
from melanoma.data.records import COLLECTIONS, ERAS, MELANOMA, acquisition_era, id_block, melanoma_notice
from melanoma.models.probabilities import apply_temperature, predict_probabilities
from melanoma.runs.checkpoint import load_checkpoint, model_from_checkpoint
from melanoma.runs.layout import BEST, CHECKPOINT_DIR, CURVES, METRICS, RELIABILITY, TEST_PREDICTIONS, audit_folder
from melanoma.train.ood_fit import fit_after_training
from melanoma.train.prepare import PreparedData


def training_subgroups(config, data, val_probs: np.ndarray, test_probs: np.ndarray | None,
                       threshold: float | None, log=print) -> dict:
    """The ``subgroups`` section at the end of training: validation (split.csv's val rows) and Test (all images),
    with metadata from the run's data sources, --truth and --metadata files. A metadata file that fails now is a
    warning in the log and an ``error`` in the section, not a lost run."""

    from melanoma.assess.subgroups import sources_by_name
    from melanoma.core.errors import DataError
    from melanoma.data.sources import load_dataset

    started = time.perf_counter()
    try:
        index = load_dataset(config.data, image_root=getattr(config, "image_root", None))
        val_rows = _validation_rows(data)
        splits = {"validation": ([row["path"] for row in val_rows], [row.get("source", "") for row in val_rows],
                                 data.val_labels, val_probs)}
        if test_probs is not None and len(data.test_labels):
            by_name = sources_by_name(index)
            splits["test"] = (data.test_names, [by_name.get(name, "") for name in data.test_names],
                              data.test_labels, test_probs)
        section = subgroup_report(splits, data.classes, threshold, index, config.truth,
                                  getattr(config, "metadata", []), resamples=config.bootstrap, seed=config.seed,
                                  log=log)
    except DataError as exc:
        log(f"warning: no subgroup metrics: {exc}")
        return {"error": str(exc)}
    section["seconds"] = round(time.perf_counter() - started, 1)
    return section


def calibrated_predictor(model, image_size: int, tta: bool, device, temperature: float) -> Predict:
    """A PyTorch model as the run's calibrated predictor (what Run.probabilities gives for a finished run)."""
    from melanoma.models.probabilities import apply_temperature, predict_probabilities

    return lambda images: apply_temperature(predict_probabilities(model, images, image_size, tta=tta, device=device),
                                            temperature)


def consistency_after_training(run_dir: Path, config, data, predict: Predict, val_probs: np.ndarray,
                               threshold: float | None, image_size: int, log=print) -> dict:
    """metrics.json's ``consistency`` for a run being scored: the audit's copy pairs and the stressed validation
    images (seeded subsets of ``COPY_PAIRS`` and ``STRESS_IMAGES``), with the run's calibrated probabilities."""
    root = Path(data.summary["root"]) if data.summary.get("root") else None
    trained = {row["path"] for row in data.split_rows if row["role"] == "train"}
    result = measure_consistency(predict, classes=data.classes, threshold=threshold, image_size=image_size,
                                 val_images=data.val_images, root=root,
                                 audit_dir=audit_folder({"audit": config.audit}, run_dir), trained=trained,
                                 seed=config.seed, val_probs=val_probs)
    log(consistency_summary(result) + f" ({result['seconds']} s)")
    return result


def finish_run(run_dir: Path, data: PreparedData, config: TrainConfig, history: list[dict], log=print) -> dict:
    """Score the best checkpoint on validation and Test (all / clean), write metrics.json and curves.png."""
    payload = load_checkpoint(run_dir / CHECKPOINT_DIR / BEST)
    model, spec = model_from_checkpoint(payload)
    device = evaluation_device(config.accelerator)
    model.to(device)
    raw_val_probs = predict_probabilities(model, data.val_images, spec.image_size, tta=config.tta, device=device)
    calibration = _calibrate(run_dir, raw_val_probs, data.val_labels)
    val_probs = apply_temperature(raw_val_probs, calibration["temperature"])
    alert = _alert_threshold(data, val_probs, config.target_sensitivity)
    if notice := melanoma_notice(data.classes):
        log(f"note: {notice}")
    threshold = alert["threshold"] if alert else None
    metrics = {"best_epoch": payload["epoch"], "epochs_run": len(history), "tta": config.tta,
               "final_epoch": history[-1] if history else {}, "alert": alert, "calibration": calibration,
               "validation": compute_metrics(data.val_labels, val_probs, data.classes, threshold)}
    for key, within in (("validation_by_era", validation_by_era),
                        ("validation_by_collection", validation_by_collection),
                        ("validation_by_source", validation_by_source)):
        if parts := within(data, val_probs, threshold, resamples=config.bootstrap, seed=config.seed):
            metrics[key] = parts
    if config.bootstrap:
        metrics["validation"]["ci"] = bootstrap_ci(data.val_labels, val_probs, data.classes, threshold,
                                                   resamples=config.bootstrap, seed=config.seed)
    predict = calibrated_predictor(model, spec.image_size, config.tta, device, calibration["temperature"])
    metrics["consistency"] = consistency_after_training(run_dir, config, data, predict, val_probs, threshold,
                                                        spec.image_size, log)
    if config.external:  # reported only: never trained, calibrated or thresholded on
        metrics["external"] = external_validation(config.external, predict, data.classes, spec.image_size,
                                                  threshold, resamples=config.bootstrap, seed=config.seed)
        log(external_summary(metrics["external"]))
    if len(data.test_labels):
        raw_test_probs = predict_probabilities(model, data.test_images, spec.image_size, tta=config.tta,
                                               device=device)
        test_probs = apply_temperature(raw_test_probs, calibration["temperature"])
        calibration["test_before"] = calibration_summary(raw_test_probs, data.test_labels)
        calibration["test_after"] = calibration_summary(test_probs, data.test_labels)
        metrics["test"] = {}
        for subset, mask in (("all", np.ones(len(data.test_labels), dtype=bool)), ("clean", ~data.test_leaked)):
            scores = compute_metrics(data.test_labels[mask], test_probs[mask], data.classes, threshold)
            if config.bootstrap and mask.any():
                scores["ci"] = bootstrap_ci(data.test_labels[mask], test_probs[mask], data.classes, threshold,
                                            resamples=config.bootstrap, seed=config.seed)
            metrics["test"][subset] = scores
        write_csv(run_dir / TEST_PREDICTIONS, _prediction_rows(data, test_probs),
                  ["image", "label", "predicted", "leaked", *data.classes])
    metrics["subgroups"] = training_subgroups(config, data, val_probs, test_probs if len(data.test_labels) else None,
                                              threshold, log)
    metrics["ood_gate"] = fit_after_training(run_dir, model, spec.image_size, data, device, log)
    write_json(run_dir / METRICS, metrics)
    if history:
        save_figure(training_curves_figure(history, title=f"{config.model} ({config.protocol}, {config.balance})"),
                    run_dir / CURVES)
    write_run_report(run_dir)
    write_model_card(run_dir)
    _log_metrics(metrics, log)
    return metrics


def validation_by_era(data: PreparedData, val_probs: np.ndarray, threshold: float | None, resamples: int = 0,
                      seed: int = 0) -> dict:
    """Validation metrics per acquisition era (see melanoma.data.records.acquisition_era), where two or more are
    present.

    A score over all validation images rewards telling the eras apart, which here also tells most nevi from most
    melanomas; within one era that shortcut is no use, so these are the figures to watch for new images."""
    eras = [acquisition_era(row["path"]) for row in _validation_rows(data)]
    return _within_groups(data, val_probs, threshold, eras, ERAS, resamples, seed)


def validation_by_collection(data: PreparedData, val_probs: np.ndarray, threshold: float | None, resamples: int = 0,
                             seed: int = 0) -> dict:
    """Validation metrics per block of ISIC ids (melanoma.data.records.ID_BLOCKS), where two or more are present:
    the wide-field ISIC_0012000-0015999 images, where the model is weakest, apart from HAM10000's crops."""
    blocks = [id_block(row["path"]) for row in _validation_rows(data)]
    return _within_groups(data, val_probs, threshold, blocks, COLLECTIONS, resamples, seed)


def validation_by_source(data: PreparedData, val_probs: np.ndarray, threshold: float | None, resamples: int = 0,
                         seed: int = 0) -> dict:
    """Validation metrics per data source, where the validation split holds images of several sources."""
    sources = [row.get("source", "") for row in _validation_rows(data)]
    return _within_groups(data, val_probs, threshold, sources, sorted(set(sources)), resamples, seed)


def _validation_rows(data: PreparedData) -> list[dict]:
    """split.csv's validation rows, in the order of ``data.val_labels``."""
    return [row for row in data.split_rows if row["role"] == "val"]


def _within_groups(data: PreparedData, val_probs: np.ndarray, threshold: float | None, groups: list[str],
                   order, resamples: int = 0, seed: int = 0) -> dict:
    """Metrics within each group (n, melanoma count in ``melanoma.positives``), with 95 % stratified-bootstrap
    intervals (``ci``) when ``resamples``."""
    groups = np.array(groups)
    if len(set(groups.tolist())) < 2:
        return {}
    parts = {}
    for name in (name for name in order if (groups == name).any()):
        labels, probs = data.val_labels[groups == name], val_probs[groups == name]
        parts[name] = compute_metrics(labels, probs, data.classes, threshold)
        if resamples:
            parts[name]["ci"] = bootstrap_ci(labels, probs, data.classes, threshold, resamples=resamples, seed=seed)
    return parts


def _calibrate(run_dir: Path, val_probs: np.ndarray, val_labels: np.ndarray) -> dict:
    """Temperature scaling on validation, with its before/after measures and a reliability diagram."""
    temperature = fit_temperature(val_probs, val_labels)
    after = apply_temperature(val_probs, temperature)
    save_figure(reliability_figure(val_probs, after, val_labels, temperature), run_dir / RELIABILITY)
    return {"temperature": temperature, "fitted_on": "validation",
            "validation_before": calibration_summary(val_probs, val_labels),
            "validation_after": calibration_summary(after, val_labels)}


def _alert_threshold(data: PreparedData, val_probs: np.ndarray, target: float) -> dict | None:
    if MELANOMA not in data.classes:
        return None
    index = data.classes.index(MELANOMA)
    chosen = threshold_for_sensitivity(data.val_labels == index, val_probs[:, index], target)
    return chosen | {"chosen_on": "validation"}


def _prediction_rows(data: PreparedData, probs: np.ndarray) -> list[dict]:
    rows = []
    for name, label, leaked, row in zip(data.test_names, data.test_labels, data.test_leaked, probs):
        rows.append({"image": name, "label": data.classes[label], "predicted": data.classes[int(row.argmax())],
                     "leaked": int(leaked), **{c: f"{p:.6f}" for c, p in zip(data.classes, row)}})
    return rows


def _log_metrics(metrics: dict, log) -> None:
    val = metrics["validation"]
    log(f"best epoch {metrics['best_epoch']}: validation accuracy {val['accuracy']:.3f}, "
        f"balanced accuracy {val['balanced_accuracy']:.3f}")
    parts = {**metrics.get("validation_by_era", {}), **metrics.get("validation_by_collection", {}),
             **metrics.get("validation_by_source", {})}
    for name, m in parts.items():
        mel = m.get("melanoma", {})
        auc = f"{mel['auc']:.3f}" if mel.get("auc") is not None else "n/a"
        melanomas = m["per_class"].get(MELANOMA, {}).get("support", 0)
        log(f"  validation, {name} images (n={m['n']}, {melanomas} melanomas): balanced accuracy "
            f"{m['balanced_accuracy']:.3f}, melanoma AUC {auc}")
    for subset in ("all", "clean"):
        if "test" in metrics:
            m = metrics["test"][subset]
            mel = m.get("melanoma", {})
            auc = f"{mel['auc']:.3f}" if mel.get("auc") is not None else "n/a"
            sens = f", sensitivity {mel['sensitivity']:.2f} / specificity {mel['specificity']:.2f} at the alert" \
                if mel.get("sensitivity") is not None and mel.get("specificity") is not None else ""
            log(f"test ({subset}, n={m['n']}): accuracy {m['accuracy']:.3f}, balanced accuracy "
                f"{m['balanced_accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, melanoma AUC {auc}{sens}")
