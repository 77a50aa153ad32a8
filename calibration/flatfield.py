"""Flat-field calibration from a dark and a white reference (per column, for a line camera).

gain makes every column of the white reference equal to the mean white level:
gain_c = mean_c'(white_c' - dark_c') / (white_c - dark_c), offset_c = dark_c.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from calibration.plots import plot_flatfield
from pipeline.acquisition.flatfield import FlatFieldError
from pipeline.acquisition.images import list_images, read_image
from pipeline.config import ConfigError


@dataclass(frozen=True)
class FlatFieldReport:
    lines_dark: int
    lines_white: int
    white_level: float
    dark_level: float
    saturated_fraction: float
    worst_column_noise: float
    profile_cv_before: float
    profile_cv_after: float


def _lines(ref: np.ndarray, name: str) -> np.ndarray:
    if ref.dtype != np.uint8 or ref.ndim not in (2, 3):
        raise FlatFieldError(f"{name} reference must be uint8 (lines, width[, 1]), got {ref.dtype} {ref.shape}")
    if ref.ndim == 3:
        if ref.shape[2] != 1:
            raise FlatFieldError(f"{name} reference has {ref.shape[2]} channels; a mono line camera has 1")
        ref = ref[:, :, 0]
    if ref.shape[0] < 16:
        raise FlatFieldError(f"{name} reference has {ref.shape[0]} lines; average at least 16")
    return ref.astype(np.float64)


def compute_flatfield(
    dark: np.ndarray,
    white: np.ndarray,
    *,
    max_noise: float = 0.05,
    min_signal: float = 20.0,
    max_saturated: float = 0.001,
) -> tuple[np.ndarray, np.ndarray, FlatFieldReport]:
    """(offset, gain, report) from reference stacks (lines, width) uint8.

    Refuses a white reference with more than ``max_saturated`` of its pixels at 255, one whose
    signal above dark is below ``min_signal`` in any column, and references whose temporal
    noise (std over lines / signal) exceeds ``max_noise`` in any column.
    """
    d, w = _lines(dark, "dark"), _lines(white, "white")
    if d.shape[1] != w.shape[1]:
        raise FlatFieldError(f"dark has {d.shape[1]} columns, white {w.shape[1]}")
    saturated = float((white >= 255).mean())
    if saturated > max_saturated:
        raise FlatFieldError(
            f"white reference is saturated ({100 * saturated:.2f} % of pixels at 255); lower the exposure "
            "or the lamp to about half of full scale"
        )
    offset = d.mean(axis=0)
    signal = w.mean(axis=0) - offset
    if signal.min() < min_signal:
        c = int(np.argmin(signal))
        raise FlatFieldError(
            f"white reference too dark: column {c} is only {signal[c]:.1f} above dark (need {min_signal})"
        )
    noise = np.sqrt(w.var(axis=0) + d.var(axis=0)) / signal
    if noise.max() > max_noise:
        c = int(np.argmax(noise))
        raise FlatFieldError(
            f"references too noisy: column {c} varies {100 * noise[c]:.1f} % over lines (bound {100 * max_noise:.1f} %)"
        )
    gain = signal.mean() / signal
    corrected = np.clip((w - offset) * gain, 0, 255).mean(axis=0)
    report = FlatFieldReport(
        lines_dark=int(d.shape[0]),
        lines_white=int(w.shape[0]),
        white_level=float(w.mean()),
        dark_level=float(offset.mean()),
        saturated_fraction=saturated,
        worst_column_noise=float(noise.max()),
        profile_cv_before=float(w.mean(axis=0).std() / w.mean()),
        profile_cv_after=float(corrected.std() / corrected.mean()),
    )
    return offset.astype(np.float32), gain.astype(np.float32), report


def profile_cv(frame: np.ndarray) -> float:
    """Coefficient of variation of the column profile (mean over lines) of a uniform target."""
    prof = frame.reshape(frame.shape[0], frame.shape[1], -1).mean(axis=(0, 2))
    return float(prof.std() / prof.mean())


def write_flatfield(
    out_dir: Path, offset: np.ndarray, gain: np.ndarray, report: FlatFieldReport, dark: np.ndarray, white: np.ndarray
) -> Path:
    """flatfield.npz (data only), flatfield.json (report) and flatfield.png (column profiles)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "flatfield.npz"
    np.savez(path, offset=offset, gain=gain)
    (out_dir / "flatfield.json").write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    w = white.reshape(white.shape[0], -1).astype(np.float32)
    before = w.mean(axis=0)
    after = np.clip((w - offset) * gain, 0, 255).mean(axis=0)
    dark_prof = dark.reshape(dark.shape[0], -1).astype(np.float32).mean(axis=0)
    plot_flatfield(out_dir / "flatfield.png", white_before=before, white_after=after, dark=dark_prof)
    return path


def read_line_stack(path: Path) -> np.ndarray:
    """A reference as one stack of lines (lines, width) uint8: an image file, or every image of a
    folder (name order) one below the other, read as mono."""
    files = list_images(path) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"{path}: no reference images")
    return np.concatenate([read_image(f, 1)[:, :, 0] for f in files])


@dataclass(frozen=True)
class FlatFieldCalibration:
    path: Path  # flatfield.npz; flatfield.json and flatfield.png beside it
    report: FlatFieldReport


def calibrate_flatfield(*, dark: Path, white: Path, out_dir: Path, max_noise: float) -> FlatFieldCalibration:
    """``stripinspect calibrate flatfield``: read the dark and white references (files or
    folders), compute the per-column offset and gain, write them with their report and plot."""
    dark_lines, white_lines = read_line_stack(dark), read_line_stack(white)
    offset, gain, report = compute_flatfield(dark_lines, white_lines, max_noise=max_noise)
    path = write_flatfield(out_dir, offset, gain, report, dark_lines, white_lines)
    return FlatFieldCalibration(path=path, report=report)
