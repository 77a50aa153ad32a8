"""Score maps as colour, for people: the live view's overlay and the defect page's crop.

Pure functions on arrays. A map is coloured by score / threshold, so one colour means one thing
on every camera, band and recipe: transparent below ``FLOOR`` of the threshold (the strip's
normal texture stays visible under it), then the turbo colour scale up to ``TOP`` times the
threshold; everything at or above the threshold is drawn nearly opaque, so an alert's region
stands out from the merely warm strip around it.

Geometry (docs/messages.md): a frame's map covers its valid rows ``[valid_from, valid_to)`` at
one scale in both directions (the daemon publishes it at pixel resolution), so frame pixel
(x, y) is map cell ((y - valid_from) * s, x * s) with s = map rows / valid rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

FLOOR = 0.5  # score / threshold below which nothing is drawn
TOP = 2.0  # score / threshold at the hot end of the colour scale
WARM_ALPHA = 0.55  # opacity just under the threshold ...
HOT_ALPHA = 0.85  # ... and at or above it
CROP_MIN_PX = 64  # the smallest square (frame pixels) a defect crop shows, as the daemon's thumbnails


def threshold_of(threshold: float | Sequence[float]) -> float:
    """One number to divide by. Per-band thresholds (a list, left to right) give their lowest:
    the bands' edges are the bundle's, not in the message, and the lowest colours no alert's
    region cooler than it is."""
    if isinstance(threshold, int | float):
        value = float(threshold)
    else:
        values = [float(t) for t in threshold]
        if not values:
            raise ValueError("threshold list is empty")
        value = min(values)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    return value


def heat_rgba(score: np.ndarray, threshold: float, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """(h, w, 4) uint8 RGBA of a 2-D score map; ``size`` = (width, height) to resize to first
    (the preview's), else the map's own."""
    if score.ndim != 2 or score.size == 0:
        raise ValueError(f"score map must be 2-D and not empty, got shape {score.shape}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    ratio = np.nan_to_num(score.astype(np.float32) / np.float32(threshold), nan=0.0, posinf=TOP, neginf=0.0)
    if size is not None:
        w, h = size
        if w < 1 or h < 1:
            raise ValueError(f"size must be positive, got {size}")
        # Area averaging when shrinking keeps a thin scratch's heat instead of skipping its rows.
        shrink = w * h < ratio.shape[0] * ratio.shape[1]
        ratio = cv2.resize(ratio, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    level = np.clip((ratio - FLOOR) / (TOP - FLOOR), 0.0, 1.0)
    bgr = cv2.applyColorMap(np.round(level * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    alpha = np.where(ratio >= 1.0, HOT_ALPHA, WARM_ALPHA * np.clip((ratio - FLOOR) / (1.0 - FLOOR), 0.0, 1.0))
    rgba = np.empty((*ratio.shape, 4), dtype=np.uint8)
    rgba[..., :3] = bgr[..., ::-1]
    rgba[..., 3] = np.round(alpha * 255).astype(np.uint8)
    return rgba


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB(A) uint8 image (OpenCV writes BGR(A): the channels are swapped here)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (h, w, 3|4) uint8 image, got {image.shape} {image.dtype}")
    swapped = image[..., [2, 1, 0, 3]] if image.shape[2] == 4 else image[..., ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(swapped))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image as PNG
        raise ValueError("cannot encode PNG")
    return buf.tobytes()


def crop_window(
    box: Sequence[int], *, valid_rows: tuple[int, int], map_shape: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1) of the map around ``box`` (x, y, w, h in frame pixels): a square
    of 1.5 times the box's longer side, at least ``CROP_MIN_PX``, centred on the box and moved
    inside the map (as the daemon cuts its thumbnails); None when the box is outside the map."""
    x, y, w, h = (int(v) for v in box)
    v0, v1 = valid_rows
    if v1 <= v0 or w < 0 or h < 0:
        return None
    rows, cols = map_shape
    s = rows / (v1 - v0)
    side = max(CROP_MIN_PX, round(1.5 * max(w, h))) * s
    side_px = max(1, min(round(side), rows, cols))
    cy, cx = (y + h / 2 - v0) * s, (x + w / 2) * s
    if not (0 <= cy <= rows and 0 <= cx <= cols):
        return None
    r0 = int(min(max(0, round(cy - side_px / 2)), rows - side_px))
    c0 = int(min(max(0, round(cx - side_px / 2)), cols - side_px))
    return r0, r0 + side_px, c0, c0 + side_px


def heat_crop(
    score: np.ndarray,
    threshold: float,
    *,
    box: Sequence[int],
    valid_rows: tuple[int, int],
    out_px: int = 192,
) -> np.ndarray | None:
    """(out_px, out_px, 3) uint8 RGB of the map around a defect on dark grey, with the threshold's
    contour in white (where the alert's region ends); None when the box is outside the map."""
    if out_px < 8:
        raise ValueError(f"out_px must be >= 8, got {out_px}")
    window = crop_window(box, valid_rows=valid_rows, map_shape=(score.shape[0], score.shape[1]))
    if window is None:
        return None
    r0, r1, c0, c1 = window
    rgba = heat_rgba(score[r0:r1, c0:c1], threshold, size=(out_px, out_px)).astype(np.float32)
    alpha = rgba[..., 3:4] / 255.0
    out = rgba[..., :3] * alpha + np.float32(48.0) * (1.0 - alpha)
    crop = cv2.resize(score[r0:r1, c0:c1].astype(np.float32), (out_px, out_px), interpolation=cv2.INTER_LINEAR)
    inside = (crop >= threshold).astype(np.uint8)
    contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    canvas = np.ascontiguousarray(np.round(out).astype(np.uint8))
    cv2.drawContours(canvas, contours, -1, (255, 255, 255), 1, lineType=cv2.LINE_AA)
    return canvas
