import math

import numpy as np
import pytest

from pipeline.inference.scoring import anomaly_map, gaussian_kernel_size, reweighted_image_score


def test_reweighting_matches_paper_formula() -> None:
    s_star = 2.0
    d = np.array([2.0, 2.5, 3.0, 4.0])
    expected = (1 - math.exp(s_star) / sum(math.exp(x) for x in d)) * s_star
    assert reweighted_image_score(s_star, d) == pytest.approx(expected, rel=1e-12)


def test_reweighting_without_neighbourhood_is_s_star() -> None:
    assert reweighted_image_score(3.5, np.array([3.5])) == 3.5


def test_reweighting_does_not_overflow_for_large_distances() -> None:
    s = reweighted_image_score(900.0, np.array([900.0, 901.0, 905.0]))
    assert math.isfinite(s) and 0 < s < 900.0


def test_sparse_neighbourhood_weighs_more() -> None:
    # m* far from its bank neighbours (rare normal pattern): the test patch's score counts more.
    dense = reweighted_image_score(2.0, np.array([2.0, 2.01, 2.02]))
    sparse = reweighted_image_score(2.0, np.array([2.0, 6.0, 7.0]))
    # w = 1 - 1 / sum_j exp(d_j - s*): far neighbours make the sum large and w close to 1.
    assert dense < sparse <= 2.0
    assert dense < 2.0 * 0.7


def test_anomaly_map_constant_stays_constant() -> None:
    amap = anomaly_map(np.full((6, 9), 1.5, np.float32), stride=8, out_hw=(50, 75), sigma=4.0)
    assert amap.shape == (50, 75) and amap.dtype == np.float32
    np.testing.assert_allclose(amap, 1.5, rtol=1e-6)


def test_anomaly_map_places_patch_on_its_cell() -> None:
    grid = np.zeros((8, 10), np.float32)
    grid[3, 6] = 1.0
    amap = anomaly_map(grid, stride=8, out_hw=(64, 80), sigma=0.0)
    y, x = np.unravel_index(np.argmax(amap), amap.shape)
    assert 3 * 8 <= y < 4 * 8 and 6 * 8 <= x < 7 * 8


def test_anomaly_map_smoothing_spreads_but_keeps_peak_location() -> None:
    grid = np.zeros((8, 8), np.float32)
    grid[4, 4] = 1.0
    sharp = anomaly_map(grid, stride=8, out_hw=(64, 64), sigma=0.0)
    smooth = anomaly_map(grid, stride=8, out_hw=(64, 64), sigma=4.0)
    assert smooth.max() < sharp.max()
    assert np.unravel_index(np.argmax(smooth), smooth.shape) == pytest.approx((35.5, 35.5), abs=1.5)
    assert gaussian_kernel_size(4.0) == 33


def test_anomaly_map_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        anomaly_map(np.zeros(5, np.float32), stride=8, out_hw=(8, 8), sigma=1.0)
