"""Score map -> defects: threshold, connected components, strip coordinates (pure)."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.transport.messages import Defect, Frame


def extract_defects(
    score_map: np.ndarray,
    *,
    frame: Frame,
    threshold: float | np.ndarray,
    min_area_px: int,
    mm_per_px: float,
    mm_per_line: float,
    strip_left_px: float = 0.0,
) -> list[Defect]:
    """Regions of ``score_map`` (lines, width) above ``threshold`` (one value, or one per column
    for CD bands) whose first row lies in the frame's valid rows; a region that starts in the
    overlap belongs to the neighbour whose valid rows hold its start, so each defect is reported
    once, even where a frame's map is cut off beyond its valid rows."""
    if score_map.ndim != 2 or score_map.shape[0] != frame.pixels.shape[0]:
        raise ValueError(f"score map {score_map.shape} does not match frame {frame.pixels.shape}")
    per_col = np.broadcast_to(np.asarray(threshold, dtype=np.float32), (score_map.shape[1],))
    hot = (score_map > per_col[None, :]).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(hot, connectivity=8)
    out = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        cx, cy = float(centroids[k][0]), float(centroids[k][1])
        if area < min_area_px or not frame.valid_from <= y < frame.valid_to:
            continue
        region = labels[y : y + h, x : x + w] == k
        scores = score_map[y : y + h, x : x + w][region]
        out.append(
            Defect(
                frame_id=frame.frame_id,
                box=(x, y, w, h),
                area_px=area,
                max_score=float(scores.max()),
                mean_score=float(scores.mean()),
                threshold=float(per_col[min(int(cx), per_col.size - 1)]),
                md_m=frame.md_m + cy * mm_per_line / 1000.0,
                cd_mm=(cx - strip_left_px) * mm_per_px,
                length_mm=h * mm_per_line,
                width_mm=w * mm_per_px,
                area_mm2=area * mm_per_px * mm_per_line,
            )
        )
    return out


def per_column(edges: list[int], thresholds: list[float]) -> np.ndarray:
    """Threshold of every image column from CD band edges and band thresholds, float32 (width,)."""
    if len(edges) != len(thresholds) + 1:
        raise ValueError(f"{len(edges)} band edges for {len(thresholds)} thresholds")
    out = np.empty(edges[-1], dtype=np.float32)
    for e0, e1, t in zip(edges[:-1], edges[1:], thresholds, strict=True):
        out[e0:e1] = t
    return out
