"""Per-band pixel thresholds that hold a false-alarm budget, from normal strip only.

The camera edges, the strip edges and the centre score differently, so the field of view is cut
into CD bands and each band gets its own threshold. An alarm is a connected region above the
threshold of at least the minimum defect area; the budget (alarms per km of strip) is shared
equally among the bands, and each band takes the lowest candidate threshold whose alarm rate
on the normal run stays within its share.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import cv2
import numpy as np


def band_edges(width: int, n_bands: int) -> list[int]:
    if not 1 <= n_bands <= width:
        raise ValueError(f"n_bands must be in [1, {width}], got {n_bands}")
    return [round(k * width / n_bands) for k in range(n_bands + 1)]


def count_alarms(score_map: np.ndarray, threshold: float, min_area_px: int, lo: int, hi: int) -> int:
    """Regions of the whole map above ``threshold`` with at least ``min_area_px`` pixels whose
    centre column lies in [lo, hi): counted the way the daemon reports defects."""
    hot = (score_map > threshold).astype(np.uint8)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(hot, connectivity=8)
    if n <= 1:
        return 0
    big = stats[1:, cv2.CC_STAT_AREA] >= min_area_px
    cx = centroids[1:, 0]
    return int((big & (cx >= lo) & (cx < hi)).sum())


@dataclass(frozen=True)
class BandCalibration:
    edges: list[int]
    thresholds: list[float]
    alarms_per_km: list[float]  # measured on the calibration run at the chosen thresholds
    quantiles: dict[str, list[float]]  # per band: q0.5, q0.99, q0.999, max of normal pixel scores
    curves: list[list[tuple[float, float]]]  # per band: (threshold, alarms per km)


def calibrate_bands(
    maps: list[np.ndarray],
    *,
    edges: list[int],
    metres: float,
    target_per_km: float,
    min_area_px: int,
    candidates: int = 48,
) -> BandCalibration:
    """``maps``: score maps (valid rows only) of a normal run covering ``metres`` of strip."""
    if not maps or metres <= 0 or target_per_km <= 0:
        raise ValueError("need normal score maps, metres > 0 and a target rate > 0")
    stack = np.concatenate(maps, axis=0)
    share = target_per_km / (len(edges) - 1)
    thresholds, rates, curves = [], [], []
    quantiles: dict[str, list[float]] = {"q0.5": [], "q0.99": [], "q0.999": [], "max": []}
    for e0, e1 in pairwise(edges):
        band = stack[:, e0:e1]
        q = np.quantile(band, [0.5, 0.99, 0.999])
        quantiles["q0.5"].append(float(q[0]))
        quantiles["q0.99"].append(float(q[1]))
        quantiles["q0.999"].append(float(q[2]))
        quantiles["max"].append(float(band.max()))

        def rate_at(t: float, lo: int = e0, hi: int = e1) -> float:
            # Counted per map so that regions never join across two frames.
            return sum(count_alarms(m, t, min_area_px, lo, hi) for m in maps) / metres * 1000.0

        grid = np.unique(np.quantile(band, np.linspace(0.98, 1.0, candidates)))
        curve = [(float(t), rate_at(float(t))) for t in grid]
        k = next((i for i, (_, r) in enumerate(curve) if r <= share), None)
        if k is None:  # even the highest normal score alarms too often: nothing above it seen
            chosen = (float(band.max()) * 1.001, 0.0)
        elif k == 0:
            chosen = curve[0]
        else:
            # Bisect between the last candidate over the share and the first within it, so the
            # chosen threshold is the lowest that holds the share, not a coarse grid point.
            lo_t, hi_t = curve[k - 1][0], curve[k][0]
            chosen = curve[k]
            for _ in range(12):
                mid = 0.5 * (lo_t + hi_t)
                r = rate_at(mid)
                if r <= share:
                    hi_t, chosen = mid, (mid, r)
                else:
                    lo_t = mid
        thresholds.append(chosen[0])
        rates.append(chosen[1])
        curves.append(curve)
    return BandCalibration(edges=edges, thresholds=thresholds, alarms_per_km=rates, quantiles=quantiles, curves=curves)


def plot_curves(cal: BandCalibration, target_share: float, size: tuple[int, int] = (640, 360)) -> np.ndarray:
    """Alarm rate against threshold for every band (log rate), target share dashed."""
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    pts_all = [p for c in cal.curves for p in c]
    if not pts_all:
        return img
    tmin, tmax = min(p[0] for p in pts_all), max(p[0] for p in pts_all)
    rmax = max(1.0, max(p[1] for p in pts_all), target_share)

    def xy(t: float, r: float) -> tuple[int, int]:
        x = int(20 + (t - tmin) / max(tmax - tmin, 1e-9) * (w - 40))
        y = int(h - 20 - np.log1p(r) / np.log1p(rmax) * (h - 40))
        return x, y

    y_share = xy(tmin, target_share)[1]
    for x in range(20, w - 20, 12):
        cv2.line(img, (x, y_share), (x + 6, y_share), (120, 120, 120), 1)
    for k, curve in enumerate(cal.curves):
        level = np.full((1, 1), 40 + 200 * k // max(1, len(cal.curves) - 1), dtype=np.uint8)
        colour = tuple(int(c) for c in cv2.applyColorMap(level, cv2.COLORMAP_JET)[0, 0])
        pts = np.array([xy(t, r) for t, r in curve], np.int32)
        cv2.polylines(img, [pts], False, colour, 2)
        cv2.circle(img, xy(cal.thresholds[k], cal.alarms_per_km[k]), 4, colour, -1)
    return img
