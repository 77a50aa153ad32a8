"""Flat-field on a synthetic camera with vignetting and per-column gain noise (issue bar: the
column profile of a uniform target to <= 1 % CV, and no column structure in score maps)."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.flatfield import calibrate_flatfield, compute_flatfield, profile_cv, read_line_stack, write_flatfield
from pipeline.acquisition.flatfield import FlatField, FlatFieldError, load_flatfield
from pipeline.acquisition.synthetic import LineCamera, SyntheticStrip, uniform_target
from pipeline.config import ConfigError, RuntimeConfig, ScoringConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.framescore import FrameScorer

WIDTH = 256


def _refs(cam: LineCamera, strip: SyntheticStrip, level: float = 120.0) -> tuple[np.ndarray, np.ndarray]:
    dark = cam.capture(np.zeros((256, WIDTH), np.float32), seed=1)
    white = cam.capture(uniform_target(strip, lines=256, level=level), seed=2)
    return dark, white


def test_uniform_target_profile_flat_to_one_percent(tmp_path: Path) -> None:
    strip = SyntheticStrip(width=WIDTH, seed=3)
    cam = LineCamera.random(width=WIDTH, seed=11, gain_noise=0.08)
    dark, white = _refs(cam, strip)
    offset, gain, report = compute_flatfield(dark, white)
    target = cam.capture(uniform_target(strip, lines=512, level=110.0), seed=9)  # a new capture
    before = profile_cv(target)
    after = profile_cv(FlatField(offset=offset, gain=gain).apply(target[:, :, None]))
    assert before > 0.05  # vignetting and gain noise are really there
    assert after <= 0.01
    assert report.profile_cv_after <= 0.01 < report.profile_cv_before
    path = write_flatfield(tmp_path, offset, gain, report, dark, white)
    o2, g2 = load_flatfield(path, width=WIDTH)
    np.testing.assert_array_equal(o2, offset)
    np.testing.assert_array_equal(g2, gain)
    png = cv2.imread(str(tmp_path / "flatfield.png"))
    assert png is not None
    # three curves drawn (matplotlib's tab: colours): red (before), green (after), blue (dark)
    b, g, r = (png[:, :, c].astype(int) for c in range(3))
    assert ((r > 180) & (g < 80)).sum() > WIDTH and ((g > 120) & (r < 80)).sum() > WIDTH // 2
    assert ((b > 150) & (r < 80)).sum() > WIDTH // 2


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        ("saturated", "saturated"),
        ("dark", "too dark"),
        ("noisy", "too noisy"),
    ],
)
def test_bad_references_are_refused(make: str, needle: str) -> None:
    strip = SyntheticStrip(width=WIDTH, seed=3)
    level = {"saturated": 400.0, "dark": 5.0, "noisy": 120.0}[make]
    cam = LineCamera.random(width=WIDTH, seed=11, noise=30.0 if make == "noisy" else 1.0)
    dark, white = _refs(cam, strip, level)
    with pytest.raises(FlatFieldError, match=needle):
        compute_flatfield(dark, white)


def test_wrong_width_file_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", offset=np.zeros(10, np.float32), gain=np.ones(10, np.float32))
    with pytest.raises(FlatFieldError, match="10,\\) columns, camera has 256"):
        load_flatfield(tmp_path / "f.npz", width=256)


def test_score_maps_lose_the_camera_column_pattern(strip_bundle: Path) -> None:
    # The bank was fitted on an ideal camera. A real camera with strong per-column gain noise
    # prints its pattern into the score map; after its flat-field the pattern is gone.
    strip = SyntheticStrip(width=WIDTH, seed=3)
    cam = LineCamera.random(width=WIDTH, seed=21, gain_noise=0.15, offset=12.0)
    offset, gain, _ = compute_flatfield(*_refs(cam, strip))
    # The flat-field also removes the lamp's vignetting, which the ideal camera kept; restore
    # that part so corrected frames look like the ideal camera's (a real line is fitted on
    # corrected frames from the start).
    gain = gain * (strip._vignette / strip._vignette.mean()).astype(np.float32)
    ff = FlatField(offset=offset, gain=gain)
    fs = FrameScorer(
        scorer=open_backend(strip_bundle, runtime=RuntimeConfig(), scoring=ScoringConfig()), tile=None, margin=0
    )

    def column_structure(correct: bool, ideal: bool = False) -> float:
        maps = []
        for k in range(4):
            radiance = strip.render_normal(60_000 + 512 * k, 512)
            frame = (np.clip(np.rint(radiance), 0, 255).astype(np.uint8) if ideal else cam.capture(radiance, seed=k))[
                :, :, None
            ]
            if correct:
                frame = ff.apply(frame)
            maps.append(fs.score(frame).anomaly_map)
        prof = np.concatenate(maps).mean(axis=0)[16:-16]
        return float(prof.std() / prof.mean())

    ideal, raw, corrected = column_structure(False, ideal=True), column_structure(False), column_structure(True)
    print("column structure ideal, raw, corrected", ideal, raw, corrected)
    assert raw > 1.5 * ideal
    assert corrected < 1.2 * ideal + 0.01


def test_calibrate_flatfield_reads_files_and_folders(tmp_path: Path) -> None:
    strip = SyntheticStrip(width=WIDTH, seed=3)
    cam = LineCamera.random(width=WIDTH, seed=5)
    (tmp_path / "dark").mkdir()
    darks = [cam.capture(np.zeros((64, WIDTH), np.float32), seed=k) for k in range(2)]
    for k, d in enumerate(darks):
        cv2.imwrite(str(tmp_path / "dark" / f"{k}.png"), d)
    white = cam.capture(uniform_target(strip, lines=128, level=120), seed=7)
    cv2.imwrite(str(tmp_path / "white.png"), white)
    # A folder is its images one below the other, in name order; a file is itself.
    np.testing.assert_array_equal(read_line_stack(tmp_path / "dark"), np.concatenate(darks))
    np.testing.assert_array_equal(read_line_stack(tmp_path / "white.png"), white)
    cal = calibrate_flatfield(
        dark=tmp_path / "dark", white=tmp_path / "white.png", out_dir=tmp_path / "ff", max_noise=0.05
    )
    assert cal.path == tmp_path / "ff" / "flatfield.npz" and (tmp_path / "ff" / "flatfield.png").is_file()
    assert cal.report.lines_dark == 128 and cal.report.lines_white == 128 and cal.report.profile_cv_after <= 0.01
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no reference images"):
        read_line_stack(tmp_path / "empty")
