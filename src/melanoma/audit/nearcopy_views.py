"""Turned copies for the near-copy search: each base's 8 dihedral views (flips, 90-degree turns, transposes) and small
rotations (+-5 and +-10 degrees, cropped to the largest inner square as Augmentor crops), their whole-image hashes,
the all-pairs view search, and rendering one view of a base for :func:`melanoma.audit.nearcopy.verify`.

A copy that was flipped, turned or rotated is not an axis-aligned box of its original, so the box hashes of
:mod:`melanoma.audit.nearcopy` miss it. Here every image's views are hashed (63 DCT sign bits of the intensity and of
the gradient magnitude, on a 32x32 rendering) and compared with every other image's unturned hash; a rotation between
two grid angles is within reach of the nearer one (2.5 degrees flip ~6 of 63 bits). Stage 2 then picks the angle
(grid angle +-3 degrees, by correlation) and verifies the pair as an ordinary copy of the rendered view.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

ANGLES = (0.0, 5.0, -5.0, 10.0, -10.0)       # rotation grid in degrees (positive: counter-clockwise, as PIL)
FINE_ANGLES = np.arange(-3.0, 3.01, 1.0)      # stage 2 tries the grid angle plus these, keeping the best correlation
PREFILTER_BITS = 12                           # intensity word of a view vs the other's unturned hash, of 63 bits
CANDIDATE_SCORE = 36                          # 2 x intensity bits + gradient bits at the best view
_SMALL = 32                                   # side of the rendering that is hashed
# the 8 dihedral maps of normalised coordinates (x, y) -> G @ (x, y); index 0 is the identity
DIHEDRAL = np.array([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],
                     [[-1, 0], [0, 1]], [[1, 0], [0, -1]], [[0, 1], [1, 0]], [[0, -1], [-1, 0]]], np.float32)
VIEWS = [(g, a) for g in range(len(DIHEDRAL)) for a in ANGLES if (g, a) != (0, 0.0)]   # 39 views searched


def view_matrix(g: int, angle: float) -> np.ndarray:
    """(2, 2) map from a view's normalised coordinates to the base's: rotation by ``angle`` with the crop to the
    largest inner square (scale 1 / (cos + sin)), then the dihedral map ``g`` of that rotated view."""
    t = np.deg2rad(angle)
    scale = 1.0 / (np.cos(abs(t)) + np.sin(abs(t)))
    rotation = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]], np.float32) * scale
    return (rotation @ DIHEDRAL[g]).astype(np.float32)


def _dihedral_coefficients(c: np.ndarray) -> np.ndarray:
    """DCT coefficients (..., 8, 8) (rows: vertical frequency) of a square view -> (..., 8 maps, 8, 8): those of the
    view under each DIHEDRAL map (a transpose swaps the frequencies, a flip negates the odd ones on its axis)."""
    odd = (-1.0) ** np.arange(c.shape[-1])
    out = []
    for (a, b), (cc, d) in DIHEDRAL:
        swap = a == 0
        row_sign, col_sign = (b, cc) if swap else (d, a)
        m = np.swapaxes(c, -1, -2) if swap else c
        out.append(m * (odd[:, None] if row_sign < 0 else 1.0) * (odd[None, :] if col_sign < 0 else 1.0))
    return np.stack(out, axis=-3)


def render(bases: np.ndarray, matrices: np.ndarray, size: int = 64, mode: str = "bicubic") -> np.ndarray:
    """Views of bases (n, s, s) under matrices (n, 2, 2), resampled to (n, size, size) float32 in the bases' units."""
    import torch
    F = torch.nn.functional
    x = torch.from_numpy(np.ascontiguousarray(bases, np.float32))[:, None]
    theta = torch.zeros(len(x), 2, 3)
    theta[:, :, :2] = torch.from_numpy(np.ascontiguousarray(matrices, np.float32))
    grid = F.affine_grid(theta, [len(x), 1, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)[:, 0]
    return out.numpy()


def _dct(size: int, k: int = 8) -> np.ndarray:
    t = (np.arange(size) + 0.5) / size
    return np.cos(np.pi * np.arange(k)[:, None] * t[None, :]).astype(np.float32)


_P = _dct(_SMALL)


def _coefficients(views: np.ndarray) -> np.ndarray:
    """(m, s, s) renderings -> (m, 2, 8, 8) DCT coefficients of the intensity and of the gradient magnitude."""
    gy, gx = np.gradient(views, axis=(1, 2))
    return _P @ np.stack([views, np.hypot(gx, gy)], 1) @ _P.T


def _signs(coefficients: np.ndarray) -> np.ndarray:
    """(..., 8, 8) coefficients -> (...) uint64 words of the 63 AC signs."""
    bits = coefficients.reshape(coefficients.shape[:-2] + (-1,))[..., 1:] > 0
    bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (1,), bool)], axis=-1)
    return np.packbits(bits, axis=-1, bitorder="little").view("<u8")[..., 0]


def _halve(bases: np.ndarray) -> np.ndarray:
    b = bases.astype(np.float32)
    return (b[:, ::2, ::2] + b[:, 1::2, ::2] + b[:, ::2, 1::2] + b[:, 1::2, 1::2]) / 4


def view_hashes(bases: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(unturned (n, 2), views (n, len(VIEWS), 2)) uint64 hashes of 64x64 bases: each rotation is rendered once,
    its 8 dihedral maps are derived from its DCT coefficients."""
    n = len(bases)
    plain = np.zeros((n, 2), np.uint64)
    turned = np.zeros((n, len(VIEWS), 2), np.uint64)
    rotations = np.stack([view_matrix(0, a) for a in ANGLES[1:]])
    order = [ANGLES.index(a) * len(DIHEDRAL) + g for g, a in VIEWS]       # VIEWS in (angle, map) layout
    for s in range(0, n, batch):
        small = _halve(bases[s:s + batch])
        m = len(small)
        rotated = render(np.repeat(small, len(rotations), 0), np.tile(rotations, (m, 1, 1)), _SMALL, "bilinear")
        renders = np.concatenate([small[:, None], rotated.reshape(m, len(rotations), _SMALL, _SMALL)], 1)
        coeffs = _coefficients(renders.reshape(-1, _SMALL, _SMALL)).reshape(m, len(ANGLES), 2, 8, 8)
        words = _signs(_dihedral_coefficients(coeffs))                        # (m, angles, 2, maps)
        words = words.transpose(0, 1, 3, 2).reshape(m, -1, 2)                 # (m, angles x maps, 2)
        plain[s:s + m] = words[:, 0]
        turned[s:s + m] = words[:, order]
    return plain, turned


def _keys(plain: np.ndarray, turned: np.ndarray, workers: int, rows: int = 32, cols: int = 512) -> np.ndarray:
    """(len(turned), len(plain)) uint8: intensity-word bits of the best view of row i against plain j."""
    p0, t0 = np.ascontiguousarray(plain[:, 0]), np.ascontiguousarray(turned[:, :, 0])
    out = np.empty((len(t0), len(p0)), np.uint8)

    def block(r: int, c: int) -> None:
        np.min(np.bitwise_count(t0[r:r + rows, None, :] ^ p0[None, c:c + cols, None]), axis=2,
               out=out[r:r + rows, c:c + cols])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda t: block(*t), [(r, c) for r in range(0, len(t0), rows) for c in range(0, len(p0), cols)]))
    return out


def _matches(key: np.ndarray, plain: np.ndarray, turned: np.ndarray, mask: np.ndarray | None):
    hit = key <= PREFILTER_BITS
    if mask is not None:
        hit &= mask
    r, q = np.nonzero(hit)
    d = np.bitwise_count(turned[r] ^ plain[q][:, None, :]).astype(np.int32)      # (k, views, 2)
    d[..., 0] = np.where(d[..., 0] <= PREFILTER_BITS, d[..., 0], 99)
    score = 2 * d[..., 0] + d[..., 1]
    view = np.argmin(score, axis=1)
    keep = score[np.arange(len(r)), view] <= CANDIDATE_SCORE
    return r[keep], q[keep], view[keep]


def turned_candidates(a: np.ndarray, b: np.ndarray | None = None, workers: int = 2):
    """Stage 1 for turned copies among the 64x64 bases ``a`` (pairs i != j) or between ``a`` and ``b``.

    Returns a list of (ref_in_a, ref, query, view): a view ``VIEWS[view]`` of image ``ref`` (in ``a`` when
    ref_in_a, else in ``b``) matches the unturned image ``query`` of the other set (of ``a`` itself for one set).
    """
    plain_a, turned_a = view_hashes(a)
    if b is None:
        key = _keys(plain_a, turned_a, workers)
        np.fill_diagonal(key, 255)
        return [(True, *_matches(key, plain_a, turned_a, None))]
    plain_b, turned_b = view_hashes(b)
    return [(True, *_matches(_keys(plain_b, turned_a, workers), plain_b, turned_a, None)),
            (False, *_matches(_keys(plain_a, turned_b, workers), plain_a, turned_b, None))]


def best_views(ref_bases: np.ndarray, query_bases: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Render each reference's view at the angle (grid angle + FINE_ANGLES) whose 32x32 rendering correlates best
    with its query, at 64x64 (bicubic): uint8 (n, 64, 64) bases to verify against the queries."""
    n = len(views)
    if not n:
        return np.zeros((0, 64, 64), np.uint8)
    small_ref = _halve(ref_bases)
    q = _halve(query_bases).reshape(n, -1)
    q = q - q.mean(1, keepdims=True)
    best, best_corr = np.zeros((n, 2, 2), np.float32), np.full(n, -2.0)
    for delta in FINE_ANGLES:
        mats = np.stack([view_matrix(VIEWS[v][0], VIEWS[v][1] + delta) for v in views])
        r = render(small_ref, mats, _SMALL, "bilinear").reshape(n, -1)
        r = r - r.mean(1, keepdims=True)
        corr = (r * q).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(q, axis=1) + 1e-6)
        better = corr > best_corr
        best[better], best_corr[better] = mats[better], corr[better]
    return np.clip(render(ref_bases, best) + 0.5, 0, 255).astype(np.uint8)
