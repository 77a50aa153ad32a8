"""Flat-field correction at frame rate: out = (raw - offset) * gain, clipped to 0..255.

The offset and gain come from calibration (calibration/flatfield.py) as a data-only .npz file;
the runtime only applies them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import StripinspectError


class FlatFieldError(StripinspectError):
    """Flat-field references or files that cannot be used; one line."""


def load_flatfield(path: Path, *, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(offset, gain), float32 (width,) each, from a calibration file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            offset = np.asarray(data["offset"], dtype=np.float32)
            gain = np.asarray(data["gain"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as err:
        raise FlatFieldError(f"{path}: not a flat-field file: {err}") from None
    if offset.shape != (width,) or gain.shape != (width,):
        raise FlatFieldError(f"{path}: flat-field for {offset.shape} columns, camera has {width}")
    if not (np.isfinite(offset).all() and np.isfinite(gain).all() and (gain > 0).all()):
        raise FlatFieldError(f"{path}: flat-field holds non-finite or non-positive values")
    return offset, gain


class FlatField:
    """Applies per-column offset and gain to frames (lines, width, C); reuses its buffers."""

    def __init__(self, *, offset: np.ndarray, gain: np.ndarray) -> None:
        if offset.ndim != 1 or offset.shape != gain.shape:
            raise FlatFieldError(f"offset {offset.shape} and gain {gain.shape} must be equal 1-D arrays")
        self.offset = offset.astype(np.float32)[None, :, None]
        self.gain = gain.astype(np.float32)[None, :, None]
        self._buf: np.ndarray | None = None

    @classmethod
    def from_file(cls, path: Path, *, width: int) -> FlatField:
        offset, gain = load_flatfield(path, width=width)
        return cls(offset=offset, gain=gain)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        if raw.ndim != 3 or raw.shape[1] != self.offset.shape[1]:
            raise ValueError(f"frame {raw.shape} does not match the flat-field's {self.offset.shape[1]} columns")
        if self._buf is None or self._buf.shape != raw.shape:
            self._buf = np.empty(raw.shape, dtype=np.float32)
        buf = self._buf
        np.subtract(raw, self.offset, out=buf)
        np.multiply(buf, self.gain, out=buf)
        np.clip(buf, 0.0, 255.0, out=buf)
        # round half up, like the camera's own quantisation
        buf += 0.5
        return buf.astype(np.uint8)
