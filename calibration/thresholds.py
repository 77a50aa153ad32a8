"""Pixel thresholds from normal strip only (the first, simplest rule; per-band thresholds
with a false-alarm budget come with the calibration issue)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.framescore import FrameScorer


def threshold_above_normal(scorer: FrameScorer, frames: Iterable[np.ndarray], *, factor: float = 1.1) -> float:
    """``factor`` times the highest pixel score seen on normal frames (lines, width, C)."""
    if factor < 1.0:
        raise ValueError(f"factor must be >= 1, got {factor}")
    peaks = [float(scorer.score(f).anomaly_map.max()) for f in frames]
    if not peaks:
        raise ValueError("no normal frames given")
    return factor * max(peaks)
