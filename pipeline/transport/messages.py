"""Typed messages between the daemon's stages: small frozen dataclasses, not dicts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LineBlock:
    """What a line camera delivers: ``pixels`` uint8 (lines, width) or (lines, width, C),
    the strip line index of its first line (or encoder count), and its capture time
    (seconds, time.time() clock)."""

    pixels: np.ndarray
    first_line: int
    capture_time: float


@dataclass(frozen=True)
class Frame:
    """``pixels`` uint8 (lines, width, C), C = 1 or 3. ``first_line`` is the strip line index of
    row 0; ``valid_from``/``valid_to`` are the rows this frame is responsible for (the rest is
    overlap with its neighbours, scored for context only). ``md_m`` is the MD position of row 0
    in metres from the coil head."""

    frame_id: int
    camera_id: str
    pixels: np.ndarray
    first_line: int
    valid_from: int
    valid_to: int
    capture_time: float
    md_m: float


@dataclass(frozen=True)
class Defect:
    """One connected region above threshold in a frame's valid rows.

    Box in frame pixels (x, y, w, h); sizes in mm; ``line``: the strip line of the region's
    centroid; MD of the centroid in metres from strip line 0 (the publish stage makes it the
    coil's), CD in mm in strip coordinates (from the camera's reference edge plus its
    ``cd_offset_mm``).
    """

    frame_id: int
    box: tuple[int, int, int, int]
    area_px: int
    max_score: float
    mean_score: float
    threshold: float
    line: float
    md_m: float
    cd_mm: float
    length_mm: float
    width_mm: float
    area_mm2: float
