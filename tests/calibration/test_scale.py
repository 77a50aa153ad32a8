"""Spatial scale from a target image file of known width and the encoder or line rate."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.scale import calibrate_scale_from_files
from pipeline.config import ConfigError


def test_scale_from_a_target_file_and_the_line_rate(tmp_path: Path) -> None:
    frame = np.full((32, 400), 20, np.uint8)
    frame[:, 100:300] = 210  # a 200 px wide target
    cv2.imwrite(str(tmp_path / "t.png"), frame)
    result = calibrate_scale_from_files(
        target=tmp_path / "t.png",
        target_width_mm=100,
        mm_per_pulse=None,
        divider=None,
        line_rate_hz=1000,
        speed_m_per_min=60,
        out_dir=tmp_path / "s",
    )
    assert result["mm_per_px"] == pytest.approx(0.5, rel=0.01) and result["mm_per_line"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "s" / "scale.json").read_text()) == result
    assert (tmp_path / "s" / "scale.png").is_file()


def test_inconsistent_arguments_are_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calibrate scale: encoder scale needs both"):
        calibrate_scale_from_files(
            target=None,
            target_width_mm=None,
            mm_per_pulse=0.1,
            divider=None,
            line_rate_hz=None,
            speed_m_per_min=None,
            out_dir=tmp_path,
        )
    frame = np.full((32, 400), 20, np.uint8)
    cv2.imwrite(str(tmp_path / "flat.png"), frame)
    with pytest.raises(ConfigError, match="no bright target"):
        calibrate_scale_from_files(
            target=tmp_path / "flat.png",
            target_width_mm=100,
            mm_per_pulse=None,
            divider=None,
            line_rate_hz=None,
            speed_m_per_min=None,
            out_dir=tmp_path,
        )
