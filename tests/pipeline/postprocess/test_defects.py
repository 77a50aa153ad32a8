import numpy as np
import pytest

from pipeline.postprocess.defects import extract_defects
from pipeline.transport.messages import Frame


def _frame(valid_from: int = 0, valid_to: int = 100) -> Frame:
    return Frame(
        frame_id=3,
        camera_id="c",
        pixels=np.zeros((100, 200, 1), np.uint8),
        first_line=1000,
        valid_from=valid_from,
        valid_to=valid_to,
        capture_time=0.0,
        md_m=2.0,
    )


def test_regions_become_defects_in_strip_units() -> None:
    amap = np.zeros((100, 200), np.float32)
    amap[40:50, 60:80] = 5.0
    amap[45, 70] = 9.0
    amap[90:92, 10:11] = 5.0  # 2 px: below the minimum area
    (d,) = extract_defects(
        amap, frame=_frame(), threshold=1.0, min_area_px=4, mm_per_px=0.5, mm_per_line=2.0, strip_left_px=20.0
    )
    assert d.box == (60, 40, 20, 10) and d.area_px == 200
    assert d.max_score == 9.0 and d.mean_score == pytest.approx((199 * 5 + 9) / 200)
    assert d.md_m == pytest.approx(2.0 + 44.5 * 2.0 / 1000)
    assert d.cd_mm == pytest.approx((69.5 - 20.0) * 0.5)
    assert (d.length_mm, d.width_mm, d.area_mm2) == (20.0, 10.0, 200.0)


def test_region_outside_valid_rows_belongs_to_the_neighbour() -> None:
    amap = np.zeros((100, 200), np.float32)
    amap[2:6, 10:20] = 3.0
    amap[50:54, 10:20] = 3.0
    found = extract_defects(
        amap, frame=_frame(valid_from=16, valid_to=84), threshold=1.0, min_area_px=1, mm_per_px=1.0, mm_per_line=1.0
    )
    assert [d.box[1] for d in found] == [50]


def test_a_region_belongs_to_the_frame_holding_its_first_row() -> None:
    # A long region across the boundary of the valid rows: reported by the frame where it
    # starts, whatever its centre, so a map cut off outside the band cannot double-report it.
    amap = np.zeros((100, 200), np.float32)
    amap[70:99, 10:20] = 3.0  # starts inside [16, 84), centre outside
    amap[5:40, 50:60] = 3.0  # centre inside, starts in the overlap above
    found = extract_defects(
        amap, frame=_frame(valid_from=16, valid_to=84), threshold=1.0, min_area_px=1, mm_per_px=1.0, mm_per_line=1.0
    )
    assert [(d.box[0], d.box[1]) for d in found] == [(10, 70)]
