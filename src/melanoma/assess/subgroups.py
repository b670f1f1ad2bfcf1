"""Metrics per subgroup: balanced accuracy, melanoma AUC, sensitivity and specificity at the alert threshold, each
with n and a bootstrap 95 % interval, per age band, sex, anatomic site, Fitzpatrick type, collection, data source,
acquisition era and how the diagnosis was confirmed.

This module decides who is in which group and how the tables read; the numbers come from the project's one
evaluation path (:func:`melanoma.assess.subgroups.subgroup_metrics`, through ``compute_metrics`` and ``bootstrap_ci``).
Groups with fewer than ``MIN_IMAGES`` images or ``MIN_MELANOMAS`` melanomas are marked too small to read, never
hidden; images without the field form an "unknown" group. A field recorded for no image at all has no groups.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from melanoma.data.metadata import Metadata
from melanoma.data.records import image_id_from_name

if TYPE_CHECKING:
    from melanoma.data.records import DatasetIndex
from melanoma.assess.intervals import bootstrap_ci
from melanoma.assess.metrics import compute_metrics

# ---------------------------------------------------------------------------------------------------------------
# Metrics per subgroup (who is in which group: melanoma.assess.subgroups)

SUBGROUP_METRICS = ("balanced_accuracy", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")


def subgroup_metrics(labels: Sequence[int], probabilities: np.ndarray, classes: Sequence[str],
                     threshold: float | None, groups: dict[str, list[str]], resamples: int = 1000,
                     seed: int = 0) -> dict:
    """Per attribute (``groups``: attribute -> each image's group): how many images have it recorded, and one entry
    per group with n, melanomas, whether it is too small to read, and each metric as value/low/high."""

    labels = np.asarray(labels)
    table = {}
    for attribute, per_image in groups.items():
        per_image = np.asarray(per_image, dtype=object)
        recorded = int((per_image != UNKNOWN).sum())
        names = [] if attribute in FROM_METADATA and recorded == 0 else ordered_groups(attribute, per_image)
        table[attribute] = {"recorded": recorded, "groups": [
            _group_entry(name, labels[per_image == name], probabilities[per_image == name], classes, threshold,
                         resamples, seed) for name in names]}
    return table


def _group_entry(name: str, labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
                 threshold: float | None, resamples: int, seed: int) -> dict:

    metrics = compute_metrics(labels, probabilities, classes, threshold)
    melanoma = metrics.get("melanoma") or {}
    values = {"balanced_accuracy": metrics["balanced_accuracy"], "melanoma_auc": melanoma.get("auc"),
              "melanoma_sensitivity": melanoma.get("sensitivity"),
              "melanoma_specificity": melanoma.get("specificity")}
    intervals = bootstrap_ci(labels, probabilities, classes, threshold, resamples=resamples, seed=seed) \
        if resamples and len(labels) else {}
    melanomas = int(melanoma.get("positives", 0))
    entry = {"group": name, "n": int(len(labels)), "melanomas": melanomas,
             "too_small": bool(len(labels) < MIN_IMAGES or melanomas < MIN_MELANOMAS)}
    for metric in SUBGROUP_METRICS:
        bounds = intervals.get(metric) or {}
        entry[metric] = {"value": values[metric], "low": bounds.get("low"), "high": bounds.get("high")}
    return entry


def subgroup_report(splits: dict[str, tuple], classes: Sequence[str], threshold: float | None, index=None,
                    truth: Sequence[str] = (), extra: Sequence[str] = (), resamples: int = 1000, seed: int = 0,
                    log=print) -> dict:
    """The ``subgroups`` section of metrics.json. ``splits``: name -> (file names, data sources, labels,
    probabilities); the metadata is joined by image id from ``index``'s sources, ``truth`` and ``extra``
    (--metadata files) by :func:`melanoma.data.metadata.load_metadata`."""
    from melanoma.data.metadata import load_metadata, metadata_notes

    metadata = load_metadata(index, truth, extra)
    for note in metadata_notes(metadata):
        log(f"warning: {note}")
    section = {"min_images": MIN_IMAGES, "min_melanomas": MIN_MELANOMAS, "resamples": resamples, "level": 0.95,
               "threshold": threshold, "metadata": metadata.read_from}
    for split, (names, sources, labels, probabilities) in splits.items():
        section[split] = subgroup_metrics(labels, probabilities, classes, threshold,
                                          image_groups(names, sources, metadata), resamples, seed)
    return section

MIN_IMAGES, MIN_MELANOMAS = 30, 5
UNKNOWN = "unknown"
METRICS = ("balanced_accuracy", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")
AGE_BANDS = ("<30", "30-49", "50-69", ">=70")
FITZPATRICK_BANDS = ("I-II", "III-IV", "V-VI")
# field of melanoma.data.metadata -> attribute name; "data source" and "acquisition era" come from the image itself
FROM_METADATA = {"age band": "age", "sex": "sex", "anatomic site": "anatomic_site",
                 "Fitzpatrick type": "fitzpatrick", "diagnosis confirmation": "diagnosis_confirmation",
                 "collection": "collection"}
ATTRIBUTES = ("age band", "sex", "anatomic site", "Fitzpatrick type", "data source", "collection", "acquisition era",
              "diagnosis confirmation")
# HAM10000's localization and the ISIC Archive's anatom_site_general, on one coarse scale
_SITES = {"face": "head/neck", "ear": "head/neck", "neck": "head/neck", "scalp": "head/neck", "head": "head/neck",
          "head/neck": "head/neck", "head and neck": "head/neck", "palms and soles": "palms/soles",
          "oral or genital": "oral/genital", "chest": "torso", "abdomen": "torso", "back": "torso", "trunk": "torso",
          "torso": "torso", "anterior torso": "torso", "posterior torso": "torso", "lateral torso": "torso",
          "upper extremity": "upper extremity", "hand": "upper extremity", "lower extremity": "lower extremity",
          "foot": "lower extremity", "acral": "palms/soles", "palms/soles": "palms/soles",
          "genital": "oral/genital", "oral/genital": "oral/genital"}
_CONFIRMATION = {"histo": "histopathology", "histopathology": "histopathology",
                 "follow_up": "follow-up", "serial imaging showing no change": "follow-up",
                 "consensus": "expert consensus", "single image expert consensus": "expert consensus",
                 "confocal": "confocal microscopy",
                 "confocal microscopy with consensus dermoscopy": "confocal microscopy"}
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6}


def age_band(value: str) -> str:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return UNKNOWN
    if not 0 <= age < 130:
        return UNKNOWN
    return AGE_BANDS[0] if age < 30 else AGE_BANDS[1] if age < 50 else AGE_BANDS[2] if age < 70 else AGE_BANDS[3]


def fitzpatrick_band(value: str) -> str:
    text = value.strip().lower().removeprefix("fitzpatrick").removeprefix("type").strip().replace("-", " ")
    number = _ROMAN.get(text) or (int(text) if text.isdigit() else None)
    if number is None or not 1 <= number <= 6:
        return UNKNOWN
    return FITZPATRICK_BANDS[(number - 1) // 2]


def _grouping(attribute: str, value: str) -> str:
    if not value:
        return UNKNOWN
    if attribute == "age band":
        return age_band(value)
    if attribute == "Fitzpatrick type":
        return fitzpatrick_band(value)
    text = " ".join(value.lower().replace("_", " ").split()) if attribute != "collection" else value.strip()
    if attribute == "anatomic site":
        return _SITES.get(text, text)
    if attribute == "diagnosis confirmation":
        return _CONFIRMATION.get(text, _CONFIRMATION.get(text.replace(" ", "_"), text))
    if attribute == "sex":
        return {"m": "male", "f": "female"}.get(text, text)
    return text


def image_groups(names: Sequence[str], sources: Sequence[str], metadata: Metadata) -> dict[str, list[str]]:
    """Attribute -> the group of each image (in ``names`` order). ``names``: file names or paths (the ISIC id in the
    name is the key); ``sources``: each image's data source."""
    from melanoma.data.records import acquisition_era  # looked up at call time: the eras are defined in melanoma.data

    ids = [image_id_from_name(Path(name).name) for name in names]
    groups = {attribute: [_grouping(attribute, metadata.of(i).get(name, "")) for i in ids]
              for attribute, name in FROM_METADATA.items()}
    groups["data source"] = [source or UNKNOWN for source in sources]
    groups["acquisition era"] = [acquisition_era(name) for name in names]
    return {attribute: groups[attribute] for attribute in ATTRIBUTES}


def ordered_groups(attribute: str, per_image: np.ndarray) -> list[str]:
    from melanoma.data.records import ERAS

    present = set(per_image.tolist()) - {UNKNOWN}
    fixed = {"age band": AGE_BANDS, "Fitzpatrick type": FITZPATRICK_BANDS, "acquisition era": ERAS}.get(attribute, ())
    counts = {name: int((per_image == name).sum()) for name in present}
    order = [name for name in fixed if name in present]
    order += sorted(present - set(order), key=lambda name: (-counts[name], name))
    return order + ([UNKNOWN] if UNKNOWN in per_image else [])


def sources_by_name(index: "DatasetIndex") -> dict[str, str]:
    """Record path (as written in split.csv and the predictions) -> its data source."""
    from melanoma.core.text import display_name

    return {display_name(record.rel_path): record.source for record in index.records}


def format_ci(interval: dict | None, digits: int = 3) -> str:
    """'0.812 [0.75, 0.86]', '0.812' without an interval, 'n/a' without a value."""
    if not interval or interval.get("value") is None:
        return "n/a"
    value = f"{interval['value']:.{digits}f}"
    if interval.get("low") is None:
        return value
    return f"{value} [{interval['low']:.2f}, {interval['high']:.2f}]"


def subgroup_lines(table: dict) -> list[str]:
    """The table of one split as aligned text lines, for the command line."""
    lines = [f"{'attribute':<22} {'group':<24} {'n':>5} {'mel':>4}  {'balanced acc.':<20} {'melanoma AUC':<20} "
             f"{'sensitivity':<20} {'specificity':<20}"]
    for attribute, part in table.items():
        if not part["groups"]:
            lines.append(f"{attribute:<22} (not recorded for any image)")
        for group in part["groups"]:
            cells = " ".join(f"{format_ci(group[m]):<20}" for m in METRICS)
            small = "  too small to read" if group["too_small"] else ""
            lines.append(f"{attribute:<22} {group['group'][:24]:<24} {group['n']:>5} {group['melanomas']:>4}  "
                         f"{cells}{small}")
    return lines
