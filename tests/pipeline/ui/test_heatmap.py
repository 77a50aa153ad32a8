"""Score maps as colour: transparency below the floor, opacity at the threshold, geometry of crops."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.ui import heatmap as hm


def test_threshold_of_takes_a_number_or_the_lowest_band() -> None:
    assert hm.threshold_of(2) == 2.0
    assert hm.threshold_of([3.0, 1.5, 2.0]) == 1.5
    bad: list[float | list[float]] = [0, -1.0, float("nan"), []]
    for value in bad:
        with pytest.raises(ValueError):
            hm.threshold_of(value)


def test_colour_follows_score_over_threshold() -> None:
    threshold = 2.0
    score = np.array([[0.0, 0.9, 1.5, 1.99, 2.0, 4.0, 100.0]], np.float32)
    rgba = hm.heat_rgba(score, threshold)
    alpha = rgba[0, :, 3]
    # Below half the threshold: nothing drawn; rising towards it; the threshold and above: opaque.
    assert alpha[0] == 0 and alpha[1] == 0
    assert 0 < alpha[2] < alpha[3] < alpha[4]
    assert alpha[4] == alpha[5] == alpha[6] == round(hm.HOT_ALPHA * 255)
    # The hot end of turbo (dark red) at twice the threshold and beyond; the same for 100x.
    assert tuple(rgba[0, 5, :3]) == tuple(rgba[0, 6, :3])
    assert rgba[0, 5, 0] > rgba[0, 5, 2]
    # One colour means one ratio, whatever the threshold.
    assert np.array_equal(hm.heat_rgba(score * 3, threshold * 3), rgba)


def test_resizing_to_the_preview_keeps_a_thin_scratch() -> None:
    score = np.zeros((400, 800), np.float32)
    score[:, 401] = 10.0  # one column hot
    rgba = hm.heat_rgba(score, 1.0, size=(200, 100))
    assert rgba.shape == (100, 200, 4)
    assert rgba[:, 100, 3].min() > 0  # area averaging keeps it; nearest or linear sampling could skip it


def test_png_round_trips_rgba() -> None:
    rgba = hm.heat_rgba(np.linspace(0, 5, 60, dtype=np.float32).reshape(6, 10), 2.0)
    back = cv2.imdecode(np.frombuffer(hm.encode_png(rgba), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back is not None
    assert np.array_equal(back[..., [2, 1, 0, 3]], rgba)
    with pytest.raises(ValueError):
        hm.encode_png(np.zeros((4, 4), np.uint8))


def test_crop_window_is_centred_square_and_inside_the_map() -> None:
    # Map of valid rows 100..300 at half resolution: 100 x 400 cells.
    w = hm.crop_window([200, 150, 20, 10], valid_rows=(100, 300), map_shape=(100, 400))
    assert w is not None
    r0, r1, c0, c1 = w
    assert r1 - r0 == c1 - c0 == 32  # 64 frame px at least, halved
    assert abs((r0 + r1) / 2 - (150 + 5 - 100) / 2) <= 1 and abs((c0 + c1) / 2 - 105) <= 1
    # At a corner the window moves inside rather than shrinking.
    assert hm.crop_window([0, 100, 4, 4], valid_rows=(100, 300), map_shape=(100, 400)) == (0, 32, 0, 32)
    # A box in the frame's context rows, outside the valid ones: no crop.
    assert hm.crop_window([10, 20, 4, 4], valid_rows=(100, 300), map_shape=(100, 400)) is None


def test_heat_crop_draws_the_threshold_contour() -> None:
    score = np.zeros((200, 200), np.float32)
    cv2.circle(score, (100, 100), 20, 5.0, -1)
    crop = hm.heat_crop(score, 2.0, box=[80, 80, 40, 40], valid_rows=(0, 200), out_px=120)
    assert crop is not None and crop.shape == (120, 120, 3)
    white = np.all(crop > 200, axis=2)  # the antialiased contour; turbo's colours never have all three
    assert white.sum() > 100
    assert not white[60, 60]  # inside it: colour, not the line
    assert tuple(crop[2, 2]) == (48, 48, 48)  # far outside: the dark background
