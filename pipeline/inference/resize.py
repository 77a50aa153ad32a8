"""The bundle's resize factor, one rule for every backend: the size an image is embedded at and
the resize itself (``input.scale`` of the manifest; PatchCore's ``fit.scale``, the encoders'
``svdd.scale`` and ``msp.scale``)."""

from __future__ import annotations

import cv2
import numpy as np


def scaled_hw(height: int, width: int, scale: float, min_side: int = 1) -> tuple[int, int]:
    """``height`` x ``width`` times ``scale`` (rounded), no side under ``min_side``."""
    if scale == 1.0 and height >= min_side and width >= min_side:
        return height, width
    return max(min_side, round(height * scale)), max(min_side, round(width * scale))


def resize_to(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C): area interpolation when shrinking, bilinear when enlarging;
    the same array when the size does not change."""
    h, w = image.shape[:2]
    mh, mw = hw
    if (mh, mw) == (h, w):
        return image
    out = cv2.resize(image, (mw, mh), interpolation=cv2.INTER_AREA if mh * mw < h * w else cv2.INTER_LINEAR)
    return out.reshape(mh, mw, image.shape[2])
