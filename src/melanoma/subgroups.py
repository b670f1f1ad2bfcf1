"""Metrics per subgroup: balanced accuracy, melanoma AUC, sensitivity and specificity at the alert threshold, each
with n and a bootstrap 95 % interval, per age band, sex, anatomic site, Fitzpatrick type, collection, data source,
acquisition era and how the diagnosis was confirmed.

This module decides who is in which group and how the tables read; the numbers come from the project's one
evaluation path (:func:`melanoma.evaluation.subgroup_metrics`, through ``compute_metrics`` and ``bootstrap_ci``).
Groups with fewer than ``MIN_IMAGES`` images or ``MIN_MELANOMAS`` melanomas are marked too small to read, never
hidden; images without the field form an "unknown" group. A field recorded for no image at all has no groups.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from melanoma.data import image_id_from_name
from melanoma.metadata import Metadata

if TYPE_CHECKING:
    from melanoma.data import DatasetIndex

MIN_IMAGES, MIN_MELANOMAS = 30, 5
UNKNOWN = "unknown"
METRICS = ("balanced_accuracy", "melanoma_auc", "melanoma_sensitivity", "melanoma_specificity")
AGE_BANDS = ("<30", "30-49", "50-69", ">=70")
FITZPATRICK_BANDS = ("I-II", "III-IV", "V-VI")
# field of melanoma.metadata -> attribute name; "data source" and "acquisition era" come from the image itself
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
    from melanoma.data import acquisition_era  # looked up at call time: the eras are defined in melanoma.data

    ids = [image_id_from_name(Path(name).name) for name in names]
    groups = {attribute: [_grouping(attribute, metadata.of(i).get(name, "")) for i in ids]
              for attribute, name in FROM_METADATA.items()}
    groups["data source"] = [source or UNKNOWN for source in sources]
    groups["acquisition era"] = [acquisition_era(name) for name in names]
    return {attribute: groups[attribute] for attribute in ATTRIBUTES}


def ordered_groups(attribute: str, per_image: np.ndarray) -> list[str]:
    from melanoma import data

    present = set(per_image.tolist()) - {UNKNOWN}
    fixed = {"age band": AGE_BANDS, "Fitzpatrick type": FITZPATRICK_BANDS,
             "acquisition era": tuple(getattr(data, "ERAS", ()))}.get(attribute, ())
    counts = {name: int((per_image == name).sum()) for name in present}
    order = [name for name in fixed if name in present]
    order += sorted(present - set(order), key=lambda name: (-counts[name], name))
    return order + ([UNKNOWN] if UNKNOWN in per_image else [])


def sources_by_name(index: "DatasetIndex") -> dict[str, str]:
    """Record path (as written in split.csv and the predictions) -> its data source."""
    from melanoma.data import display_name

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
