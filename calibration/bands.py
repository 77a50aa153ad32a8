"""Per-band pixel thresholds that hold a false-alarm budget, from normal strip only.

The camera edges, the strip edges and the centre score differently, so the field of view is cut
into CD bands and each band gets its own threshold. An alarm is a defect region as the daemon
forms it (``pipeline.postprocess.regions``: hot pixels above their own column's threshold,
8-connected, at least the minimum area, in the band of its centroid column); the budget
(alarms per km of strip) is shared equally among the bands, and each band takes the lowest
candidate threshold whose alarm rate on the normal run stays within its share.

A region can cross a band edge, so a band's rate depends on its neighbours' thresholds too.
The first pass, with the neighbours not known yet, holds the whole width to the candidate;
each further pass searches every band again with the other bands at their last thresholds,
so that the regions counted are the ones the daemon will form with the final thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from pipeline.postprocess.regions import band_of, region_columns


def band_edges(width: int, n_bands: int) -> list[int]:
    if not 1 <= n_bands <= width:
        raise ValueError(f"n_bands must be in [1, {width}], got {n_bands}")
    return [round(k * width / n_bands) for k in range(n_bands + 1)]


def count_alarms(score_map: np.ndarray, threshold: float | np.ndarray, min_area_px: int, lo: int, hi: int) -> int:
    """Regions of the map (``find_regions``: ``threshold`` one value or one per column) whose
    centroid column lies in [lo, hi): counted the way the daemon reports defects."""
    cols = region_columns(score_map, threshold=threshold, min_area_px=min_area_px)
    return int(((cols >= lo) & (cols < hi)).sum())


@dataclass(frozen=True)
class BandCalibration:
    edges: list[int]
    thresholds: list[float]
    alarms_per_km: list[float]  # measured on the calibration run at the chosen thresholds
    quantiles: dict[str, list[float]]  # per band: q0.5, q0.99, q0.999, max of normal pixel scores
    curves: list[list[tuple[float, float]]]  # per band, last pass: (threshold, alarms per km)


def calibrate_bands(
    maps: list[np.ndarray],
    *,
    edges: list[int],
    metres: float,
    target_per_km: float,
    min_area_px: int,
    candidates: int = 48,
    passes: int = 2,
) -> BandCalibration:
    """``maps``: score maps (valid rows only) of a normal run covering ``metres`` of strip."""
    if not maps or metres <= 0 or target_per_km <= 0:
        raise ValueError("need normal score maps, metres > 0 and a target rate > 0")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    stack = np.concatenate(maps, axis=0)
    n_bands = len(edges) - 1
    share = target_per_km / n_bands
    quantiles: dict[str, list[float]] = {"q0.5": [], "q0.99": [], "q0.999": [], "max": []}
    grids = []
    for e0, e1 in pairwise(edges):
        band = stack[:, e0:e1]
        q = np.quantile(band, [0.5, 0.99, 0.999])
        quantiles["q0.5"].append(float(q[0]))
        quantiles["q0.99"].append(float(q[1]))
        quantiles["q0.999"].append(float(q[2]))
        quantiles["max"].append(float(band.max()))
        grids.append(np.unique(np.quantile(band, np.linspace(0.98, 1.0, candidates))))
    thresholds: list[float] = []
    curves: list[list[tuple[float, float]]] = [[] for _ in range(n_bands)]
    for p in range(passes):
        # Pass 0: the neighbours are not known yet. Later: every band at its last threshold.
        base = None if p == 0 else np.repeat(np.asarray(thresholds, np.float32), np.diff(edges))
        for k, (e0, e1) in enumerate(pairwise(edges)):

            def rate_at(t: float, lo: int = e0, hi: int = e1, base: np.ndarray | None = base) -> float:
                cols = np.full(edges[-1], t, np.float32) if base is None else base.copy()
                cols[lo:hi] = t
                # Counted per map so that regions never join across two frames.
                return sum(count_alarms(m, cols, min_area_px, lo, hi) for m in maps) / metres * 1000.0

            curve = [(float(t), rate_at(float(t))) for t in grids[k]]
            i = next((j for j, (_, r) in enumerate(curve) if r <= share), None)
            if i is None:  # even the highest normal score alarms too often: nothing above it seen
                chosen = (quantiles["max"][k] * 1.001, 0.0)
            elif i == 0:
                chosen = curve[0]
            else:
                # Bisect between the last candidate over the share and the first within it, so the
                # chosen threshold is the lowest that holds the share, not a coarse grid point.
                lo_t, hi_t = curve[i - 1][0], curve[i][0]
                chosen = curve[i]
                for _ in range(12):
                    mid = 0.5 * (lo_t + hi_t)
                    r = rate_at(mid)
                    if r <= share:
                        hi_t, chosen = mid, (mid, r)
                    else:
                        lo_t = mid
            if p == 0:
                thresholds.append(chosen[0])
            else:
                thresholds[k] = chosen[0]
            curves[k] = curve
    # The rates at the final thresholds, all bands together, as the daemon will count them.
    cols = np.repeat(np.asarray(thresholds, np.float32), np.diff(edges))
    counts = np.zeros(n_bands, np.int64)
    for m in maps:
        for c in region_columns(m, threshold=cols, min_area_px=min_area_px):
            counts[band_of(int(c), edges)] += 1
    rates = [float(c) / metres * 1000.0 for c in counts]
    return BandCalibration(edges=edges, thresholds=thresholds, alarms_per_km=rates, quantiles=quantiles, curves=curves)
