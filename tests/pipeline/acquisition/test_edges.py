import numpy as np
import pytest

from pipeline.acquisition.edges import (
    EdgeTracker,
    detect_edges,
    mask_outside,
    mm_per_line_from_encoder,
    mm_per_line_from_speed,
    mm_per_px_from_target,
    otsu_threshold,
)
from pipeline.acquisition.synthetic import SyntheticStrip


def test_edges_of_the_synthetic_strip_within_a_pixel() -> None:
    strip = SyntheticStrip(width=512, seed=2)
    for first in (0, 700, 1900):
        img, _ = strip.render(first, 256)
        left, right = strip.edges(np.arange(first, first + 256, dtype=np.float64))
        got = detect_edges(img)
        assert got is not None
        assert abs(got[0] - left.mean()) <= 1.5 and abs(got[1] - right.mean()) <= 1.5


def test_tracker_follows_wander_and_refuses_jumps() -> None:
    t = EdgeTracker(max_jump_px=8)
    assert t.update((20.0, 480.0)) == (20.0, 480.0)
    assert t.update((23.0, 483.0)) == (23.0, 483.0)  # slow wander followed
    assert t.update((90.0, 483.0)) == (23.0, 483.0)  # a jump is refused
    assert t.rejected == 1
    assert t.update(None) == (23.0, 483.0)  # no contrast: keep the last edges


def test_no_contrast_gives_none() -> None:
    assert detect_edges(np.full((16, 64), 128, np.uint8)) is None


def test_mask_outside_zeroes_beyond_the_edges() -> None:
    m = mask_outside(np.ones((4, 100), np.float32), (10.4, 89.6))
    assert m[:, :11].sum() == 0 and m[:, 90:].sum() == 0 and (m[:, 11:90] == 1).all()


def test_scales() -> None:
    frame = np.zeros((8, 400), np.uint8)
    frame[:, 100:300] = 200
    assert mm_per_px_from_target(frame, width_mm=100.0) == pytest.approx(0.5, rel=0.01)
    assert mm_per_line_from_encoder(mm_per_pulse=0.05, divider=4) == pytest.approx(0.2)
    assert mm_per_line_from_speed(line_rate_hz=20_000, speed_m_per_min=600) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mm_per_line_from_speed(line_rate_hz=0, speed_m_per_min=1)


def _otsu_reference(values: np.ndarray) -> float:
    # Otsu's between-class variance written out over a 256-bin histogram (the textbook form).
    hist, edges = np.histogram(values, bins=256, range=(0.0, 256.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return float(edges[int(np.nanargmax(between)) + 1])


def test_otsu_by_opencv_equals_the_textbook_threshold() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(50, 3000))
        k = int(rng.integers(1, n))
        dark = rng.normal(rng.uniform(10, 100), rng.uniform(1, 20), k)
        bright = rng.normal(rng.uniform(120, 240), rng.uniform(1, 20), n - k)
        values = np.concatenate([dark, bright]).clip(0, 255)
        assert otsu_threshold(values) == _otsu_reference(values)
