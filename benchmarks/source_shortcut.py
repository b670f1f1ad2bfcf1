"""Can preprocessing tell data sources apart? Sharpness of the same picture as each source keeps it.

The course set (isic-9class-180px, 180x180 files) and isic-extra (200x150 and 256x192 files) hold 1,748 pictures under
the same ISIC id. Preprocessed the way the model sees them (resized to the input size, then the model's own input
blur), the two copies of one picture should look alike; if one source's copies are systematically sharper, sharpness
alone tells the model the source, and the source tells it something about the class (sources differ in class mix and
acquisition era). This prints, for each input size and blur sigma, the median ratio of high-frequency energy (mean
absolute Laplacian) of the extra copy to the course copy, by the extra file's size, with its 10th-90th percentiles.
A ratio of 1 means no sharpness cue.

    python benchmarks/source_shortcut.py [--sizes 128,144,180] [--blurs 0,0.8,1.0,1.2] [--pairs 400] [--json FILE]
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from _common import default_sources, print_table, write_results

from melanoma.data.images import decode_image, resize_pixels
from melanoma.data.sources import load_dataset
from melanoma.models.networks import GaussianBlur


def same_picture_pairs(limit: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(course pixels, extra pixels, extra file size) for up to ``limit`` ids held by both sources."""
    index = load_dataset(default_sources())
    by_source: dict[str, dict[str, object]] = defaultdict(dict)
    for record in index.records:
        if record.in_training_pool:
            by_source[record.source].setdefault(record.image_id, record)
    course, extra = (by_source[source["name"]] for source in index.sources)
    shared = sorted(set(course) & set(extra))
    picked = np.random.default_rng(seed).permutation(len(shared))[:limit]
    pairs = []
    for position in picked.tolist():
        image_id = shared[position]
        extra_pixels = decode_image(extra[image_id].path).pixels
        pairs.append((decode_image(course[image_id].path).pixels, extra_pixels,
                      f"{extra_pixels.shape[1]}x{extra_pixels.shape[0]}"))
    return pairs


def high_frequency_energy(pixels: np.ndarray) -> float:
    gray = pixels.astype(np.float32).mean(axis=2)
    laplacian = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    return float(np.abs(laplacian).mean())


def as_model_sees_it(pixels: np.ndarray, size: int, blur: float) -> np.ndarray:
    resized = np.array(resize_pixels(pixels, size))  # a writable copy for torch
    if not blur:
        return resized
    tensor = torch.from_numpy(resized).permute(2, 0, 1)[None].float()
    return GaussianBlur(blur)(tensor)[0].permute(1, 2, 0).numpy()


def sharpness_ratios(pairs, size: int, blur: float) -> dict[str, list[float]]:
    ratios: dict[str, list[float]] = defaultdict(list)
    for course, extra, extra_size in pairs:
        ratios[extra_size].append(high_frequency_energy(as_model_sees_it(extra, size, blur))
                                  / max(high_frequency_energy(as_model_sees_it(course, size, blur)), 1e-6))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,144,180")
    parser.add_argument("--blurs", default="0,0.8,1.0,1.2")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--json")
    args = parser.parse_args()
    pairs = same_picture_pairs(args.pairs)
    rows = []
    for size in map(int, args.sizes.split(",")):
        for blur in map(float, args.blurs.split(",")):
            for extra_size, values in sorted(sharpness_ratios(pairs, size, blur).items()):
                low, median, high = np.percentile(values, [10, 50, 90])
                rows.append({"size": size, "blur": blur, "extra file": extra_size, "pairs": len(values),
                             "median ratio": round(float(median), 3), "p10": round(float(low), 3),
                             "p90": round(float(high), 3)})
    print_table(rows, list(rows[0]))
    write_results("source_shortcut", {"pairs": len(pairs), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
