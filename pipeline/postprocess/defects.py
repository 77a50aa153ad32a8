"""Score map -> defects in strip coordinates (pure); which pixels form one is ``regions``' rule."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.postprocess.regions import find_regions, per_column
from pipeline.transport.messages import Defect, Frame

__all__ = ["extract_defects", "per_column"]


def extract_defects(
    score_map: np.ndarray,
    *,
    frame: Frame,
    threshold: float | np.ndarray,
    min_area_px: int,
    mm_per_px: float,
    mm_per_line: float,
    strip_left_px: float = 0.0,
    cd_offset_mm: float = 0.0,
) -> list[Defect]:
    """The regions (``regions.find_regions``) of ``score_map`` (lines, width) above ``threshold``
    (one value, or one per column for CD bands) whose first row lies in the frame's valid rows;
    a region that starts in the overlap belongs to the neighbour whose valid rows hold its
    start, so each defect is reported once, even where a frame's map is cut off beyond its
    valid rows. ``cd_offset_mm``: the strip CD of ``strip_left_px`` (cameras side by side)."""
    if score_map.ndim != 2 or score_map.shape[0] != frame.pixels.shape[0]:
        raise ValueError(f"score map {score_map.shape} does not match frame {frame.pixels.shape}")
    found = find_regions(
        score_map, threshold=threshold, min_area_px=min_area_px, first_rows=(frame.valid_from, frame.valid_to)
    )
    out = []
    for r in found.regions:
        _, _, w, h = r.box
        cx, cy = r.centroid
        out.append(
            Defect(
                frame_id=frame.frame_id,
                box=r.box,
                area_px=r.area_px,
                max_score=r.peak,
                mean_score=r.mean,
                threshold=r.threshold,
                line=frame.first_line + cy,
                md_m=frame.md_m + cy * mm_per_line / 1000.0,
                cd_mm=cd_offset_mm + (cx - strip_left_px) * mm_per_px,
                length_mm=h * mm_per_line,
                width_mm=w * mm_per_px,
                area_mm2=r.area_px * mm_per_px * mm_per_line,
            )
        )
    return out


def defect_thumbnail(pixels: np.ndarray, box: tuple[int, int, int, int], *, side_px: int) -> bytes:
    """PNG of a square crop of ``pixels`` (lines, width[, C]) uint8 centred on ``box`` (x, y, w, h):
    ``side_px`` wide, or the box with a quarter of margin when it is larger, shrunk to ``side_px``
    (the coil records keep the look of the defect, not its pixels)."""
    x, y, w, h = box
    h_img, w_img = pixels.shape[:2]
    side = min(max(side_px, round(max(w, h) * 1.5)), h_img, w_img)
    x0 = min(max(0, x + w // 2 - side // 2), w_img - side)
    y0 = min(max(0, y + h // 2 - side // 2), h_img - side)
    crop = np.ascontiguousarray(pixels[y0 : y0 + side, x0 : x0 + side])
    if side > side_px:
        crop = cv2.resize(crop, (side_px, side_px), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", crop)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image as PNG
        raise ValueError("cannot encode the defect thumbnail")
    return png.tobytes()


def frame_preview(pixels: np.ndarray, *, width: int, quality: int = 80) -> tuple[bytes, tuple[int, int]]:
    """JPEG of ``pixels`` (lines, width[, C]) uint8 shrunk to ``width`` columns (never enlarged),
    the aspect kept, and its (height, width): what the operator station shows of a frame."""
    h, w = pixels.shape[:2]
    if width < w:
        pixels = cv2.resize(pixels, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(pixels), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image as JPEG
        raise ValueError("cannot encode the frame preview")
    return jpg.tobytes(), (int(pixels.shape[0]), int(pixels.shape[1]))
