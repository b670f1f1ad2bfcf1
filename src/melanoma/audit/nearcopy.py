"""Near-copy detection for dermoscopic images that survives resizing, aspect change (squash to square or 4:3),
crops of up to ~20% of a side, colour shifts (brightness, contrast, hue, white balance, gamma) and JPEG re-encoding.

How it works
------------
Every image is reduced to a 64x64 *base*: the mean of R, G and B, squashed to a square (so any whole-image resize
or aspect change maps to the same base) and histogram-equalised (so any monotone tone change maps to the same
values). A crop of the original is then, in base coordinates, an axis-aligned box ``x0..x1 x y0..y1``.

1. **Box hashes (stage 1, cheap, all pairs).** For 36 boxes (each edge trimmed by 0, 10 or 20%, at most 20% per
   axis) the base and its gradient-magnitude map are projected onto the first 8x8 DCT basis functions *of the box*
   and the signs of the 63 AC coefficients are kept: two 64-bit words per box (intensity, gradient). For every pair
   and direction (one image's whole-image hash against the other's 36 box hashes) numpy XOR + popcount finds the
   box closest in the intensity word; the pair goes on when that is within :data:`PREFILTER_BITS` and
   ``2 x intensity bits + gradient bits`` at that box is within :data:`CANDIDATE_SCORE` (~30k of 36.6M pairs here).
2. **Alignment and verification (stage 2, candidates only).** From that box, Gauss-Newton refines the four box
   edges to maximise the correlation of the two bases (16x16, 32x32), then of their band-pass detail (64x64, pairs
   still in reach); the other image's box is resampled at 64x64 and two similarities measured: ``structure``
   (correlation of the blurred 32x32 bases) and ``detail`` (median over 16x16 tiles of the correlation of band-pass
   detail, DoG 0.7-2 px). Different lesions sharing a layout or a dermoscope frame match in structure, not detail.

Flipped, 90-degree-turned and slightly rotated (+-10 degrees, cropped) copies are searched by
:mod:`~melanoma.audit.nearcopy_views` and verified here. A pair's distance is ``1 - min(structure, detail)``; see
THRESHOLD.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

BASE = 64                   # side of the square base image
HASH_K = 8                  # DCT basis functions per axis: 8x8 - 1 = 63 AC sign bits per channel
TRIMS = (0.0, 0.1, 0.2)     # trims of a box edge (fraction of the side)
MAX_TRIM_PER_AXIS = 0.2     # boxes lose at most this much per axis: 6 ranges per axis, 36 boxes
PREFILTER_BITS = 16         # stage 1a: intensity word (63 bits) within this for some box (no synthetic copy exceeds 16)
CANDIDATE_SCORE = 44        # stage 1b: 2 x intensity bits + gradient bits at that box; ~99.6% of synthetic copies pass
GN_ITERS = (5, 3, 2)        # Gauss-Newton steps at 16x16, 32x32 and (pairs with detail >= REFINE_MIN) 64x64
REFINE_MIN = 0.2            # detail after the 32x32 step from which the 64x64 step is worth its cost
EARLY_REJECT = 0.6          # pairs whose 16x16 correlation after alignment is below this are not refined further
THRESHOLD = 0.25            # real copies reach 0.21 here; other photos of a lesion lie above, other lesions >= 0.34


def _axis_ranges() -> list[tuple[float, float]]:
    return [(lo, 1.0 - hi) for lo in TRIMS for hi in TRIMS if lo + hi <= MAX_TRIM_PER_AXIS + 1e-9]


RANGES = _axis_ranges()                                       # [(0,1), (0,.9), (0,.8), (.1,1), (.1,.9), (.2,1)]
BOXES = np.array([(rx[0], rx[1], ry[0], ry[1]) for ry in RANGES for rx in RANGES], np.float32)  # x0,x1,y0,y1
FULL_BOX = RANGES.index((0.0, 1.0)) * len(RANGES) + RANGES.index((0.0, 1.0))


@dataclass(frozen=True)
class Fingerprints:
    """Fingerprints of n images: ``hashes`` (n, 36, 2) uint64 box hashes; ``bases`` (n, 64, 64) uint8."""

    hashes: np.ndarray
    bases: np.ndarray

    def __len__(self) -> int:
        return len(self.hashes)

    def __getitem__(self, index) -> Fingerprints:
        index = np.atleast_1d(np.asarray(index)) if not isinstance(index, slice) else index
        return Fingerprints(self.hashes[index], self.bases[index])

    @staticmethod
    def concat(parts: Sequence[Fingerprints]) -> Fingerprints:
        return Fingerprints(np.concatenate([p.hashes for p in parts]), np.concatenate([p.bases for p in parts]))


# --------------------------------------------------------------------------------------------------- fingerprints
_LEVELS = 1024    # grey levels used by the histogram equalisation


def _equalise(x: np.ndarray) -> np.ndarray:
    """Histogram equalisation of each image in a stack (n, h, w) to [0, 1]; equal inputs get equal outputs."""
    n = len(x)
    flat = x.reshape(n, -1)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    q = np.minimum(((flat - lo) / np.maximum(hi - lo, 1e-6) * _LEVELS).astype(np.int64), _LEVELS - 1)
    q += np.arange(n)[:, None] * _LEVELS
    hist = np.bincount(q.ravel(), minlength=n * _LEVELS).reshape(n, _LEVELS)
    cdf = np.cumsum(hist, axis=1) - hist / 2.0                      # mid-rank of each level
    return (cdf.ravel()[q] / flat.shape[1]).reshape(x.shape).astype(np.float32)


def _gauss_kernel(sigma: float) -> np.ndarray:
    r = int(3 * sigma + 1)
    t = np.arange(-r, r + 1, dtype=np.float32)
    k = np.exp(-t * t / (2 * sigma * sigma))
    return k / k.sum()


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) Gaussian blur with edge replication, as a matrix: blur(x) = M @ x @ M.T."""
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    m = np.zeros((size, size), np.float32)
    for i in range(size):
        for t, w in enumerate(k):
            m[i, min(max(i + t - r, 0), size - 1)] += w
    return m


def _diff_matrix(size: int) -> np.ndarray:
    """Central difference with edge replication, per pixel: d(x) = D @ x."""
    d = np.zeros((size, size), np.float32)
    for i in range(size):
        d[i, min(i + 1, size - 1)] += 0.5
        d[i, max(i - 1, 0)] -= 0.5
    return d


_B1 = _blur_matrix(BASE, 1.0)
_DB1 = _diff_matrix(BASE) @ _B1


def _gradient_magnitude(x: np.ndarray) -> np.ndarray:
    """Gradient magnitude (Gaussian derivative, sigma 1 pixel) of a stack (n, h, w)."""
    gx = _B1 @ x @ _DB1.T
    gy = _DB1 @ x @ _B1.T
    return np.hypot(gx, gy)


def small_gray(rgb: np.ndarray) -> np.ndarray:
    """Mean of R, G, B squashed to BASE x BASE (area average when shrinking)."""
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 array of shape (h, w, 3), got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    method = Image.Resampling.BOX if min(h, w) >= BASE else Image.Resampling.BILINEAR
    small = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize((BASE, BASE), method)
    return np.asarray(small, np.float32).mean(axis=2)


def _projections(k: int = HASH_K, size: int = BASE, supersample: int = 8) -> np.ndarray:
    """(len(RANGES), k, size): DCT-II basis functions over each range, integrated over each pixel."""
    t = (np.arange(size * supersample) + 0.5) / (size * supersample)
    out = np.zeros((len(RANGES), k, size), np.float32)
    for n, (lo, hi) in enumerate(RANGES):
        u = (t - lo) / (hi - lo)
        basis = np.cos(np.pi * np.arange(k)[:, None] * u[None, :]) * ((u >= 0) & (u < 1))[None, :]
        out[n] = basis.reshape(k, size, supersample).sum(2) / (supersample * size * (hi - lo))
    return out


_PROJ = _projections().reshape(len(RANGES) * HASH_K, BASE)    # (6*8, 64)


def _box_hashes(channels: np.ndarray) -> np.ndarray:
    """channels (n, c, 64, 64) float32 -> (n, 36, c) uint64 sign hashes of the 63 AC DCT coefficients per box."""
    n, c = channels.shape[:2]
    r, k = len(RANGES), HASH_K
    coeffs = _PROJ @ channels.reshape(n * c, BASE, BASE) @ _PROJ.T            # (n*c, r*k, r*k): [ry,u] x [rx,v]
    coeffs = coeffs.reshape(n, c, r, k, r, k).transpose(0, 2, 4, 1, 3, 5)      # (n, ry, rx, c, u, v)
    bits = coeffs.reshape(n, r * r, c, k * k)[..., 1:] > 0                     # drop DC, 63 bits
    bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (1,), bool)], axis=-1)
    return np.packbits(bits, axis=-1, bitorder="little").view("<u8")[..., 0]


def fingerprint_stack(gray: np.ndarray, batch: int = 1024) -> Fingerprints:
    """Fingerprints of a stack of :func:`small_gray` bases (n, 64, 64), computed in batches."""
    if not len(gray):
        return Fingerprints(np.zeros((0, len(BOXES), 2), np.uint64), np.zeros((0, BASE, BASE), np.uint8))
    return Fingerprints.concat([_fingerprint_batch(gray[s:s + batch]) for s in range(0, len(gray), batch)])


def _fingerprint_batch(gray: np.ndarray) -> Fingerprints:
    intensity = _equalise(gray)
    grad = _equalise(_gradient_magnitude(gray))
    hashes = _box_hashes(np.stack([intensity, grad], axis=1))
    return Fingerprints(hashes, np.minimum(intensity * 256, 255).astype(np.uint8))


def fingerprint(rgb: np.ndarray) -> Fingerprints:
    """Fingerprint of one RGB uint8 array (any size and aspect), as a length-1 :class:`Fingerprints`."""
    return _fingerprint_batch(small_gray(rgb)[None])


def fingerprint_many(images: Iterable[np.ndarray], workers: int = 2, batch: int = 1024) -> Fingerprints:
    """Fingerprints of many RGB uint8 arrays: resizing in a thread pool, everything else batched."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        gray = list(pool.map(small_gray, images))
    return fingerprint_stack(np.stack(gray) if gray else np.zeros((0, BASE, BASE), np.float32), batch)


# ------------------------------------------------------------------------------------------- stage 1: box hashes
_BOX_INDEX = np.arange(len(BOXES), dtype=np.uint16)


def _prefilter_block(full0: np.ndarray, boxes0: np.ndarray, out: np.ndarray) -> None:
    """out[r, c] = min over boxes k of (popcount(full0[r] ^ boxes0[c, k]) * 64 + k): distance and argmin at once."""
    key = np.bitwise_count(full0[:, None, None] ^ boxes0[None, :, :]).astype(np.uint16)
    key <<= 6
    key |= _BOX_INDEX
    np.min(key, axis=2, out=out)


def _intensity_keys(a: Fingerprints, b: Fingerprints, workers: int, rows: int = 32, cols: int = 256) -> np.ndarray:
    """(len(a), len(b)) uint16 keys: 64 * (intensity-word distance of a's whole image to b's best box) + that box."""
    full0 = np.ascontiguousarray(a.hashes[:, FULL_BOX, 0])
    boxes0 = np.ascontiguousarray(b.hashes[:, :, 0])
    out = np.empty((len(a), len(b)), np.uint16)
    tasks = [(r, c) for r in range(0, len(a), rows) for c in range(0, len(b), cols)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda t: _prefilter_block(full0[t[0]:t[0] + rows], boxes0[t[1]:t[1] + cols],
                                                 out[t[0]:t[0] + rows, t[1]:t[1] + cols]), tasks))
    return out


def box_score(a: Fingerprints, b: Fingerprints, i: np.ndarray, j: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Stage-1 score of pairs: 2 x intensity-word bits + gradient-word bits between a_i's whole-image hash and b_j's
    hash of box ``box`` (the intensity word is the more robust of the two, so it counts double)."""
    d = np.bitwise_count(a.hashes[i, FULL_BOX] ^ b.hashes[j, box]).astype(np.int32)
    return 2 * d[:, 0] + d[:, 1]


@dataclass(frozen=True)
class Candidates:
    """Stage-1 candidate pairs: indices into a and b, box-hash distances and starting boxes per direction."""

    i: np.ndarray
    j: np.ndarray
    score: np.ndarray       # min of the two directions (2 x intensity bits + gradient bits, 0..189)
    score_ab: np.ndarray    # a's whole image vs b's best box (a is a crop of b); 999 when prefiltered out
    box_ab: np.ndarray
    score_ba: np.ndarray    # b's whole image vs a's best box
    box_ba: np.ndarray

    def take(self, keep: np.ndarray) -> Candidates:
        return Candidates(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))


def candidate_pairs(a: Fingerprints, b: Fingerprints | None = None, max_score: int = CANDIDATE_SCORE,
                    prefilter_bits: int = PREFILTER_BITS, workers: int = 2) -> Candidates:
    """Stage 1 over all pairs of one set (i < j, when ``b`` is None) or of two sets (every i, j).

    For each direction (one image's whole-image hash against the other's 36 box hashes) the box with the smallest
    intensity-word distance is found for every pair; a pair is a candidate when, in either direction, that distance
    is within ``prefilter_bits`` (of 63) and the score at that box (:func:`box_score`) is within ``max_score``.
    """
    one_set = b is None
    b = a if one_set else b
    key_ab = _intensity_keys(a, b, workers)
    key_ba = key_ab.T if one_set else _intensity_keys(b, a, workers).T
    limit = (prefilter_bits + 1) << 6
    mask = (key_ab < limit) | (key_ba < limit)
    if one_set:
        mask &= np.triu(np.ones_like(mask), k=1)
    i, j = np.nonzero(mask)
    del mask
    box_ab = (key_ab[i, j] & 63).astype(np.uint8)
    box_ba = (key_ba[i, j] & 63).astype(np.uint8)
    score_ab = np.where(key_ab[i, j] < limit, box_score(a, b, i, j, box_ab), 999)
    score_ba = np.where(key_ba[i, j] < limit, box_score(b, a, j, i, box_ba), 999)
    best = np.minimum(score_ab, score_ba)
    keep = best <= max_score
    return Candidates(i[keep], j[keep], best[keep], score_ab[keep], box_ab[keep], score_ba[keep], box_ba[keep])


# ---------------------------------------------------------------------------------- stage 2: align and verify
def _area_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) area-averaging resampling matrix."""
    m = np.zeros((dst, src), np.float32)
    for i in range(dst):
        lo, hi = i * src / dst, (i + 1) * src / dst
        for p in range(int(np.floor(lo)), int(np.ceil(hi))):
            m[i, p] = max(0.0, min(hi, p + 1) - max(lo, p))
    return m / m.sum(1, keepdims=True)


@dataclass(frozen=True)
class _Pyramid:
    """Per-image arrays for alignment (torch tensors, n images)."""

    q16: object      # (n,16,16) blurred, as the image being located
    q32: object      # (n,32,32)
    r20: object      # (n,3,20,20) blurred + d/dx + d/dy (per unit of normalised coordinate), as the reference
    r40: object      # (n,3,40,40)
    dog: object      # (n,1,64,64) band-pass detail of the base (difference of Gaussians, sigma 0.7 and 2.0)
    fine: np.ndarray  # (n,64,64) the band-pass detail as numpy, for the last alignment step (64x64, on detail)


def _pyramid(bases: np.ndarray) -> _Pyramid:
    import torch
    x = bases.astype(np.float32) / 255.0

    def level(size: int, sigma: float) -> np.ndarray:
        m = _blur_matrix(size, sigma) @ _area_matrix(BASE, size)
        return m @ x @ m.T

    b07, b20 = _blur_matrix(BASE, 0.7), _blur_matrix(BASE, 2.0)
    dog = (b07 @ x @ b07.T - b20 @ x @ b20.T)[:, None]
    t = torch.from_numpy
    return _Pyramid(q16=t(level(16, 1.0)), q32=t(level(32, 1.0)), r20=t(_with_grads(level(20, 1.0))),
                    r40=t(_with_grads(level(40, 1.0))), dog=t(np.ascontiguousarray(dog)),
                    fine=np.ascontiguousarray(dog[:, 0]))


def _with_grads(t: np.ndarray) -> np.ndarray:
    """Stack an image batch (n, s, s) with its d/dx and d/dy per unit of the normalised coordinate: (n, 3, s, s)."""
    d = _diff_matrix(t.shape[-1]) * t.shape[-1]
    return np.stack([t, t @ d.T, d @ t], axis=1)


def _grid(theta, size: int):
    import torch
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x = theta[:, 0:1] + (theta[:, 1:2] - theta[:, 0:1]) * u[None]
    y = theta[:, 2:3] + (theta[:, 3:4] - theta[:, 2:3]) * u[None]
    gx = (2 * x - 1)[:, None, :].expand(-1, size, -1)
    gy = (2 * y - 1)[:, :, None].expand(-1, -1, size)
    return torch.stack([gx, gy], -1)


def _gauss_newton(q, r, theta, iters: int):
    """Refine boxes theta (n, 4: x0, x1, y0, y1 in r) so that r's box, resampled to q's size, correlates best with q.

    q: (n, s, s); r: (n, 3, h, w) image, d/dx, d/dy. Model q ~ alpha * warp(r, theta) + beta; each step solves
    the 4x4 normal equations of the linearised warp, the sums reduced along rows/columns (the Jacobian of an
    axis-aligned box is separable). Returns the refined theta and the correlation at the last step.
    """
    import torch
    F = torch.nn.functional
    size = q.shape[-1]
    npix = size * size
    qc = q - q.mean((1, 2), keepdim=True)
    qn = qc.flatten(1).norm(dim=1)
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    basis = torch.stack([1 - u, u], 1)                                  # (s, 2): d x / d (x0, x1) per column
    outer = basis[:, :, None] * basis[:, None, :]                       # (s, 2, 2)
    ridge = 1e-4 * torch.eye(4)
    corr = torch.zeros(len(q))
    for _ in range(iters):
        smp = F.grid_sample(r, _grid(theta, size), mode="bilinear", padding_mode="border", align_corners=False)
        w, wx, wy = smp[:, 0], smp[:, 1], smp[:, 2]
        wm = w - w.mean((1, 2), keepdim=True)
        cov = (qc * wm).sum((1, 2))
        var = (wm * wm).sum((1, 2)).clamp_min(1e-8)
        corr = cov / (var.sqrt() * qn + 1e-8)
        alpha = (cov / var).clamp_min(1e-3)
        res = qc / alpha[:, None, None] - wm
        mx = wx.sum(1) @ basis / npix                                   # (n, 2) Jacobian column means
        my = wy.sum(2) @ basis / npix
        jtj = torch.zeros(len(q), 4, 4)
        jtj[:, :2, :2] = torch.einsum("nc,cab->nab", (wx * wx).sum(1), outer)
        jtj[:, 2:, 2:] = torch.einsum("nr,rab->nab", (wy * wy).sum(2), outer)
        cross = basis.T @ ((wx * wy).transpose(1, 2) @ basis)          # (n, 2 x-params, 2 y-params)
        jtj[:, :2, 2:] = cross
        jtj[:, 2:, :2] = cross.transpose(1, 2)
        m = torch.cat([mx, my], 1)
        jtj -= npix * m[:, :, None] * m[:, None, :]
        jtr = torch.cat([(wx * res).sum(1) @ basis, (wy * res).sum(2) @ basis], 1)
        delta = torch.linalg.solve(jtj + ridge, jtr)
        theta = theta + delta.clamp(-0.05, 0.05)
        theta[:, 1] = torch.maximum(theta[:, 1], theta[:, 0] + 0.4)
        theta[:, 3] = torch.maximum(theta[:, 3], theta[:, 2] + 0.4)
    return theta, corr


def _patch_ncc_median(a, b, patch: int = 16):
    """Median over non-overlapping patch x patch tiles of the tile-wise correlation, (n,)."""
    n, h, w = a.shape
    def tiles(t):
        t = t.reshape(n, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4).reshape(n, -1, patch * patch)
        return t - t.mean(2, keepdim=True)
    ta, tb = tiles(a), tiles(b)
    c = (ta * tb).sum(2) / (ta.norm(dim=2) * tb.norm(dim=2) + 1e-6)
    return c.median(dim=1).values


def _verify_chunk(qp: _Pyramid, rp: _Pyramid, qi: np.ndarray, ri: np.ndarray, start: np.ndarray):
    """Align and score one chunk of (located image qi, reference ri, starting box index) triples."""
    import torch
    F = torch.nn.functional
    n = len(qi)
    structure = np.full(n, -1.0, np.float32)
    detail = np.full(n, -1.0, np.float32)
    theta_out = np.zeros((n, 4), np.float32)
    qs, rs = torch.from_numpy(qi.astype(np.int64)), torch.from_numpy(ri.astype(np.int64))
    theta = torch.from_numpy(BOXES[start].copy())
    theta, coarse = _gauss_newton(qp.q16[qs], rp.r20[rs], theta, iters=GN_ITERS[0])
    structure[:] = coarse.numpy()
    go = (coarse >= EARLY_REJECT).numpy()
    if go.any():
        sel = torch.from_numpy(np.nonzero(go)[0])
        theta2, st = _gauss_newton(qp.q32[qs[sel]], rp.r40[rs[sel]], theta[sel], iters=GN_ITERS[1])
        w = F.grid_sample(rp.dog[rs[sel]], _grid(theta2, BASE), mode="bilinear", padding_mode="border",
                          align_corners=False)
        de = _patch_ncc_median(qp.dog[qs[sel]][:, 0], w[:, 0])
        # last step at 64x64, on the band-pass detail itself, for pairs that could still pass: a 1% error of the
        # box edges costs much detail, and aligning the detail is insensitive to what a colour shift does to the tones
        fine = (de >= REFINE_MIN).numpy()
        if fine.any():
            fq, fr = qs[sel][fine].numpy(), rs[sel][fine].numpy()
            uniq, inverse = np.unique(fr, return_inverse=True)
            r64 = torch.from_numpy(_with_grads(rp.fine[uniq]))[torch.from_numpy(inverse)]
            theta3, _ = _gauss_newton(torch.from_numpy(qp.fine[fq]), r64, theta2[fine], iters=GN_ITERS[2])
            w3 = F.grid_sample(rp.dog[torch.from_numpy(fr)], _grid(theta3, BASE), mode="bilinear",
                               padding_mode="border", align_corners=False)
            de3 = _patch_ncc_median(qp.dog[torch.from_numpy(fq)][:, 0], w3[:, 0])
            better = de3 > de[fine]
            idx = torch.from_numpy(np.nonzero(fine)[0])[better]
            de[idx] = de3[better]
            theta2[idx] = theta3[better]
        structure[go] = st.numpy()
        detail[go] = de.numpy()
        theta_out[go] = theta2.numpy()
    return structure, detail, theta_out


def verify(a: Fingerprints, b: Fingerprints, cand: Candidates, chunk: int = 1024, both_within: int = 8,
           workers: int = 2):
    """Stage 2: align each candidate pair and return (structure, detail, boxes) arrays.

    ``structure``: correlation of the blurred 32x32 bases after alignment; ``detail``: median over 16x16 tiles of
    the correlation of band-pass detail at 64x64 (-1 when the pair was rejected after the 16x16 alignment). Each
    direction (a inside b, or b inside a) starts from its best stage-1 box; both directions are tried when their
    stage-1 scores are within ``both_within`` and the one with the better detail wins. ``boxes`` rows:
    direction (0: a is located in b, 1: b in a), x0, x1, y0, y1 of the located box in the other image.
    """
    import torch
    pa = _pyramid(a.bases)
    pb = pa if b is a else _pyramid(b.bases)
    n = len(cand.i)
    structure = np.full(n, -1.0, np.float32)
    detail = np.full(n, -1.0, np.float32)
    boxes = np.zeros((n, 5), np.float32)
    jobs = []
    for direction in (0, 1):
        if direction == 0:
            todo = np.nonzero(cand.score_ab <= cand.score_ba + both_within)[0]
            qp, rp, qi, ri, start = pa, pb, cand.i, cand.j, cand.box_ab
        else:
            todo = np.nonzero(cand.score_ba <= cand.score_ab + both_within)[0]
            qp, rp, qi, ri, start = pb, pa, cand.j, cand.i, cand.box_ba
        for s in range(0, len(todo), chunk):
            k = todo[s:s + chunk]
            jobs.append((direction, k, qp, rp, qi[k], ri[k], start[k]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # one intra-op thread per worker: far faster than torch's pool on small tensors
    try:
        with torch.no_grad(), ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda job: _verify_chunk(*job[2:]), jobs))
    finally:
        torch.set_num_threads(threads)
    for (direction, k, *_), (st, de, th) in zip(jobs, results):
        better = (de > detail[k]) | ((de == detail[k]) & (st > structure[k]))
        kb = k[better]
        structure[kb], detail[kb] = st[better], de[better]
        boxes[kb, 0] = direction
        boxes[kb, 1:] = th[better]
    return structure, detail, boxes


def distance(structure: np.ndarray, detail: np.ndarray) -> np.ndarray:
    """Pair distance in [0, 2]: 1 - min(structure, detail)."""
    return 1.0 - np.minimum(structure, detail)


def near_copies(a: Fingerprints, b: Fingerprints | None = None, threshold: float = THRESHOLD, max_score: int =
                CANDIDATE_SCORE, workers: int = 2, turned: bool = True) -> list[tuple[int, int, float]]:
    """All near-copy pairs (i, j, distance) within one set (i < j) or between two sets, with distance <= threshold.

    ``a``/``b`` come from :func:`fingerprint_many`; i indexes ``a``, j indexes ``b`` (or ``a`` again). With
    ``turned``, flipped, 90-degree-turned and +-10-degree-rotated-and-cropped copies too (nearcopy_views).
    """
    cand = candidate_pairs(a, b, max_score=max_score, workers=workers)
    found: dict[tuple[int, int], float] = {}
    if len(cand.i):
        dist = distance(*verify(a, a if b is None else b, cand, workers=workers)[:2])
        found = {(int(cand.i[k]), int(cand.j[k])): float(dist[k]) for k in np.nonzero(dist <= threshold)[0]}
    if turned:
        found |= {pair: d for pair, d in turned_pairs(a, b, found, workers).items() if d <= threshold}  # new pairs only
    return [(i, j, d) for (i, j), d in sorted(found.items())]


def turned_pairs(a: Fingerprints, b: Fingerprints | None, found: dict, workers: int) -> dict[tuple[int, int], float]:
    """Distances of the turned-copy candidates (melanoma.audit.nearcopy_views) not in ``found``, keyed as near_copies:
    the unturned image is aligned within the rendered view of the other (each way that stage 1 matched)."""
    from melanoma.audit import nearcopy_views as views
    out: dict[tuple[int, int], float] = {}
    for ref_in_a, ref, query, view in views.turned_candidates(a.bases, None if b is None else b.bases, workers):
        ref_set, query_set = (a, a if b is None else b) if ref_in_a else (b, a)
        pairs = [(int(r), int(q)) if ref_in_a else (int(q), int(r)) for r, q in zip(ref, query)]
        pairs = [(min(p), max(p)) for p in pairs] if b is None else pairs
        todo = np.array([k for k, p in enumerate(pairs) if p not in found], np.int64)   # both ways when both match
        if not len(todo):
            continue
        rendered = views.best_views(ref_set.bases[ref[todo]], query_set.bases[query[todo]], view[todo])
        k, never = np.arange(len(todo)), np.full(len(todo), 999, np.int32)
        box, empty = np.full(len(todo), FULL_BOX, np.uint8), np.zeros((len(todo), len(BOXES), 2), np.uint64)
        st, de, _ = verify(Fingerprints(empty, query_set.bases[query[todo]]), Fingerprints(empty, rendered),
                           Candidates(k, k, 0 * never, 0 * never, box, never, box), workers=workers)
        for t, d in zip(todo, distance(st, de)):
            out[pairs[t]] = min(float(d), out.get(pairs[t], 2.0))
    return out
