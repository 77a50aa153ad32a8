"""Strip-edge detection and tracking across frames (pure numpy; the tracker keeps two floats).

The strip is brighter than the background beyond it (the synthetic strip and most top-lit
lines); each frame's column profile is split at Otsu's threshold and the outermost long run of
bright columns is the strip. The tracker follows edges that wander slowly and refuses jumps
larger than ``max_jump_px`` per frame (a defect or a reflection, not the strip moving).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of 8-bit-range values (a column profile), by OpenCV: values above the
    returned level are the bright class."""
    levels = np.clip(np.floor(values), 0, 255).astype(np.uint8).reshape(1, -1)
    t, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    # OpenCV's level t puts t itself in the dark class: the first bright level is t + 1.
    return float(t) + 1.0


def detect_edges(frame: np.ndarray, *, min_width_px: int = 32) -> tuple[float, float] | None:
    """(left, right) strip edge columns (sub-pixel) of a frame (lines, width[, C]), or None."""
    profile = frame.reshape(frame.shape[0], frame.shape[1], -1).mean(axis=(0, 2))
    if profile.max() - profile.min() < 10:
        return None  # no contrast: the strip fills the field of view or there is no strip
    t = otsu_threshold(profile)
    bright = np.flatnonzero(profile > t)
    if bright.size < min_width_px:
        return None

    def crossing(i0: int, i1: int) -> float:
        # linear interpolation of the threshold crossing between columns i0 and i1
        a, b = profile[i0], profile[i1]
        return float(i0 + (t - a) / (b - a) * (i1 - i0)) if b != a else float(i1)

    lo, hi = int(bright[0]), int(bright[-1])
    left = crossing(lo - 1, lo) if lo > 0 else 0.0
    right = crossing(hi + 1, hi) if hi < profile.size - 1 else float(profile.size - 1)
    return left, right


@dataclass
class EdgeTracker:
    """Follows the strip edges frame to frame."""

    max_jump_px: float = 16.0
    left: float | None = None
    right: float | None = None
    rejected: int = 0

    def update(self, detected: tuple[float, float] | None) -> tuple[float, float] | None:
        if detected is None:
            return None if self.left is None or self.right is None else (self.left, self.right)
        left, right = detected
        if (
            self.left is not None
            and self.right is not None
            and (abs(left - self.left) > self.max_jump_px or abs(right - self.right) > self.max_jump_px)
        ):
            self.rejected += 1
            return self.left, self.right
        self.left, self.right = left, right
        return left, right


def mask_outside(score_map: np.ndarray, edges: tuple[float, float], *, inset_px: int = 0) -> np.ndarray:
    """Score map with the columns beyond the strip edges set to 0 (not scored)."""
    left, right = edges
    out = score_map.copy()
    lo = max(0, int(np.ceil(left)) + inset_px)
    hi = min(score_map.shape[1], int(np.floor(right)) + 1 - inset_px)
    out[:, :lo] = 0.0
    out[:, hi:] = 0.0
    return out


def mm_per_px_from_target(frame: np.ndarray, *, width_mm: float) -> float:
    """Across-strip scale from a bright target of known width filling part of the view."""
    edges = detect_edges(frame, min_width_px=4)
    if edges is None:
        raise ValueError("no target found: the frame has no bright region with contrast")
    return width_mm / (edges[1] - edges[0])


def mm_per_line_from_encoder(*, mm_per_pulse: float, divider: int) -> float:
    """Along-strip scale when the encoder triggers a line every ``divider`` pulses."""
    if mm_per_pulse <= 0 or divider < 1:
        raise ValueError(f"mm_per_pulse must be > 0 and divider >= 1, got {mm_per_pulse}, {divider}")
    return mm_per_pulse * divider


def mm_per_line_from_speed(*, line_rate_hz: float, speed_m_per_min: float) -> float:
    """Along-strip scale of a free-running camera: the strip moves speed / line rate per line."""
    if line_rate_hz <= 0 or speed_m_per_min <= 0:
        raise ValueError(f"line rate and speed must be > 0, got {line_rate_hz}, {speed_m_per_min}")
    return speed_m_per_min * 1000.0 / 60.0 / line_rate_hz
