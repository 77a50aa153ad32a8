"""The threshold calibration workflow (`stripinspect calibrate thresholds` calls it): normal
strip from a folder of images, scored and calibrated into the bundle's manifest."""

import json
import shutil
from pathlib import Path

import cv2
import pytest

from calibration.thresholds import calibrate_thresholds_from_config
from pipeline.acquisition.synthetic import SyntheticStrip
from pipeline.config import Config, ConfigError, DaemonConfig
from pipeline.inference.bundle import read_manifest


def test_calibrate_from_a_folder_of_normal_frames(tmp_path: Path, strip_bundle: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(strip_bundle, bundle)
    strip = SyntheticStrip(width=256, seed=3)
    (tmp_path / "normal").mkdir()
    for k in range(4):
        img, _ = strip.render(2_000_000 + 512 * k, 512)
        cv2.imwrite(str(tmp_path / "normal" / f"{k:02d}.png"), img)
    cfg = Config(daemon=DaemonConfig(mm_per_line=0.5))
    cal = calibrate_thresholds_from_config(
        cfg=cfg,
        bundle=bundle,
        out_dir=tmp_path / "r",
        bands=2,
        alarms_per_km=500,
        min_area_mm2=1,
        data=tmp_path / "normal",
        progress=False,
    )
    assert cal.metres == pytest.approx(4 * 512 * 0.5 / 1000) and cal.labelled is None
    assert cal.result.band_edges_px == [0, 128, 256] and len(cal.result.thresholds) == 2
    assert cal.result.calibrated_on == f"folder {tmp_path / 'normal'} (4 images)"
    assert read_manifest(bundle).band_thresholds == cal.result
    written = json.loads((tmp_path / "r" / "thresholds.json").read_text())
    assert written["thresholds"] == cal.result.thresholds and not (tmp_path / "r" / "labelled.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no normal images"):
        calibrate_thresholds_from_config(
            cfg=cfg,
            bundle=bundle,
            out_dir=tmp_path / "r",
            bands=2,
            alarms_per_km=500,
            min_area_mm2=1,
            data=tmp_path / "empty",
            progress=False,
        )
