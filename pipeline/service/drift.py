"""Drift of the normal surface: the rolling median score against the calibration's."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import numpy as np

log = logging.getLogger("stripinspect.drift")


class DriftMonitor:
    """``track`` each scored frame's valid map; ``report`` compares the rolling median of the
    last ``window`` frames with the calibrated one and logs when it crosses ``bound``."""

    def __init__(self, *, window: int) -> None:
        if window < 1:
            raise ValueError(f"drift window must be >= 1 frame, got {window}")
        self._medians: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._drifting = False

    def track(self, valid: np.ndarray) -> None:
        # Median score of the frame on a 4x4 subsample: defects cover a tiny part of a frame, so
        # this follows the normal surface; an ageing lamp or a new grade moves all of it.
        value = float(np.median(valid[::4, ::4]))
        with self._lock:
            self._medians.append(value)

    def report(self, *, reference: float | None, bound: float) -> dict[str, Any]:
        with self._lock:
            values = list(self._medians)
        rolling = float(np.median(values)) if values else None
        ratio = rolling / reference if rolling is not None and reference else None
        drifting = ratio is not None and abs(ratio - 1.0) > bound
        with self._lock:
            changed, self._drifting = drifting != self._drifting, drifting
        if changed and drifting:
            log.warning("normal scores drifted: rolling median %.3f vs calibrated %.3f", rolling, reference)
        elif changed:
            log.info("normal scores back within %.0f %% of calibration", 100 * bound)
        return {
            "normal_median_rolling": rolling,
            "normal_median_calibrated": reference,
            "drift_ratio": ratio,
            "drifting": drifting,
        }
