"""The one region rule: planted rectangles, per-column thresholds, a band edge, the minimum area."""

import numpy as np
import pytest

from pipeline.postprocess.regions import band_of, find_regions, per_column, region_columns


def test_planted_rectangles_come_back_with_their_stats() -> None:
    amap = np.zeros((60, 80), np.float32)
    amap[10:20, 5:25] = 2.0  # 10 x 20
    amap[12, 7] = 7.0
    amap[40:43, 60:70] = 3.0  # 3 x 10
    found = find_regions(amap, threshold=1.0, min_area_px=1)
    a, b = found.regions
    assert a.box == (5, 10, 20, 10) and a.area_px == 200 and a.centroid == pytest.approx((14.5, 14.5))
    assert a.peak == 7.0 and a.mean == pytest.approx((199 * 2 + 7) / 200) and a.column == 14 and a.threshold == 1.0
    assert b.box == (60, 40, 10, 3) and b.area_px == 30 and b.peak == b.mean == 3.0 and b.column == 64
    # The label image holds the counted regions, numbered in the order returned.
    assert (found.labels == 1).sum() == 200 and (found.labels == 2).sum() == 30
    assert set(np.unique(found.labels)) == {0, 1, 2}


def test_above_is_strict_and_corners_connect() -> None:
    amap = np.zeros((10, 10), np.float32)
    amap[2, 2] = amap[3, 3] = amap[4, 4] = 5.0  # a diagonal: one region by 8-connectivity
    amap[8, 8] = 1.0  # equal to the threshold: not hot
    (r,) = find_regions(amap, threshold=1.0, min_area_px=1).regions
    assert r.area_px == 3 and r.box == (2, 2, 3, 3)


def test_minimum_area_drops_small_regions_from_the_label_image_too() -> None:
    amap = np.zeros((30, 30), np.float32)
    amap[2:4, 2:4] = 5.0  # 4 px
    amap[10:13, 10:13] = 5.0  # 9 px
    found = find_regions(amap, threshold=1.0, min_area_px=5)
    assert [r.area_px for r in found.regions] == [9]
    assert found.labels[2:4, 2:4].max() == 0 and (found.labels == 1).sum() == 9
    assert len(find_regions(amap, threshold=1.0, min_area_px=4).regions) == 2
    assert len(find_regions(amap, threshold=1.0, min_area_px=10).regions) == 0


def test_per_column_thresholds_hold_each_pixel_to_its_own_column() -> None:
    amap = np.full((20, 40), 3.0, np.float32)
    cols = per_column([0, 20, 40], [2.0, 4.0])  # left band hot, right band not
    (r,) = find_regions(amap, threshold=cols, min_area_px=1).regions
    assert r.box == (0, 0, 20, 20) and r.threshold == 2.0
    with pytest.raises(ValueError, match="one per column"):
        find_regions(amap, threshold=np.ones(39, np.float32), min_area_px=1)


def test_a_region_across_a_band_edge_is_one_region_in_the_band_of_its_centroid() -> None:
    edges = [0, 32, 64]
    cols = per_column(edges, [1.0, 2.0])
    amap = np.zeros((16, 64), np.float32)
    amap[4:8, 26:36] = 3.0  # hot in both bands, 6 columns left of the edge, 4 right
    (r,) = find_regions(amap, threshold=cols, min_area_px=1).regions
    assert r.box == (26, 4, 10, 4) and r.centroid[0] == pytest.approx(30.5)
    assert band_of(r.column, edges) == 0 and r.threshold == 1.0
    # Pixels between the two thresholds are hot only on the low band's side: the region is cut
    # at the edge and its centroid moves with it.
    amap[4:8, 26:36] = 1.5
    (r,) = find_regions(amap, threshold=cols, min_area_px=1).regions
    assert r.box == (26, 4, 6, 4) and band_of(r.column, edges) == 0
    amap[4:8, 26:36] = 0.0
    amap[4:8, 30:42] = 3.0  # centroid right of the edge
    (r,) = find_regions(amap, threshold=cols, min_area_px=1).regions
    assert band_of(r.column, edges) == 1 and r.threshold == 2.0


def test_first_rows_keep_the_regions_that_start_there() -> None:
    amap = np.zeros((100, 20), np.float32)
    amap[5:30, 2:4] = 2.0  # starts above the rows, reaches into them
    amap[70:99, 8:10] = 2.0  # starts inside, ends below
    found = find_regions(amap, threshold=1.0, min_area_px=1, first_rows=(16, 84))
    assert [r.box[1] for r in found.regions] == [70]
    assert found.labels[5:30, 2:4].max() == 0


def test_band_of() -> None:
    assert [band_of(c, [0, 10, 20]) for c in (0, 9, 10, 19)] == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        band_of(20, [0, 10, 20])


@pytest.mark.parametrize("seed", range(4))
def test_random_maps_match_a_scipy_reference(seed: int) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    amap = rng.random((48, 64)).astype(np.float32)
    cols = per_column([0, 20, 64], [0.7, 0.8])
    found = find_regions(amap, threshold=cols, min_area_px=3)
    ref, n = ndimage.label(amap > cols[None, :], structure=np.ones((3, 3)))
    expected = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(ref == k)
        if ys.size >= 3:
            v = amap[ys, xs]
            box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
            expected.append((box, ys.size, float(v.max()), float(v.mean(dtype=np.float64)), int(xs.mean())))
    got = sorted((r.box, r.area_px, r.peak, r.mean, r.column) for r in found.regions)
    assert len(got) == len(expected) > 5
    for g, e in zip(got, sorted(expected), strict=True):
        assert g[:3] == e[:3] and g[3] == pytest.approx(e[3], rel=1e-9) and g[4] == e[4]
    # The counting path sees the same regions.
    counted = region_columns(amap, threshold=cols, min_area_px=3)
    assert sorted(counted.tolist()) == sorted(r.column for r in found.regions)
