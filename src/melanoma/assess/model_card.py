"""``RUN/MODEL_CARD.md``: the run described in the Hugging Face model-card layout (YAML front matter with the
metrics' values, then sections: model details, intended and out-of-scope use, training data and known biases,
evaluation data, metrics with intervals, the per-subgroup table, out-of-distribution behaviour, limitations).

Every number is read from the run's own files (metrics.json, data.json, config.json) when the card is written, never
typed in; ``tests/assess/test_model_card.py`` checks the card against metrics.json. Written at the end of training and
by ``melanoma report``.
"""
from __future__ import annotations

import os
from pathlib import Path

from melanoma.assess.subgroups import format_ci
from melanoma.core.io import atomic_write_text
from melanoma.runs.layout import CONFIG, DATA, METRICS, read_run_json

CARD = "MODEL_CARD.md"
# The training images' licence (ISIC Archive: CC BY-NC 4.0 or CC0 per image; HAM10000: CC BY-NC 4.0): weights learnt
# from them are shared on the same non-commercial terms.
LICENSE = "cc-by-nc-4.0"
TAGS = ["image-classification", "dermoscopy", "skin-lesion", "melanoma", "medical-imaging", "research-only",
        "not-a-medical-device"]
# metrics.json key (within test/<subset>/ci) -> (model-index type, readable name)
CARD_METRICS = {"balanced_accuracy": ("balanced_accuracy", "balanced accuracy"),
                "macro_f1": ("f1", "macro F1"),
                "melanoma_auc": ("roc_auc", "melanoma AUC (melanoma vs rest)"),
                "melanoma_sensitivity": ("sensitivity", "melanoma sensitivity at the alert threshold"),
                "melanoma_specificity": ("specificity", "melanoma specificity at the alert threshold")}
SUBGROUP_COLUMNS = ("balanced_accuracy", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def write_model_card(run_dir: str | os.PathLike) -> Path:
    """Write RUN/MODEL_CARD.md (atomically) from the run's files; returns its path."""
    run_dir = Path(run_dir)
    config = read_run_json(run_dir / CONFIG, require="config")
    metrics = read_run_json(run_dir / METRICS)
    data = read_run_json(run_dir / DATA) if (run_dir / DATA).is_file() else {}
    return atomic_write_text(run_dir / CARD, model_card(run_dir.name, config, metrics, data))


def model_card(name: str, config: dict, metrics: dict, data: dict) -> str:
    sections = [front_matter(name, config, metrics, data), f"# Model card: {name}", _details(config, metrics),
                _intended_use(config), _out_of_scope(), _training_data(data, metrics), _evaluation_data(data, metrics),
                _metrics_section(metrics), _subgroup_section(metrics), _ood_section(metrics),
                _consistency_section(metrics), _limitations(metrics)]
    return "\n\n".join(s.strip() for s in sections if s) + "\n"


def _value(interval: dict | None):
    return None if not interval else interval.get("value")


def front_matter(name: str, config: dict, metrics: dict, data: dict) -> str:
    """The YAML header: licence, tags, datasets, metric names and a model-index holding the Test values."""
    import yaml

    results = []
    for subset in ("all", "clean"):
        test = (metrics.get("test") or {}).get(subset)
        if not test:
            continue
        ci = test.get("ci") or {}
        values = {key: _value(ci.get(key)) for key in CARD_METRICS}
        if not ci:  # no bootstrap: the point values straight from the metrics
            melanoma = test.get("melanoma") or {}
            values = {"balanced_accuracy": test.get("balanced_accuracy"), "macro_f1": test.get("macro_f1"),
                      "melanoma_auc": melanoma.get("auc"), "melanoma_sensitivity": melanoma.get("sensitivity"),
                      "melanoma_specificity": melanoma.get("specificity")}
        entries = [{"type": CARD_METRICS[key][0], "name": f"{CARD_METRICS[key][1]} (Test, {subset} images)",
                    "value": value} for key, value in values.items() if value is not None]
        if entries:
            results.append({"task": {"type": "image-classification", "name": "dermoscopic skin-lesion classification"},
                            "dataset": {"name": ", ".join(_source_names(data)) or "Test split",
                                        "type": "dermoscopy", "split": f"Test ({subset} images, n={test['n']})"},
                            "metrics": entries})
    header = {"license": LICENSE, "library_name": "pytorch", "pipeline_tag": "image-classification",
              "tags": TAGS + [str(config.get("model", {}).get("name") or config["config"].get("model"))],
              "datasets": _source_names(data) or [str(path) for path in config["config"].get("data", [])],
              "metrics": sorted({kind for kind, _ in CARD_METRICS.values()})}
    if results:
        header["model-index"] = [{"name": name, "results": results}]
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000) + "---"


def _source_names(data: dict) -> list[str]:
    return [str(source["name"]) for source in data.get("sources") or []]


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _details(config: dict, metrics: dict) -> str:
    settings = config["config"]
    model = config.get("model", {})
    alert = metrics.get("alert") or {}
    calibration = metrics.get("calibration") or {}
    classes = ", ".join(config.get("classes", []))
    return "\n".join([
        "## Model details", "",
        f"- Architecture: `{model.get('name') or settings.get('model')}`, input "
        f"{(config.get('preprocessing') or {}).get('image_size', 'n/a')} px RGB; recipe `{settings.get('recipe')}`, "
        f"weights `{settings.get('weights')}`; best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')};"
        f" test-time augmentation {'on' if metrics.get('tta') else 'off'}.",
        f"- Classes ({len(config.get('classes', []))}): {classes}.",
        f"- Output: a probability per class, calibrated by temperature scaling (temperature "
        f"{_number(calibration.get('temperature'))}, fitted on validation), and a melanoma alert when p(melanoma) >= "
        f"{_number(alert.get('threshold'))} (chosen on validation for sensitivity "
        f"{alert.get('target_sensitivity', 'n/a')}).",
        f"- Trained with the `melanoma` package (command: `{config.get('command', 'n/a')}`); the run folder holds the "
        "weights (`checkpoints/best.pt`), `metrics.json`, `report.html` and this card."])


def _intended_use(config: dict) -> str:
    return ("## Intended use\n\nResearch on automated classification of dermoscopic images of skin lesions into the "
            "nine classes above, and on how such models fail: method comparisons, audits of data and subgroups, "
            "teaching. **Not a medical device.** It has no regulatory clearance and must not be used to diagnose, "
            "screen or triage patients, or to decide on a biopsy.")


def _out_of_scope() -> str:
    return "\n".join([
        "## Out-of-scope use", "",
        "- Any clinical decision, with or without a clinician in the loop.",
        "- Images that are not dermoscopy of a single skin lesion: clinical (naked-eye) photographs, histology, "
        "everyday photographs. Without an out-of-distribution gate the model answers one of the nine classes for "
        "anything it is given.",
        "- Lesions outside the nine classes (other skin diseases, mucosal or nail lesions).",
        "- Populations, skin types, body sites and devices that are rare or absent in the training data (see the "
        "subgroup table: groups marked too small to read have not been measured)."])


def _training_data(data: dict, metrics: dict) -> str:
    lines = ["## Training data and known biases", ""]
    sources = data.get("sources") or []
    for source in sources:
        lines.append(f"- `{source['name']}` ({source['kind']}): {source['images']} images, of which "
                     f"{source.get('train', 'n/a')} trained and {source.get('val', 'n/a')} validated after the "
                     "audit's clean-up.")
    if data:
        dropped = ", ".join(f"{count} {reason}" for reason, count in (data.get("dropped") or {}).items()) or "nothing"
        lines.append(f"- Training split: {data.get('train')} images ({data.get('expanded_copies', 0)} generated "
                     f"copies); the audit dropped {dropped} and relabelled {data.get('relabelled', 0)}; "
                     f"protocol {data.get('protocol')}, balancing {data.get('balance')}.")
        counts = data.get("train_counts") or {}
        if counts and sum(counts.values()):
            total = sum(counts.values())
            largest = max(counts, key=counts.get)
            smallest = min(counts, key=counts.get)
            lines.append(f"- Class imbalance: {largest} is {counts[largest] / total:.0%} of the training images, "
                         f"{smallest} {counts[smallest] / total:.1%} ({counts[smallest]} images).")
    lines += ["", "Known biases:", "",
              "- ISIC images come mostly from fair-skinned patients in Europe, Australia and the US; skin type is "
              "rarely recorded" + _recorded_note(metrics, "Fitzpatrick type") + ".",
              "- Acquisition era: the ISIC archive's oldest images (2016-17 collections) come from other clinics and "
              "cameras than the later ones, and the classes' shares differ between eras" + _era_shares(metrics)
              + ", so the era can stand in for the class (see Limitations).",
              "- Sources differ in size, resizing and JPEG encoding; a model can learn the source for the class.",
              "- Many benign lesions are confirmed by follow-up or expert consensus, not histopathology (see the "
              "subgroup table, diagnosis confirmation)."]
    return "\n".join(lines)


def _era_shares(metrics: dict) -> str:
    era = ((metrics.get("subgroups") or {}).get("validation") or {}).get("acquisition era")
    if not era or len(era["groups"]) < 2:
        return ""
    return " (validation: " + "; ".join(f"{g['group']}: {g['melanomas']} melanomas of {g['n']} images"
                                        for g in era["groups"]) + ")"


def _recorded_note(metrics: dict, attribute: str) -> str:
    validation = (metrics.get("subgroups") or {}).get("validation") or {}
    part = validation.get(attribute)
    if not part:
        return ""
    total = sum(group["n"] for group in part["groups"]) or (metrics.get("validation") or {}).get("n", 0)
    return f" (here: recorded for {part['recorded']} of {total} validation images)"


def _evaluation_data(data: dict, metrics: dict) -> str:
    validation = metrics.get("validation") or {}
    test = metrics.get("test") or {}
    lines = ["## Evaluation data", "",
             f"- Validation: {validation.get('n', 'n/a')} images split from the training pool (stratified by class, "
             "a lesion and every copy of a picture on one side); it chose the checkpoint, the temperature and the "
             "alert threshold."]
    if test:
        lines.append(f"- Test: {test['all']['n']} images of the held-out Test split, never used for any choice; "
                     f"{test['clean']['n']} of them 'clean' (not found leaked into Train by the audit).")
    else:
        lines.append("- No Test split was scored.")
    return "\n".join(lines)


def _metrics_section(metrics: dict) -> str:
    lines = ["## Metrics", ""]
    test = metrics.get("test") or {}
    if test:
        lines += ["Test, with 95 % stratified-bootstrap intervals:", "",
                  "| Test images | n | " + " | ".join(name for _, name in CARD_METRICS.values()) + " |",
                  "|---|---:|" + "---:|" * len(CARD_METRICS)]
        for subset in ("all", "clean"):
            part = test[subset]
            ci = part.get("ci") or {}
            lines.append(f"| {subset} | {part['n']} | " + " | ".join(format_ci(ci.get(key)) for key in CARD_METRICS)
                         + " |")
        lines.append("")
    validation = metrics.get("validation") or {}
    if validation:
        melanoma = validation.get("melanoma") or {}
        lines.append(f"Validation (n={validation['n']}): balanced accuracy {_number(validation['balanced_accuracy'])}"
                     f", macro F1 {_number(validation['macro_f1'])}, melanoma AUC {_number(melanoma.get('auc'))}, "
                     f"sensitivity {_number(melanoma.get('sensitivity'))} and specificity "
                     f"{_number(melanoma.get('specificity'))} at the alert threshold.")
    calibration = metrics.get("calibration") or {}
    if calibration.get("test_after"):
        lines.append(f"Calibration on Test: ECE {_number(calibration['test_before'].get('ece'))} before and "
                     f"{_number(calibration['test_after'].get('ece'))} after temperature scaling.")
    return "\n".join(lines)


def _subgroup_section(metrics: dict) -> str:
    section = metrics.get("subgroups")
    if not section:
        return "## Metrics per subgroup\n\nNot computed for this run (it was trained before subgroup metrics existed)."
    lines = ["## Metrics per subgroup", "",
             f"Each with n and a {section.get('level', 0.95):.0%} stratified-bootstrap interval "
             f"({section.get('resamples')} resamples); sensitivity and specificity at the alert threshold. Groups "
             f"with fewer than {section['min_images']} images or {section['min_melanomas']} melanomas are marked "
             "*too small to read*: their numbers are shown but say little. 'unknown': images without the field."]
    for split, title in (("validation", "Validation"), ("test", "Test (all images)")):
        if split in section:
            lines += ["", f"### {title}", "", *subgroup_markdown(section[split])]
    return "\n".join(lines)


def subgroup_markdown(table: dict) -> list[str]:
    """One split's subgroup table as markdown rows."""
    lines = ["| attribute | group | n | melanomas | balanced accuracy | melanoma AUC | sensitivity | specificity | "
             "note |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for attribute, part in table.items():
        if not part["groups"]:
            lines.append(f"| {attribute} | — | 0 | — | | | | | not recorded for any image |")
        for group in part["groups"]:
            cells = " | ".join(format_ci(group[key]) for key in SUBGROUP_COLUMNS)
            note = "too small to read" if group["too_small"] else ""
            lines.append(f"| {attribute} | {_cell(group['group'])} | {group['n']} | {group['melanomas']} | {cells} | "
                         f"{note} |")
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _flatten(payload, prefix: str = "") -> list[tuple[str, object]]:
    """Scalar leaves of a nested dict as (path, value) rows, for sections whose layout other modules own."""
    rows: list[tuple[str, object]] = []
    for key, value in payload.items():
        path = f"{prefix} / {key}" if prefix else str(key)
        if isinstance(value, dict):
            rows += _flatten(value, path)
        elif isinstance(value, (int, float)) or (isinstance(value, str) and len(value) < 80):
            rows.append((path, value))
    return rows


def _measure_table(payload: dict) -> list[str]:
    lines = ["| measure | value |", "|---|---:|"]
    for path, value in _flatten(payload):
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {_cell(path)} | {_cell(shown)} |")
    return lines


def _ood_section(metrics: dict) -> str:
    ood = {key: metrics[key] for key in ("ood_gate", "ood") if metrics.get(key)}
    ood = next(iter(ood.values())) if len(ood) == 1 else ood
    if not ood:
        return ("## Out-of-distribution behaviour\n\nNo gate fitted: every input gets one of the nine classes, "
                "including photographs that are not dermoscopy of a skin lesion, and may raise a melanoma alert. "
                "`melanoma fit-ood RUN` fits one for this run where the package provides it.")
    return "\n".join(["## Out-of-distribution behaviour", "",
                      "An out-of-distribution gate was fitted for this run; an image it rejects gets no melanoma "
                      "alert. Its measured rates (from metrics.json):", "", *_measure_table(ood)])


def _consistency_section(metrics: dict) -> str:
    consistency = metrics.get("consistency")
    if not consistency:
        return ""
    return "\n".join(["## Rendering consistency", "",
                      "How often the answer changes when the same picture is rendered differently (copies of one "
                      "picture in two sources, and stresses such as re-encoding and rotation), from metrics.json:", "",
                      *_measure_table(consistency)])


def _limitations(metrics: dict) -> str:
    lines = ["## Limitations", ""]
    era = ((metrics.get("subgroups") or {}).get("validation") or {}).get("acquisition era")
    groups = era["groups"] if era else []
    if len(groups) > 1:
        parts = [f"{g['group']} images (n={g['n']}, {g['melanomas']} melanomas): balanced accuracy "
                 f"{format_ci(g['balanced_accuracy'])}, melanoma AUC {format_ci(g['melanoma_auc'])}" for g in groups]
        lines.append("- Acquisition-era shift: on validation, " + "; ".join(parts) + ". A score over all images "
                     "rewards telling the eras apart; the within-era figures are the ones to expect on new images.")
    else:
        by_era = metrics.get("validation_by_era") or {}
        if by_era:
            parts = [f"{name} (n={m['n']}): melanoma AUC {_number((m.get('melanoma') or {}).get('auc'))}"
                     for name, m in by_era.items()]
            lines.append("- Acquisition-era shift: on validation, " + "; ".join(parts) + ".")
        else:
            lines.append("- Acquisition-era shift: this run's validation split holds one era only, so the shift "
                         "between the ISIC archive's 2016-17 images and later ones was not measured here.")
    test = (metrics.get("test") or {}).get("all")
    if test:
        melanomas = (test.get("melanoma") or {}).get("positives")
        lines.append(f"- The Test split is small ({test['n']} images, {melanomas} melanomas): its intervals are wide.")
    lines += ["- The alert threshold was chosen on validation; on a population with another melanoma prevalence or "
              "other devices its sensitivity will differ.",
              "- Labels are partly folder labels of a course dataset, checked against official ISIC truth by the "
              "audit; some remain unconfirmed.",
              "- Subgroups marked too small to read, and fields not recorded, have not been evaluated."]
    return "\n".join(lines)
