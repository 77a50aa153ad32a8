"""The one rule for which pixels form one defect region (pure numpy and OpenCV).

- A pixel is hot when its score is strictly above the threshold of its own column (one value
  for the whole map, or one per column for CD bands).
- Hot pixels that touch, sides or corners (8-connectivity), form one region; a region may
  cross a band edge, each of its pixels held to its own column's threshold.
- A region counts only with at least ``min_area_px`` pixels.
- It belongs to the CD band of its centroid column (``Region.column``), and its threshold is
  that column's.
- Along the strip, a frame reports a region only when its first row lies in the frame's valid
  rows, so a region in the overlap of two frames is reported once.

The daemon's defects (``defects.extract_defects``), the per-band threshold calibration
(``calibration.bands``) and the labelled report (``calibration.thresholds``) all call
``find_regions``; nothing else decides it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CONNECTIVITY = 8


@dataclass(frozen=True)
class Region:
    """One region of a score map, in map pixels (x across, y along the strip)."""

    box: tuple[int, int, int, int]  # x, y, w, h of the bounding box
    area_px: int
    centroid: tuple[float, float]  # x, y
    column: int  # the centroid's column: it decides the region's CD band and threshold
    peak: float  # highest score of its pixels
    mean: float  # mean score of its pixels
    threshold: float  # the threshold of ``column``


@dataclass(frozen=True)
class Regions:
    """``labels``: int32 (lines, width), 0 where no counted region lies, k on ``regions[k - 1]``."""

    labels: np.ndarray
    regions: tuple[Region, ...]


def column_thresholds(threshold: float | np.ndarray, width: int) -> np.ndarray:
    """One threshold per column, float32 (width,), from one value or one per column."""
    t = np.asarray(threshold, dtype=np.float32)
    if t.ndim > 1 or (t.ndim == 1 and t.size != width):
        raise ValueError(f"threshold must be one value or one per column ({width}), got shape {t.shape}")
    return np.broadcast_to(t, (width,))


def find_regions(
    score_map: np.ndarray,
    *,
    threshold: float | np.ndarray,
    min_area_px: int,
    first_rows: tuple[int, int] | None = None,
) -> Regions:
    """The regions of ``score_map`` (lines, width) by the module's rule, in label order.

    ``threshold``: one value or float (width,); ``first_rows``: (from, to), keep only regions
    whose first row lies in [from, to) (a frame's valid rows); None keeps all rows.
    """
    per_col = column_thresholds(threshold, score_map.shape[1])
    n, crop, row0, stats, centroids, keep = _components(score_map, per_col, min_area_px, first_rows)
    # The label image holds the counted regions only, numbered 1..len(keep).
    labels = np.zeros(score_map.shape, np.int32)
    if keep.size == 0:
        return Regions(labels=labels, regions=())
    lut = np.zeros(n, np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    rows = lut[crop]
    labels[row0 : row0 + rows.shape[0]] = rows
    on = rows > 0
    lab, vals = rows[on], score_map[row0 : row0 + rows.shape[0]][on].astype(np.float64)
    total = np.bincount(lab, weights=vals, minlength=keep.size + 1)[1:]
    peak = np.full(keep.size + 1, -np.inf)
    np.maximum.at(peak, lab, vals)
    out = []
    for i, k in enumerate(keep):
        x, y, w, h, area = (int(v) for v in stats[k])
        cx, cy = float(centroids[k][0]), float(centroids[k][1])
        col = min(int(cx), per_col.size - 1)
        out.append(
            Region(
                box=(x, y, w, h),
                area_px=area,
                centroid=(cx, cy),
                column=col,
                peak=float(peak[i + 1]),
                mean=float(total[i] / area),
                threshold=float(per_col[col]),
            )
        )
    return Regions(labels=labels, regions=tuple(out))


def region_columns(
    score_map: np.ndarray,
    *,
    threshold: float | np.ndarray,
    min_area_px: int,
    first_rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """``Region.column`` of every region ``find_regions`` returns, int (n,), without the pixel
    statistics: for counting regions by band, thousands of times in a calibration."""
    per_col = column_thresholds(threshold, score_map.shape[1])
    _, _, _, _, centroids, keep = _components(score_map, per_col, min_area_px, first_rows)
    return np.minimum(centroids[keep, 0].astype(np.int64), per_col.size - 1)


def _components(
    score_map: np.ndarray, per_col: np.ndarray, min_area_px: int, first_rows: tuple[int, int] | None
) -> tuple[int, np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    """The rule itself: OpenCV's connected components of the hot pixels, labelled on the rows
    from the first to the last that hold any (a normal frame has few, and labelling a whole
    frame costs more than the rest of the rule): (label count, labels of those rows, their
    first row, stats and centroids in map coordinates, the labels of the regions that count)."""
    if score_map.ndim != 2:
        raise ValueError(f"score map must be (lines, width), got {score_map.shape}")
    if min_area_px < 1:
        raise ValueError(f"min_area_px must be >= 1, got {min_area_px}")
    hot = (score_map > per_col[None, :]).astype(np.uint8)
    rows = np.flatnonzero(hot.any(axis=1))
    if rows.size == 0:
        nothing = np.zeros(0, np.int64)
        return 1, np.zeros((0, score_map.shape[1]), np.int32), 0, np.zeros((1, 5), np.int32), np.zeros((1, 2)), nothing
    row0, row1 = int(rows[0]), int(rows[-1]) + 1
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(hot[row0:row1], connectivity=CONNECTIVITY)
    stats[:, cv2.CC_STAT_TOP] += row0
    centroids[:, 1] += row0
    keep = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_area_px) + 1
    if first_rows is not None:
        top = stats[keep, cv2.CC_STAT_TOP]
        keep = keep[(top >= first_rows[0]) & (top < first_rows[1])]
    return n, labels, row0, stats, centroids, keep


def band_of(column: int, edges: list[int]) -> int:
    """Index of the CD band [edges[k], edges[k + 1]) that holds ``column``."""
    if not edges[0] <= column < edges[-1]:
        raise ValueError(f"column {column} outside the bands [{edges[0]}, {edges[-1]})")
    return int(np.searchsorted(edges, column, side="right")) - 1


def per_column(edges: list[int], thresholds: list[float]) -> np.ndarray:
    """Threshold of every image column from CD band edges and band thresholds, float32 (width,)."""
    if len(edges) != len(thresholds) + 1:
        raise ValueError(f"{len(edges)} band edges for {len(thresholds)} thresholds")
    out = np.empty(edges[-1], dtype=np.float32)
    for e0, e1, t in zip(edges[:-1], edges[1:], thresholds, strict=True):
        out[e0:e1] = t
    return out
