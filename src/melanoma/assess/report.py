"""``report.html``: one self-contained page per run (figures embedded as PNG data URIs), readable offline and printable.

Sections: headline Test metrics with 95% CIs, the data (counts, what the audit flagged, what training dropped),
training curves, confusion matrix, ROC, the per-class table (recall with Wilson 95% intervals), the most confidently
misclassified Test images, and the resolved config.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from melanoma.audit.report import AUDIT_JSON
from melanoma.core.errors import RunError
from melanoma.core.io import atomic_write_text, read_json
from melanoma.core.text import display_name
from melanoma.runs.layout import (
    AUDIT_DIR,
    CONFIG,
    CONFUSION,
    DATA,
    METRICS,
    REPORT,
    ROC,
    TEST_PREDICTIONS,
    read_run_json,
)

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1b1f23;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th:first-child,td:first-child{text-align:left}thead th{background:#f3f4f6}
tbody th{text-align:left;font-weight:normal}
figure{margin:.6em 0}figure img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:.9em}
.banner{background:#fff4e5;border:1px solid #f0b86e;padding:.6em 1em;border-radius:6px}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}.gallery figure{width:200px;font-size:.8em}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.8em}
@media print{body{max-width:none}.gallery figure{break-inside:avoid}}
"""


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def array_data_uri(pixels: np.ndarray) -> str:

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def wilson_interval(hits: int, total: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion: sound for the small per-class counts of this Test set."""
    if total == 0:
        return None
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def write_run_report(run_dir: str | Path, gallery_size: int = 12) -> Path:
    """Build RUN/report.html from the files a run already holds (plus the evaluation figures it makes if missing)."""
    run_dir = Path(run_dir)
    config = read_run_json(run_dir / CONFIG, require="config")
    if not (run_dir / METRICS).is_file():
        raise RunError(f"{display_name(run_dir)}: training has not finished (no {METRICS}); finish it with "
                       f"`melanoma train --out {display_name(run_dir)} --resume`")
    metrics = read_run_json(run_dir / METRICS, require="validation")
    data = read_run_json(run_dir / DATA)
    figures = _figures(run_dir, config, metrics)
    sections = [
        f"<h1>melanoma run: {html.escape(run_dir.name)}</h1>",
        f"<p class='note'>{html.escape(config['model']['name'])}, "
        f"recipe {html.escape(str(config['config'].get('recipe')))}"
        f", seed {config['config']['seed']}. Command: <code>{html.escape(config.get('command', ''))}</code></p>",
        "<p class='banner'>Research tool, not a medical device. Test images are only scored, never used to choose "
        "anything; the melanoma alert threshold was chosen on the validation split.</p>",
        _headline_section(metrics),
        _validation_section(metrics),
        consistency_html(metrics),
        _subgroup_section(metrics),
        _data_section(run_dir, data),
        _sources_section(data),
        _figure_section("Training curves", figures.get("curves")),
        _figure_section("Confusion matrix (Test, all images)", figures.get("confusion")),
        _figure_section("ROC curves, one vs rest (Test, all images)", figures.get("roc")),
        _figure_section("Calibration (temperature scaling fitted on validation)", figures.get("reliability")),
        _per_class_section(metrics, config["classes"]),
        _gallery_section(run_dir, config, data, gallery_size),
        _gradcam_section(run_dir, config, data),
        "<h2>Configuration</h2><pre>" + html.escape(_pretty(config)) + "</pre>",
    ]
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>melanoma run report</title>"
            f"<style>{STYLE}</style></head><body>" + "\n".join(s for s in sections if s) + "</body></html>\n")
    return atomic_write_text(run_dir / REPORT, page)


def _pretty(payload) -> str:

    return json.dumps(payload, indent=2)


def _figures(run_dir: Path, config: dict, metrics: dict) -> dict[str, Path]:
    from melanoma.core.io import save_figure
    from melanoma.core.plots import confusion_figure, roc_pr_figures

    figures = {name: run_dir / f"{name}.png" for name in ("curves", "reliability")
               if (run_dir / f"{name}.png").is_file()}
    if "test" not in metrics:
        return figures
    classes = config["classes"]
    confusion = run_dir / CONFUSION
    save_figure(confusion_figure(metrics["test"]["all"]["confusion_matrix"], classes, "Test"), confusion)
    figures["confusion"] = confusion
    labels, probs, _, _ = _test_predictions(run_dir, classes)
    if len(labels):
        roc, _ = roc_pr_figures(labels, probs, classes)
        save_figure(roc, run_dir / ROC)
        figures["roc"] = run_dir / ROC
    return figures


def _test_predictions(run_dir: Path, classes: list[str]):
    path = run_dir / TEST_PREDICTIONS
    if not path.is_file():
        return np.zeros(0, dtype=int), np.zeros((0, len(classes))), [], []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.asarray([classes.index(r["label"]) for r in rows])
    probs = np.asarray([[float(r[c]) for c in classes] for r in rows])
    return labels, probs, [r["image"] for r in rows], [int(r["leaked"]) for r in rows]


def _headline_section(metrics: dict) -> str:
    if "test" not in metrics:
        return "<h2>Results</h2><p>No Test split was scored.</p>"
    alert = metrics.get("alert") or {}
    rows = []
    for subset in ("all", "clean"):
        test = metrics["test"][subset]
        ci = test.get("ci", {})
        cells = [f"{subset} (n={test['n']})"]
        for name in ("balanced_accuracy", "macro_f1", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity"):
            cells.append(_ci_cell(ci.get(name)))
        cells.append(f"{test['accuracy']:.3f}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    threshold = f"{alert['threshold']:.3f}" if alert.get("threshold") is not None else "n/a"
    return ("<h2>Results on Test (95% stratified-bootstrap CIs)</h2><table><thead><tr><th>Test images</th>"
            "<th>balanced accuracy</th><th>macro F1</th><th>melanoma AUC</th><th>melanoma sensitivity</th>"
            "<th>melanoma specificity</th><th>accuracy</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
            f"<p class='note'>'clean' = Test images the audit did not find leaked into Train. Sensitivity and "
            f"specificity are at the melanoma alert threshold {threshold}, chosen on validation for sensitivity "
            f"{alert.get('target_sensitivity', 'n/a')}. Best epoch {metrics.get('best_epoch')} of "
            f"{metrics.get('epochs_run')}; test-time augmentation {'on' if metrics.get('tta') else 'off'}.</p>")


def _validation_section(metrics: dict) -> str:
    """Validation over all images, within each acquisition era and within each data source (where the run has
    several)."""
    subsets = {"all": metrics["validation"], **metrics.get("validation_by_era", {}),
               **{f"ids {name}": m for name, m in metrics.get("validation_by_collection", {}).items()},
               **{f"source: {name}": m for name, m in metrics.get("validation_by_source", {}).items()}}
    rows = []
    for name, m in subsets.items():
        auc, ci = (m.get("melanoma") or {}).get("auc"), m.get("ci") or {}
        melanomas = m["per_class"].get("melanoma", {}).get("support", "n/a")
        auc_cell = _ci_cell(ci["melanoma_auc"]) if ci.get("melanoma_auc") else 'n/a' if auc is None else f'{auc:.3f}'
        balanced = _ci_cell(ci["balanced_accuracy"]) if ci.get("balanced_accuracy") else f"{m['balanced_accuracy']:.3f}"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{m['n']}</td><td>{melanomas}</td>"
                    f"<td>{balanced}</td><td>{auc_cell}</td></tr>")
    note = ("<p class='note'>Within one era the image's age cannot stand in for its class; on these data the "
            "'2016-17 archive' row is the one that predicts how melanomas from other clinics fare.</p>"
            if len(subsets) > 1 else "")
    return ("<h2>Validation (split from Train)</h2><table><thead><tr><th>images</th><th>n</th><th>melanomas</th>"
            "<th>balanced accuracy</th><th>melanoma AUC</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>" + note)


def _subgroup_section(metrics: dict) -> str:
    """Per subgroup (metrics.json's ``subgroups``): one table per split, every group with n, melanomas and each
    metric with its bootstrap interval; small groups marked, never hidden."""
    section = metrics.get("subgroups")
    if not section:
        return ""
    if "error" in section:
        return f"<h2>Per subgroup</h2><p>Not computed: {html.escape(section['error'])}</p>"
    head = ("<table><thead><tr><th>attribute</th><th>group</th><th>n</th><th>melanomas</th><th>balanced accuracy</th>"
            "<th>melanoma AUC</th><th>sensitivity</th><th>specificity</th><th>note</th></tr></thead><tbody>")
    parts = [f"<h2>Per subgroup ({section.get('resamples')} bootstrap resamples, {section.get('level', 0.95):.0%} "
             "intervals)</h2>"]
    for split, title in (("validation", "Validation"), ("test", "Test, all images")):
        if split not in section:
            continue
        rows = []
        for attribute, part in section[split].items():
            if not part["groups"]:
                rows.append(f"<tr><th scope='row'>{html.escape(attribute)}</th><td colspan='8' class='note'>not "
                            "recorded for any image</td></tr>")
            for group in part["groups"]:
                cells = "".join(f"<td>{_ci_cell(group[m])}</td>" for m in ("balanced_accuracy", "melanoma_auc",
                                                                           "melanoma_sensitivity",
                                                                           "melanoma_specificity"))
                note = "too small to read" if group["too_small"] else ""
                style = " class='note'" if note else ""
                rows.append(f"<tr{style}><th scope='row'>{html.escape(attribute)}</th>"
                            f"<th scope='row'>{html.escape(group['group'])}</th>"
                            f"<td>{group['n']}</td><td>{group['melanomas']}</td>{cells}<td>{note}</td></tr>")
        parts.append(f"<h3>{title}</h3>" + head + "".join(rows) + "</tbody></table>")
    parts.append(f"<p class='note'>Groups with fewer than {section['min_images']} images or {section['min_melanomas']}"
                 " melanomas are marked 'too small to read': shown, but their numbers say little. 'unknown': images "
                 "whose metadata lacks the field. Sensitivity and specificity are at the alert threshold.</p>")
    return "\n".join(parts)


def _ci_cell(interval: dict | None) -> str:
    if not interval or interval.get("value") is None:
        return "n/a"
    if interval.get("low") is None:
        return f"{interval['value']:.3f}"
    return f"{interval['value']:.3f} <span class='note'>[{interval['low']:.2f}, {interval['high']:.2f}]</span>"


def _data_section(run_dir: Path, data: dict) -> str:
    classes = list(data["train_counts"])
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{data['train_counts'][c]}</td><td>{data['val_counts'][c]}</td>"
                   f"<td>{data['test_counts'][c]}</td></tr>" for c in classes)
    dropped = ", ".join(f"{v} {html.escape(k)}" for k, v in data["dropped"].items()) or "nothing"
    audit = run_dir / AUDIT_DIR / AUDIT_JSON
    flagged = ""
    if audit.is_file():
        summary = read_json(audit)["summary"]
        flagged = (f"<p>The audit found {summary['image_ids_in_several_classes']} image ids filed under two classes, "
                   f"{summary['leaked_heldout_images']} Test images leaked into Train {summary['leaks_by_reason']}, "
                   f"and {summary['truth_disagreements'] if summary['truth_disagreements'] is not None else 'n/a'} "
                   "folder labels contradicted by official ISIC truth (details in <code>audit/audit.md</code>).</p>")
    cleaning = "used the audit clean-up" if data["cleaned"] else "used the folders as they are (--no-clean)"
    return (f"<h2>Data</h2>{flagged}<p>Training {cleaning}: dropped {dropped}; relabelled {data['relabelled']}. "
            "Protocol "
            f"{html.escape(data['protocol'])}, balancing {html.escape(data['balance'])} "
            f"({data['expanded_copies']} generated copies).</p><table><thead><tr><th>class</th><th>train</th>"
            f"<th>validation</th><th>Test</th></tr></thead><tbody>{rows}</tbody></table>")


def _sources_section(data: dict) -> str:
    """Each data source: kind, images, how many trained and validated, what was skipped, and its attribution."""
    sources = data.get("sources") or []
    if not sources:
        return ""
    rows = "".join(f"<tr><td>{html.escape(s['name'])}</td><td>{html.escape(s['kind'])}</td><td>{s['images']}</td>"
                   f"<td>{s.get('train', 'n/a')}</td><td>{s.get('val', 'n/a')}</td>"
                   f"<td>{html.escape(_skipped_text(s.get('skipped')))}</td></tr>" for s in sources)
    credits = "".join(f"<h3>Attribution: {html.escape(s['name'])}</h3><pre>{html.escape(s['attribution'])}</pre>"
                      f"<p class='note'>Licences: {html.escape(str(s.get('licenses') or 'n/a'))}</p>"
                      for s in sources if s.get("attribution"))
    return ("<h2>Data sources</h2><table><thead><tr><th>source</th><th>kind</th><th>images</th><th>train</th>"
            "<th>validation</th><th>skipped</th></tr></thead><tbody>" + rows + "</tbody></table>"
            "<p class='note'>Train and validation count what remained after the audit's clean-up; a picture found in "
            "several sources trains once.</p>" + credits)


def _skipped_text(skipped) -> str:
    if isinstance(skipped, dict):
        return ", ".join(f"{count} {reason}" for reason, count in skipped.items()) or "none"
    return f"{skipped} non-image file(s)" if skipped else "none"


def _data_root(config: dict, data: dict) -> Path:
    """The folder Test image paths are relative to: recorded by training, or the run's one data source."""
    if data.get("root"):
        return Path(data["root"])
    sources = config["config"]["data"]
    return Path(sources if isinstance(sources, str) else sources[0])


def _figure_section(title: str, path: Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    return f"<h2>{html.escape(title)}</h2><figure><img alt='{html.escape(title)}' src='{png_data_uri(path)}'></figure>"


def _per_class_section(metrics: dict, classes: list[str]) -> str:
    if "test" not in metrics:
        return ""
    per_class = metrics["test"]["all"]["per_class"]
    confusion = np.asarray(metrics["test"]["all"]["confusion_matrix"])
    rows = []
    for index, name in enumerate(classes):
        stats = per_class[name]
        interval = wilson_interval(int(confusion[index, index]), int(stats["support"]))
        recall = f"{stats['recall']:.2f}" + (f" <span class='note'>[{interval[0]:.2f}, {interval[1]:.2f}]</span>"
                                             if interval else "")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{stats['precision']:.2f}</td><td>{recall}</td>"
                    f"<td>{stats['f1']:.2f}</td><td>{stats['support']}</td></tr>")
    return ("<h2>Per class (Test, all images)</h2><table><thead><tr><th>class</th><th>precision</th>"
            "<th>recall [95% Wilson]</th><th>F1</th><th>support</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _gallery_section(run_dir: Path, config: dict, data: dict, size: int) -> str:
    """The most confidently wrong Test predictions, with their true and predicted labels."""
    from melanoma.data.images import decode_image

    classes = config["classes"]
    labels, probs, images, leaked = _test_predictions(run_dir, classes)
    if not len(labels):
        return ""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:size]
    root = _data_root(config, data)
    cards = []
    for i in wrong:
        path = root / images[i]
        try:
            uri = array_data_uri(decode_image(path).pixels)
        except Exception:  # a moved or unreadable file should not sink the whole report
            continue
        cards.append(f"<figure><img alt='{html.escape(images[i])}' src='{uri}'><figcaption>"
                     f"<b>true</b> {html.escape(classes[labels[i]])}<br><b>predicted</b> "
                     f"{html.escape(classes[predicted[i]])} ({probs[i, predicted[i]]:.2f})"
                     f"{' · leaked' if leaked[i] else ''}<br><span class='note'>{html.escape(images[i])}</span>"
                     "</figcaption></figure>")
    if not cards:
        return ""
    return ("<h2>Most confidently misclassified Test images</h2><div class='gallery'>" + "".join(cards) + "</div>")


def _gradcam_section(run_dir: Path, config: dict, data: dict, count: int = 9) -> str:
    """Grad-CAM overlays for one Test image per class (the first in file order), with the model's call."""
    import warnings

    from melanoma.assess.explain import explain_files, overlay
    from melanoma.runs.run import Run

    classes = config["classes"]
    labels, _, images, _ = _test_predictions(run_dir, classes)
    first_per_class = {}
    for label, image in zip(labels, images):
        first_per_class.setdefault(int(label), image)
    chosen = [first_per_class[k] for k in sorted(first_per_class)][:count]
    if not chosen:
        return ""
    root = _data_root(config, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an uncalibrated run is fine for a picture of where it looked
        run = Run.load(run_dir, backend="torch")
    cards = []
    for explanation, image in zip(explain_files(run, [(name, root / name) for name in chosen]), chosen):
        if explanation.error:
            continue
        true_label = Path(image).parent.name
        cards.append(f"<figure><img alt='Grad-CAM {html.escape(image)}' "
                     f"src='{array_data_uri(overlay(explanation.pixels, explanation.heatmap))}'><figcaption>"
                     f"<b>true</b> {html.escape(true_label)}<br><b>predicted</b> "
                     f"{html.escape(explanation.predicted)} ({explanation.probability:.2f})</figcaption></figure>")
    if not cards:
        return ""
    return ("<h2>Grad-CAM: where the model looked (one Test image per class)</h2><div class='gallery'>"
            + "".join(cards) + "</div>")


# ---------------------------------------------------------------------------------------------------------------
# melanoma compare RUN RUN...

COMPARE_METRICS = ("balanced_accuracy", "macro_f1", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def compare_runs(runs: list[str], subset: str = "clean") -> tuple[list[dict], str]:
    """Headline Test metrics (with CIs) of several runs: rows, and a markdown table."""
    rows = []
    for run in runs:
        run_dir = Path(run)
        if not (run_dir / METRICS).is_file():
            raise RunError(f"{run}: no {METRICS} (not a finished run folder)")
        metrics = read_run_json(run_dir / METRICS)
        config = read_run_json(run_dir / CONFIG, require="config")
        test = metrics.get("test", {}).get(subset)
        row = {"run": run_dir.name, "model": config["model"]["name"], "n": test["n"] if test else 0}
        for name in COMPARE_METRICS:
            interval = (test or {}).get("ci", {}).get(name) or {}
            row[name] = interval.get("value")
            row[f"{name}_ci"] = (interval.get("low"), interval.get("high"))
        rows.append(row)
    header = "| run | model | n | " + " | ".join(n.replace("_", " ") for n in COMPARE_METRICS) + " |"
    lines = [header, "|---|---|---:|" + "---:|" * len(COMPARE_METRICS)]
    for row in rows:
        cells = [_plain_ci(row[n], row[f"{n}_ci"]) for n in COMPARE_METRICS]
        lines.append(f"| {row['run']} | {row['model']} | {row['n']} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


def _plain_ci(value, interval) -> str:
    if value is None:
        return "n/a"
    low, high = interval
    return f"{value:.3f}" if low is None else f"{value:.3f} [{low:.2f}, {high:.2f}]"


# ---------------------------------------------------------------------------------------------------------------
# report.html


def consistency_html(metrics: dict) -> str:
    """report.html's section: the copy pairs and each stress (share of top class / alert changed, mean |dp|), and
    external validation where the run has it; empty for a run scored before these existed."""
    from html import escape

    def pct(value) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    rows = []
    consistency = metrics.get("consistency") or {}
    if copies := consistency.get("copies"):
        for name, part in (("cross-source copies, all", copies["all"]),
                           ("cross-source copies, not trained on", copies["not_trained_on"])):
            rows.append((name, part))
    for name, part in (consistency.get("stresses") or {}).get("stresses", {}).items():
        rows.append((f"validation, {name}", part))
    body = "".join(f"<tr><td>{escape(name)}</td><td>{p['n']}</td><td>{pct(p['top_class_changed'])}</td>"
                   f"<td>{pct(p.get('alert_changed'))}</td><td>{p.get('mean_abs_delta_melanoma', float('nan')):.3f}"
                   "</td></tr>" for name, p in rows)
    section = ("<h2>Rendering consistency</h2><table><thead><tr><th>renderings</th><th>n</th><th>top class changed"
               "</th><th>melanoma alert changed</th><th>mean |&Delta;p(melanoma)|</th></tr></thead><tbody>" + body
               + "</tbody></table><p class='note'>The same picture as another source saved it, and validation images "
               "re-rendered (resolution, JPEG, gamma, white balance), rotated, flipped, brightened or with less "
               "contrast: the right answer is no change. Seeded subsets; the alert at the run's threshold.</p>"
               if rows else "")
    external = metrics.get("external")
    if external:
        def interval(part: dict | None) -> str:
            if not part or part.get("value") is None:
                return "n/a"
            low = f" [{part['low']:.2f}, {part['high']:.2f}]" if part.get("low") is not None else ""
            return f"{part['value']:.3f}{low}"

        ci = external.get("ci") or {}
        section += ("<h2>External validation</h2><table><thead><tr><th>images</th><th>n</th><th>melanomas</th>"
                    "<th>melanoma AUC</th><th>melanoma vs nevus AUC</th><th>sensitivity at the alert</th>"
                    "<th>specificity at the alert</th></tr></thead><tbody>"
                    f"<tr><td>{escape(external['folder'])}</td><td>{external['n']}</td>"
                    f"<td>{(external.get('melanoma') or {}).get('positives', 'n/a')}</td>"
                    f"<td>{interval(external.get('melanoma_auc'))}</td>"
                    f"<td>{interval(external.get('melanoma_vs_nevus_auc'))}</td>"
                    f"<td>{interval(ci.get('melanoma_sensitivity'))}</td>"
                    f"<td>{interval(ci.get('melanoma_specificity'))}</td></tr>"
                    + "".join(f"<tr><td>ids {escape(name)}</td><td>{part['n']}</td><td>{part['melanomas']}</td>"
                              f"<td>{interval(part['melanoma_auc'])}</td><td></td><td></td><td></td></tr>"
                              for name, part in (external.get("by_collection") or {}).items())
                    + "</tbody></table><p class='note'>Never trained, calibrated or thresholded on; 95 % bootstrap "
                    "intervals. A row per block of ISIC ids: collections of their own clinic, camera and framing.</p>")
    return section
