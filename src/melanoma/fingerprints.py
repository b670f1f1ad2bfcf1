"""Telling copies apart: SHA-256 of the file bytes and of the decoded pixels (re-saved copies), a perceptual hash for
near-copies, the all-pairs near-copy search, and the union-find that groups copies.

Near-duplicates use a 256-bit perceptual hash (pHash, ``hash_size=16``). On the shared ISIC 9-class data the
Hamming distances between different files fall into two clean groups: re-encoded copies of one photo at 0-4 bits,
and every other pair at 26 bits or more (the closest are other photos of the *same* lesion). JPEG quality 50 moves a
hash by at most 14 bits, a resize by 6, a colour or tint change by 10, so the default threshold of 20 bits catches
copies without flagging distinct photos (``tests/test_audit_realdata.py`` checks this on the real data).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import imagehash
import numpy as np
from PIL import Image

from melanoma.data import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageRecord, decode_image


@dataclass
class Fingerprint:
    file_sha256: str
    pixel_sha256: str
    phash: np.ndarray             # packed 256-bit hash as 4 x uint64
    size: tuple[int, int]
    mode: str
    notes: list[str]


def fingerprint(record: ImageRecord, hash_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS) -> Fingerprint:
    data = record.path.read_bytes()
    decoded = decode_image(data if data else record.path, max_pixels=max_pixels, name=record.rel_path)
    pixels = decoded.pixels
    pixel_digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    bits = imagehash.phash(Image.fromarray(pixels), hash_size=hash_size).hash.flatten()
    return Fingerprint(file_sha256=hashlib.sha256(data).hexdigest(), pixel_sha256=pixel_digest,
                       phash=np.packbits(bits).view(np.uint64), size=decoded.original_size,
                       mode=decoded.original_mode, notes=decoded.notes)


def fingerprint_all(records: Sequence[ImageRecord], hash_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS,
                    workers: int = 4, progress: Callable[[Iterable, int], Iterable] | None = None):
    """Fingerprint every record in a thread pool; returns ({index: Fingerprint}, {index: error message})."""
    def one(index: int):
        try:
            return index, fingerprint(records[index], hash_size, max_pixels), None
        except ImageDecodeError as exc:
            return index, None, str(exc)
        except OSError as exc:
            return index, None, f"{records[index].rel_path}: cannot read file ({exc.strerror or exc})"

    prints: dict[int, Fingerprint] = {}
    errors: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, range(len(records)))
        for index, print_, error in (progress(results, len(records)) if progress else results):
            if error is None:
                prints[index] = print_
            else:
                errors[index] = error
    return prints, errors


def near_pairs(hashes: np.ndarray, threshold: int, chunk: int = 512) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= threshold, in chunks to bound memory."""
    pairs = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start:start + chunk]
        distances = np.bitwise_count(block[:, None, :] ^ hashes[None, :, :]).sum(axis=2)
        rows, cols = np.nonzero(distances <= threshold)
        for row, col in zip(rows.tolist(), cols.tolist()):
            i = start + row
            if i < col:
                pairs.append((i, col, int(distances[row, col])))
    return pairs


class UnionFind:
    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)

    def components(self, members: Iterable[int]) -> list[list[int]]:
        groups: dict[int, list[int]] = defaultdict(list)
        for item in members:
            groups[self.find(item)].append(item)
        return [sorted(group) for group in groups.values()]
