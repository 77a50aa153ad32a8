"""Spatial scale: mm per pixel across the strip and mm per line along it, with a report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calibration.plots import plot_scale_profile
from pipeline.acquisition.edges import detect_edges, mm_per_line_from_encoder, mm_per_line_from_speed
from pipeline.acquisition.images import read_image
from pipeline.config import ConfigError


def calibrate_scale(
    *,
    target: np.ndarray | None,
    target_width_mm: float | None,
    mm_per_pulse: float | None,
    divider: int | None,
    line_rate_hz: float | None,
    speed_m_per_min: float | None,
    out_dir: Path,
) -> dict[str, float | None]:
    """Writes scale.json (and scale.png with the target's column profile and detected edges)."""
    result: dict[str, float | None] = {"mm_per_px": None, "mm_per_line": None}
    out_dir.mkdir(parents=True, exist_ok=True)
    if target is not None:
        if target_width_mm is None or target_width_mm <= 0:
            raise ValueError("a target image needs its width in mm (> 0)")
        edges = detect_edges(target, min_width_px=4)
        if edges is None:
            raise ValueError("no bright target with contrast found in the image")
        result["mm_per_px"] = target_width_mm / (edges[1] - edges[0])
        result["target_left_px"], result["target_right_px"] = edges
        profile = target.reshape(target.shape[0], target.shape[1], -1).mean(axis=(0, 2))
        plot_scale_profile(out_dir / "scale.png", profile=profile, edges=edges, width_mm=target_width_mm)
    if mm_per_pulse is not None or divider is not None:
        if mm_per_pulse is None or divider is None:
            raise ValueError("encoder scale needs both mm per pulse and the divider")
        result["mm_per_line"] = mm_per_line_from_encoder(mm_per_pulse=mm_per_pulse, divider=divider)
    elif line_rate_hz is not None or speed_m_per_min is not None:
        if line_rate_hz is None or speed_m_per_min is None:
            raise ValueError("free-running scale needs both the line rate and the line speed")
        result["mm_per_line"] = mm_per_line_from_speed(line_rate_hz=line_rate_hz, speed_m_per_min=speed_m_per_min)
    (out_dir / "scale.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def calibrate_scale_from_files(
    *,
    target: Path | None,
    target_width_mm: float | None,
    mm_per_pulse: float | None,
    divider: int | None,
    line_rate_hz: float | None,
    speed_m_per_min: float | None,
    out_dir: Path,
) -> dict[str, float | None]:
    """``stripinspect calibrate scale``: ``calibrate_scale`` with the target read from its image
    file; inconsistent arguments are a ConfigError of one line."""
    try:
        return calibrate_scale(
            target=read_image(target, 1) if target is not None else None,
            target_width_mm=target_width_mm,
            mm_per_pulse=mm_per_pulse,
            divider=divider,
            line_rate_hz=line_rate_hz,
            speed_m_per_min=speed_m_per_min,
            out_dir=out_dir,
        )
    except ValueError as err:
        raise ConfigError(f"calibrate scale: {err}") from None
