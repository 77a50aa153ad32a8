"""Coil grading: every rule kind broken and not broken, the worst disposition wins, a live coil."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.coil.grading import MIN_DENSITY_LENGTH_M, grade_coil, uninspected_m
from pipeline.coil.model import CoilDefect, Grading, PeriodicFamily, Uninspected
from pipeline.config import (
    DISPOSITIONS,
    CoilConfig,
    DensityRule,
    EdgeRule,
    GradeRule,
    PeriodicRule,
    SizeRule,
    UninspectedRule,
)


def defect(
    md_m: float = 1.0,
    cd_mm: float = 500.0,
    *,
    area: float = 10.0,
    width: float = 4.0,
    klass: str | None = None,
    side: str = "top",
) -> CoilDefect:
    return CoilDefect(
        coil_id="C1",
        side=side,
        md_m=md_m,
        cd_mm=cd_mm,
        length_mm=area / width,
        width_mm=width,
        area_mm2=area,
        score=3.0,
        cameras=("cam0",),
        sources=("cam0:1",),
        klass=klass,
    )


def family(*, confirmed: bool) -> PeriodicFamily:
    return PeriodicFamily(
        side="top",
        cd_mm=400.0,
        period_m=1.7593,
        phase_m=2.0,
        count=5 if confirmed else 3,
        confidence=1.0,
        md_m=(2.0, 3.7593, 5.5186),
        confirmed=confirmed,
        roll="work roll top",
    )


def stretch(md_from: float, md_to: float, *, side: str = "top", camera: str = "cam0") -> Uninspected:
    return Uninspected(
        coil_id="C1",
        side=side,
        camera=camera,
        md_from_m=md_from,
        md_to_m=md_to,
        cd_from_mm=0.0,
        cd_to_mm=800.0,
        reason="camera offline",
    )


def grade(
    rules: list[GradeRule],
    defects: list[CoilDefect] | None = None,
    *,
    families: list[PeriodicFamily] | None = None,
    length_m: float = 200.0,
    width_mm: float | None = 1500.0,
    uninspected: list[Uninspected] | None = None,
    final: bool = True,
) -> Grading:
    return grade_coil(
        grade="DC04",
        rules=rules,
        defects=defects or [],
        families=families or [],
        length_m=length_m,
        width_mm=width_mm,
        uninspected=uninspected or [],
        final=final,
    )


def test_density_counts_per_100_m_and_breaks_above_the_limit() -> None:
    rule = DensityRule(max_per_100m=2.0, disposition="secondary")
    at_limit = grade([rule], [defect(md_m=float(i)) for i in range(4)])  # 4 on 200 m = 2 per 100 m
    (o,) = at_limit.outcomes
    assert o.rule == "at most 2 defects per 100 m (all classes)"
    assert o.measured == pytest.approx(2.0) and o.limit == 2.0 and not o.broken and o.disposition == "prime"
    assert at_limit.disposition == "prime" and at_limit.grade == "DC04" and at_limit.final
    over = grade([rule], [defect(md_m=float(i)) for i in range(5)])
    assert over.outcomes[0].measured == pytest.approx(2.5) and over.outcomes[0].broken
    assert over.disposition == "secondary" and over.outcomes[0].disposition == "secondary"


def test_density_counts_only_large_enough_defects_of_the_listed_classes() -> None:
    rule = DensityRule(max_per_100m=1.0, min_area_mm2=50.0, classes=["scratch", "roll mark"], disposition="hold")
    defects = [
        defect(area=60.0, klass="scratch"),
        defect(area=50.0, klass="roll mark"),  # exactly the minimum area counts
        defect(area=49.0, klass="scratch"),  # too small
        defect(area=500.0, klass="scale"),  # another class
        defect(area=500.0),  # not classified: not one of the listed classes
    ]
    (o,) = grade([rule], defects, length_m=100.0).outcomes
    assert o.rule == "at most 1 defects >= 50 mm² per 100 m (classes: scratch, roll mark)"
    assert o.measured == pytest.approx(2.0) and o.broken and o.disposition == "hold"
    # Without a class list every large enough defect counts, classified or not.
    (all_classes,) = grade([DensityRule(max_per_100m=1.0, min_area_mm2=50.0)], defects, length_m=100.0).outcomes
    assert all_classes.rule == "at most 1 defects >= 50 mm² per 100 m (all classes)"
    assert all_classes.measured == pytest.approx(4.0)


def test_a_live_coil_is_graded_on_its_length_so_far_and_a_new_one_does_not_divide_by_zero() -> None:
    rule = DensityRule(max_per_100m=10.0)
    live = grade([rule], [defect(md_m=2.0), defect(md_m=4.0)], length_m=5.0, final=False)
    assert not live.final and live.outcomes[0].measured == pytest.approx(40.0) and live.disposition == "secondary"
    # Later in the same coil: the same two defects over 50 m are within the limit.
    later = grade([rule], [defect(md_m=2.0), defect(md_m=4.0)], length_m=50.0, final=False)
    assert later.outcomes[0].measured == pytest.approx(4.0) and later.disposition == "prime"
    empty = grade([rule], [], length_m=0.0, final=False)
    assert empty.outcomes[0].measured == 0.0 and empty.disposition == "prime"
    first = grade([rule], [defect(md_m=0.0)], length_m=0.0, final=False)
    assert first.outcomes[0].measured == pytest.approx(100.0 / MIN_DENSITY_LENGTH_M)


def test_edge_rule_checks_both_edges_by_the_defect_box() -> None:
    rule = EdgeRule(edge_mm=30.0, max_area_mm2=20.0, disposition="secondary")
    big = 25.0
    (o,) = grade([rule], [defect(cd_mm=500.0, area=400.0)]).outcomes  # large, but mid-strip
    assert o.rule == "no defect larger than 20 mm² within 30 mm of either strip edge"
    assert o.measured == 0.0 and not o.broken
    # Centre 40 mm from the reference edge, 24 mm wide: the box reaches 28 mm, inside the zone.
    (left,) = grade([rule], [defect(cd_mm=40.0, width=24.0, area=big)]).outcomes
    assert left.broken and left.measured == big
    (clear,) = grade([rule], [defect(cd_mm=40.0, width=8.0, area=big)]).outcomes  # box from 36 mm
    assert not clear.broken
    (right,) = grade([rule], [defect(cd_mm=1475.0, width=4.0, area=big)]).outcomes  # box to 1477, zone from 1470
    assert right.broken and right.disposition == "secondary"
    (small,) = grade([rule], [defect(cd_mm=10.0, area=20.0)]).outcomes  # exactly the limit
    assert not small.broken and small.measured == 20.0


def test_edge_rule_without_the_coil_width_checks_the_reference_edge_only_and_says_so() -> None:
    rule = EdgeRule(edge_mm=30.0, max_area_mm2=20.0)
    (far,) = grade([rule], [defect(cd_mm=1475.0, area=25.0)], width_mm=None).outcomes
    assert "coil width unknown" in far.rule and "far edge not checked" in far.rule
    assert not far.broken
    (near,) = grade([rule], [defect(cd_mm=5.0, area=25.0)], width_mm=None).outcomes
    assert near.broken


def test_size_rule_takes_the_largest_defect() -> None:
    rule = SizeRule(max_area_mm2=500.0, disposition="scrap")
    (none,) = grade([rule], []).outcomes
    assert none.rule == "no defect larger than 500 mm²" and none.measured == 0.0 and not none.broken
    ok = grade([rule], [defect(area=100.0), defect(area=500.0)])
    assert ok.outcomes[0].measured == 500.0 and ok.disposition == "prime"
    bad = grade([rule], [defect(area=100.0), defect(area=501.0)])
    assert bad.outcomes[0].measured == 501.0 and bad.disposition == "scrap"


def test_periodic_rule_is_broken_by_a_confirmed_family_only() -> None:
    rule = PeriodicRule(disposition="hold")
    unconfirmed = grade([rule], families=[family(confirmed=False)])
    assert unconfirmed.outcomes[0].measured == 0.0 and unconfirmed.disposition == "prime"
    confirmed = grade([rule], families=[family(confirmed=False), family(confirmed=True)])
    (o,) = confirmed.outcomes
    assert o.rule == "no confirmed periodic defect (roll mark)" and o.measured == 1.0 and o.limit == 0.0
    assert o.broken and confirmed.disposition == "hold"


def test_uninspected_is_the_union_per_side_and_the_worse_side_counts() -> None:
    stretches = [
        stretch(10.0, 20.0, camera="cam0"),
        stretch(15.0, 25.0, camera="cam1"),  # overlaps cam0's: 10..25 is 15 m, not 20
        stretch(40.0, 42.0, camera="cam0"),
        stretch(0.0, 12.0, side="bottom", camera="cam2"),
    ]
    assert uninspected_m(stretches, 200.0) == pytest.approx(17.0)
    assert uninspected_m(stretches[3:], 200.0) == pytest.approx(12.0)
    assert uninspected_m([], 200.0) == 0.0
    # Clipped to the coil: a stretch past its tail counts only up to it.
    assert uninspected_m([stretch(190.0, 260.0), stretch(-5.0, 2.0)], 200.0) == pytest.approx(12.0)
    rule = UninspectedRule(max_m=17.0, disposition="hold")
    (o,) = grade([rule], uninspected=stretches).outcomes
    assert o.rule == "at most 17 m uninspected (either side)" and o.measured == pytest.approx(17.0)
    assert not o.broken
    worse = grade([rule], uninspected=[*stretches, stretch(100.0, 100.5, camera="cam1")])
    assert worse.outcomes[0].broken and worse.disposition == "hold"
    with pytest.raises(ValueError, match="cam0"):
        uninspected_m([stretch(5.0, 4.0)], 200.0)


def test_the_worst_broken_rule_decides_and_every_rule_has_its_outcome_in_order() -> None:
    rules: list[GradeRule] = [
        DensityRule(max_per_100m=0.1, disposition="secondary"),
        SizeRule(max_area_mm2=50.0, disposition="scrap"),
        PeriodicRule(disposition="hold"),
        UninspectedRule(max_m=1.0, disposition="hold"),
    ]
    coil = grade(rules, [defect(area=100.0)], families=[family(confirmed=True)])
    assert [o.broken for o in coil.outcomes] == [True, True, True, False]
    assert [o.disposition for o in coil.outcomes] == ["secondary", "scrap", "hold", "prime"]
    assert coil.disposition == "scrap"
    # Without the large defect the density rule (secondary) and the roll mark (hold) remain: hold.
    milder = grade(rules, [defect(area=10.0)], families=[family(confirmed=True)])
    assert milder.disposition == "hold"
    assert grade(rules, []).disposition == "prime"
    assert grade([], [defect(area=1e6)]).disposition == "prime"  # a grade without rules


def test_the_example_grades_of_the_default_config() -> None:
    grades = CoilConfig().grades
    clean = grade(grades["DC04"], [defect(area=10.0, md_m=50.0)], length_m=100.0)
    assert clean.disposition == "prime" and len(clean.outcomes) == len(grades["DC04"])
    edge_scratch = grade(grades["DC04"], [defect(area=30.0, cd_mm=10.0, md_m=50.0)], length_m=100.0)
    assert edge_scratch.disposition == "secondary"
    assert grade(grades["DC01"], [defect(area=30.0, cd_mm=10.0)], length_m=100.0).disposition == "prime"


def test_bad_lengths_and_widths_are_refused() -> None:
    with pytest.raises(ValueError, match="length_m"):
        grade([], length_m=-1.0)
    with pytest.raises(ValueError, match="length_m"):
        grade([], length_m=float("nan"))
    with pytest.raises(ValueError, match="width_mm"):
        grade([], width_mm=0.0)


_rules = st.lists(
    st.one_of(
        st.builds(
            DensityRule,
            max_per_100m=st.floats(0, 20),
            min_area_mm2=st.floats(0, 200),
            disposition=st.sampled_from(DISPOSITIONS),
        ),
        st.builds(
            EdgeRule,
            edge_mm=st.floats(1, 100),
            max_area_mm2=st.floats(0, 200),
            disposition=st.sampled_from(DISPOSITIONS),
        ),
        st.builds(SizeRule, max_area_mm2=st.floats(0, 500), disposition=st.sampled_from(DISPOSITIONS)),
        st.builds(PeriodicRule, disposition=st.sampled_from(DISPOSITIONS)),
        st.builds(UninspectedRule, max_m=st.floats(0, 20), disposition=st.sampled_from(DISPOSITIONS)),
    ),
    max_size=6,
)
_defects = st.lists(
    st.builds(
        defect, md_m=st.floats(0, 100), cd_mm=st.floats(0, 1500), area=st.floats(0.1, 1000), width=st.floats(0.5, 50)
    ),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(
    rules=_rules,
    defects=_defects,
    extra=st.builds(
        defect, md_m=st.floats(0, 100), cd_mm=st.floats(0, 1500), area=st.floats(0.1, 1000), width=st.floats(0.5, 50)
    ),
)
def test_disposition_is_the_worst_broken_rule_and_one_more_defect_never_improves_it(
    rules: list[GradeRule], defects: list[CoilDefect], extra: CoilDefect
) -> None:
    before = grade(rules, defects, length_m=100.0)
    worst = max((DISPOSITIONS.index(o.disposition) for o in before.outcomes if o.broken), default=0)
    assert before.disposition == DISPOSITIONS[worst]
    assert len(before.outcomes) == len(rules)
    assert all(o.broken == (o.measured > o.limit) for o in before.outcomes)
    after = grade(rules, [*defects, extra], length_m=100.0)
    assert DISPOSITIONS.index(after.disposition) >= DISPOSITIONS.index(before.disposition)
