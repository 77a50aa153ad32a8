"""The coil map's geometry: to scale in each axis, sides apart, the report's colours."""

from __future__ import annotations

import pytest

from pipeline.coil.model import CoilDefect, PeriodicFamily, Uninspected
from pipeline.coil.report_data import class_colours
from pipeline.ui import coilmap as cm


def d(md: float, cd: float, side: str = "top", klass: str | None = None, score: float = 3.0) -> CoilDefect:
    return CoilDefect(
        coil_id="C1",
        side=side,
        md_m=md,
        cd_mm=cd,
        length_mm=10.0,
        width_mm=5.0,
        area_mm2=40.0,
        score=score,
        cameras=("cam0",),
        sources=(f"cam0/j/{int(md)}",),
        klass=klass,
    )


def test_marks_sit_to_scale_on_their_side() -> None:
    defects = [d(0.0, 0.0), d(100.0, 1250.0), d(50.0, 625.0, "bottom", "scratch", 5.0)]
    m = cm.draw_coil_map(
        defects=defects, length_m=100.0, span_mm=(0.0, 1250.0), href=lambda x: f"/defect/{x.sources[0]}"
    )
    top, bottom = m.panels
    assert (top.side, bottom.side) == ("top", "bottom") and top.y0 < bottom.y0
    head, tail = top.marks
    assert head.x == m.x0 and tail.x == m.x1  # MD 0 at the left, the length at the right
    assert head.y == top.y0 + m.panel_h and tail.y == top.y0  # CD low at the bottom of the panel
    (mid,) = bottom.marks
    assert mid.x == pytest.approx((m.x0 + m.x1) / 2) and mid.y == pytest.approx(bottom.y0 + m.panel_h / 2)
    assert mid.href == "/defect/cam0/j/50" and "scratch" in mid.title
    assert mid.fill == class_colours(tuple(defects))["scratch"]
    # The highest score is the most opaque.
    assert mid.opacity > head.opacity
    assert top.count == 2 and bottom.count == 1


def test_cd_exaggeration_is_stated() -> None:
    m = cm.draw_coil_map(defects=[], length_m=1000.0, span_mm=(0.0, 1250.0))
    # 1000 m over the plot's width, 1.25 m over a panel's height.
    expected = (1000_000.0 / (m.x1 - m.x0)) / (1250.0 / m.panel_h)
    assert m.cd_factor == pytest.approx(expected)
    assert m.cd_label == f"CD mm (exaggerated ×{expected:.3g})"
    assert [t.label for t in m.md_ticks] == ["0", "200", "400", "600", "800", "1000"]
    assert [t.label for t in m.panels[0].cd_ticks] == ["0", "500", "1000"]


def test_stretches_families_and_reach_are_drawn() -> None:
    un = Uninspected("C1", "bottom", "cam1", 10.0, 30.0, 0.0, 625.0, "camera offline")
    fam = PeriodicFamily(
        side="top",
        cd_mm=480.0,
        period_m=2.0,
        phase_m=4.0,
        count=3,
        confidence=1.0,
        md_m=(4.0, 6.0, 8.0),
        confirmed=True,
    )
    m = cm.draw_coil_map(
        defects=[], families=[fam], uninspected=[un], length_m=100.0, span_mm=(0.0, 1250.0), reach_m={"top": 50.0}
    )
    top, bottom = m.panels
    assert len(top.rings) == 3 and not bottom.rings
    (s,) = bottom.stretches
    assert s.w == pytest.approx(0.2 * (m.x1 - m.x0)) and s.h == pytest.approx(m.panel_h / 2)
    assert top.reach_x == pytest.approx((m.x0 + m.x1) / 2) and bottom.reach_x is None


def test_a_growing_map_changes_scale_in_steps() -> None:
    assert cm.grown_length_m(0.0) == 1.0
    assert cm.grown_length_m(382.0) == 400.0
    assert cm.grown_length_m(401.0) == 450.0
    assert cm.grown_length_m(1234.0) == 1400.0
    assert [cm.nice_step(x) for x in (0.3, 3.0, 7.0, 45.0)] == [0.5, 5.0, 10.0, 50.0]


def test_bad_extents_are_refused() -> None:
    with pytest.raises(ValueError, match="length_m"):
        cm.draw_coil_map(defects=[], length_m=0.0, span_mm=(0.0, 1.0))
    with pytest.raises(ValueError, match="span_mm"):
        cm.draw_coil_map(defects=[], length_m=1.0, span_mm=(5.0, 5.0))
