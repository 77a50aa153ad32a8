"""PatchCore scores as pure functions on arrays (PatchCore, sec. 3.3)."""

from __future__ import annotations

import cv2
import numpy as np


def reweighted_image_score(s_star: float, neighbour_distances: np.ndarray) -> float:
    """Image score s of PatchCore eq. 7.

    ``s_star``: distance of the most anomalous test patch m_test,* to its nearest bank entry m*.
    ``neighbour_distances``: distances of m_test,* to N_b(m*), the b nearest bank entries of m*
    (m* itself among them). s = (1 - exp(s*) / sum_j exp(d_j)) * s*; a test patch whose
    nearest entry sits in a sparse part of the bank is up-weighted. With b = 1 there is no
    neighbourhood and s = s*.
    """
    d = np.asarray(neighbour_distances, dtype=np.float64).ravel()
    if d.size <= 1:
        return float(s_star)
    # exp(s*) / sum exp(d_j) computed as 1 / sum exp(d_j - s*), which cannot overflow.
    weight = 1.0 - 1.0 / float(np.exp(d - s_star).sum())
    return float(weight * s_star)


def gaussian_kernel_size(sigma: float) -> int:
    # 4 sigma on each side, odd (scipy's truncate=4.0, anomalib's kernel size).
    return 2 * int(4.0 * sigma + 0.5) + 1


def anomaly_map(patch_scores: np.ndarray, *, stride: int, out_hw: tuple[int, int], sigma: float) -> np.ndarray:
    """Patch scores (h, w) -> pixel map (H, W) float32.

    Patch (i, j) describes the stride x stride cell at (i * stride, j * stride), so the grid is
    upsampled bilinearly to (h * stride, w * stride) (cell centres on cell centres), rows and
    columns the grid does not cover are filled from the nearest cell, and the map is smoothed
    with a Gaussian of ``sigma`` pixels (PatchCore: sigma = 4).
    """
    if patch_scores.ndim != 2 or stride < 1:
        raise ValueError(f"patch_scores must be 2-D and stride >= 1, got {patch_scores.shape}, {stride}")
    h, w = patch_scores.shape
    H, W = out_hw
    scores = patch_scores.astype(np.float32, copy=False)
    up = cv2.resize(scores, (w * stride, h * stride), interpolation=cv2.INTER_LINEAR)
    up = up[:H, :W]
    if up.shape != (H, W):
        up = cv2.copyMakeBorder(up, 0, H - up.shape[0], 0, W - up.shape[1], cv2.BORDER_REPLICATE)
    if sigma > 0:
        k = gaussian_kernel_size(sigma)
        up = cv2.GaussianBlur(up, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return up


def band_rows(valid_from: int, valid_to: int, *, stride: int, sigma: float, lines: int) -> tuple[int, int]:
    """Patch rows [r0, r1) whose scores reach pixel rows [valid_from, valid_to) of ``anomaly_map``.

    A pixel row depends on the patch rows within the bilinear support (one cell) plus the
    Gaussian's half-width (4 sigma); one more cell covers the edge rows that ``anomaly_map``
    fills from the nearest cell. Rows beyond the band need no kNN search.
    """
    if not 0 <= valid_from < valid_to <= lines:
        raise ValueError(f"valid rows [{valid_from}, {valid_to}) not inside 0..{lines}")
    reach = gaussian_kernel_size(sigma) // 2 if sigma > 0 else 0
    margin = reach + 2 * stride
    r0 = max(0, (valid_from - margin) // stride)
    r1 = min(-(-lines // stride), -(-(valid_to + margin) // stride))
    return r0, r1


def max_window_mean(amap: np.ndarray, window: int) -> float:
    """Maximum over every ``window`` x ``window`` window lying inside ``amap`` of its mean (the
    image score of the multi-scale method, Tsai et al. 2022, with 8 x 8 pixel windows); a map
    thinner than the window uses windows of its short side."""
    h, w = amap.shape
    k = min(window, h, w)
    c = np.zeros((h + 1, w + 1))
    c[1:, 1:] = np.cumsum(np.cumsum(amap, axis=0, dtype=np.float64), axis=1)
    sums = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return float(sums.max() / (k * k))


def patch_mean_map(scores: np.ndarray, *, patch: int, stride: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Patch scores (h, w) of patches at (i * stride, j * stride) of side ``patch`` -> pixel map
    (H, W) float32: each pixel the mean score of the patches covering it (Patch SVDD sec. 3.4).
    Pixels no patch covers (a border narrower than a stride) take the nearest covered value."""
    if patch % stride:
        raise ValueError(f"patch {patch} must be a multiple of stride {stride}")
    m = patch // stride
    s = scores.astype(np.float64)

    def trailing_sum(a: np.ndarray, axis: int) -> np.ndarray:
        # Cell c sums the patches c - m + 1 .. c: those covering the stride-sized cell c; the
        # grid is extended by m - 1 cells so the last patches' far ends are covered too.
        pad = [(0, 0), (0, 0)]
        pad[axis] = (m, m - 1)
        c = np.cumsum(np.pad(a, pad), axis=axis)
        hi = np.take(c, np.arange(m, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - m), axis=axis)
        return hi - lo

    total = trailing_sum(trailing_sum(s, 0), 1)
    count = trailing_sum(trailing_sum(np.ones_like(s), 0), 1)
    cells = (total / count).astype(np.float32)  # (h + m - 1, w + m - 1) cells of stride px
    full = np.repeat(np.repeat(cells, stride, axis=0), stride, axis=1)
    H, W = out_hw
    out = full[:H, :W]
    if out.shape != (H, W):
        out = np.pad(out, ((0, H - out.shape[0]), (0, W - out.shape[1])), mode="edge")
    return np.ascontiguousarray(out)
