"""Periodic families: planted roll marks with known period and phase, among missing prints and
random defects; the 2p and p/2 traps; two rolls at one CD; no family on random defects; roll
matching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.coil.model import CoilDefect
from pipeline.coil.periodic import find_families, match_roll
from pipeline.config import PeriodicConfig, RollConfig

CFG = PeriodicConfig()  # lane 20 mm, MD tolerance 15 mm, periods 0.3..20 m, confirmed at 4 prints
ROLLS = [
    RollConfig(name="work roll top", circumference_mm=1759.3, side="top"),
    RollConfig(name="work roll bottom", circumference_mm=1727.9, side="bottom"),
    RollConfig(name="backup roll top", circumference_mm=4398.2, side="top"),
    RollConfig(name="bridle roll", circumference_mm=3141.6, side="both"),
]


def defect(md_m: float, cd_mm: float, side: str = "top") -> CoilDefect:
    return CoilDefect(
        coil_id="C1",
        side=side,
        md_m=float(md_m),
        cd_mm=float(cd_mm),
        length_mm=4.0,
        width_mm=4.0,
        area_mm2=16.0,
        score=3.0,
        cameras=("cam0",),
        sources=("cam0:1",),
    )


def prints(
    period: float,
    phase: float,
    cd: float,
    slots: range | list[int],
    *,
    side: str = "top",
    rng: np.random.Generator | None = None,
) -> list[CoilDefect]:
    """A roll mark's prints at ``slots``, MD exact to ~1 mm and CD to ~2 mm when ``rng`` jitters them."""
    out = []
    for n in slots:
        md, x = phase + n * period, cd
        if rng is not None:
            md += rng.uniform(-0.001, 0.001)
            x += rng.uniform(-2.0, 2.0)
        out.append(defect(md, x, side))
    return out


def scatter(
    rng: np.random.Generator,
    count: int,
    *,
    length_m: float = 300.0,
    width_mm: float = 1500.0,
    sides: tuple[str, ...] = ("top",),
) -> list[CoilDefect]:
    return [
        defect(rng.uniform(0, length_m), rng.uniform(0, width_mm), sides[int(rng.integers(len(sides)))])
        for _ in range(count)
    ]


def find(defects: list[CoilDefect], cfg: PeriodicConfig = CFG) -> list:
    return find_families(defects, cfg=cfg, rolls=ROLLS, roll_tolerance=0.02)


def test_clean_family_comes_back_with_its_period_phase_and_roll() -> None:
    rng = np.random.default_rng(0)
    (fam,) = find(prints(1.7593, 12.5, 400.0, range(8), rng=rng))
    assert fam.side == "top" and fam.roll == "work roll top"
    assert fam.period_m == pytest.approx(1.7593, rel=1e-3)
    assert fam.phase_m == pytest.approx(12.5, abs=0.002)
    assert fam.count == 8 and fam.confidence == 1.0 and fam.confirmed
    assert fam.cd_mm == pytest.approx(400.0, abs=2.0)
    assert len(fam.md_m) == 8 and list(fam.md_m) == sorted(fam.md_m)
    assert fam.md_m[0] == pytest.approx(12.5, abs=0.002)


@settings(max_examples=60, deadline=None)
@given(
    period=st.floats(0.5, 15.0),
    phase=st.floats(0.0, 30.0),
    total=st.integers(10, 40),
    cd=st.floats(30.0, 1470.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_period_within_a_thousandth_with_up_to_a_fifth_of_the_prints_missing(
    period: float, phase: float, total: int, cd: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    # The first and last prints stay; at most a fifth of the others go (p still fills its grid
    # better than 2p: see the traps below).
    inner = np.arange(1, total - 1)
    gone = set(rng.choice(inner, size=int(rng.integers(0, total // 5 + 1)), replace=False).tolist())
    slots = [n for n in range(total) if n not in gone]
    (fam,) = find(prints(period, phase, cd, slots, rng=rng))
    assert fam.period_m == pytest.approx(period, rel=1e-3)
    assert fam.phase_m == pytest.approx(phase, abs=0.003)
    assert fam.count == len(slots) and fam.confidence == pytest.approx(len(slots) / total)
    assert fam.confirmed


def test_missing_prints_and_random_defects_in_the_same_and_other_lanes_do_not_break_a_family() -> None:
    rng = np.random.default_rng(7)
    # 60 revolutions of a 1.7593 m roll; every fifth print below threshold, 6 more under an outage.
    slots = [n for n in range(60) if n % 5 != 3 and not 30 <= n < 36]
    mark = prints(1.7593, 4.0, 800.0, slots, rng=rng)
    same_lane = [defect(rng.uniform(0, 110), 800.0 + rng.uniform(-15, 15)) for _ in range(25)]
    elsewhere = scatter(rng, 150, length_m=110.0)
    fams = find(mark + same_lane + elsewhere)
    confirmed = [f for f in fams if f.confirmed]
    assert len(confirmed) == 1
    fam = confirmed[0]
    assert fam.period_m == pytest.approx(1.7593, rel=1e-3) and fam.roll == "work roll top"
    # Every print is a member; a random defect may land on the grid by chance, but not many.
    assert {round(d.md_m, 6) for d in mark} <= {round(m, 6) for m in fam.md_m}
    assert len(slots) <= fam.count <= len(slots) + 2
    assert fam.confidence == pytest.approx(len(slots) / 60, abs=0.05)


def test_two_sides_are_searched_apart_and_sorted_by_side() -> None:
    rng = np.random.default_rng(3)
    top = prints(1.7593, 2.0, 500.0, range(10), rng=rng)
    bottom = prints(1.7279, 3.0, 500.0, range(10), side="bottom", rng=rng)
    fams = find(top + bottom)
    assert [f.side for f in fams] == ["bottom", "top"]
    assert fams[0].period_m == pytest.approx(1.7279, rel=1e-3) and fams[0].roll == "work roll bottom"
    assert fams[1].period_m == pytest.approx(1.7593, rel=1e-3) and fams[1].roll == "work roll top"
    assert all(f.count == 10 for f in fams)


def test_two_rolls_at_one_cd_are_two_families() -> None:
    rng = np.random.default_rng(11)
    work = prints(1.7593, 1.3, 600.0, range(30), rng=rng)  # 51 m
    backup = prints(4.3982, 2.9, 605.0, range(12), rng=rng)  # 48 m
    fams = find(work + backup)
    assert sorted(round(f.period_m, 2) for f in fams) == [1.76, 4.40]
    by_period = {round(f.period_m, 2): f for f in fams}
    assert by_period[1.76].count == 30 and by_period[1.76].roll == "work roll top"
    assert by_period[4.40].count == 12 and by_period[4.40].roll == "backup roll top"
    assert by_period[4.40].period_m == pytest.approx(4.3982, rel=1e-3)
    assert not set(by_period[1.76].md_m) & set(by_period[4.40].md_m)


def test_every_print_present_gives_p_not_2p() -> None:
    (fam,) = find(prints(2.0, 1.0, 300.0, range(12), rng=np.random.default_rng(1)))
    assert fam.period_m == pytest.approx(2.0, rel=1e-3) and fam.count == 12


def test_nothing_at_the_half_way_points_gives_p_not_half_p() -> None:
    # A random defect on one half-way point does not turn p into p / 2 either.
    rng = np.random.default_rng(2)
    mark = prints(3.0, 1.0, 300.0, range(10), rng=rng)
    (fam,) = [f for f in find([*mark, defect(1.0 + 4.5 * 3.0, 302.0)]) if f.confirmed]
    assert fam.period_m == pytest.approx(3.0, rel=1e-3) and fam.count == 10


def test_every_other_print_missing_is_a_family_of_twice_the_period() -> None:
    # Nothing tells these prints from a roll twice as long: the grid the members fill is 2p.
    (fam,) = find(prints(1.5, 1.0, 300.0, range(0, 20, 2)))
    assert fam.period_m == pytest.approx(3.0, rel=1e-3) and fam.confidence == 1.0


def test_a_family_with_no_two_consecutive_prints_is_found_from_a_sub_multiple() -> None:
    (fam,) = find(prints(1.2, 5.0, 300.0, [0, 2, 5, 7, 10, 12]))
    assert fam.period_m == pytest.approx(1.2, rel=1e-3)
    assert fam.count == 6 and fam.confidence == pytest.approx(6 / 13)


def test_a_long_outage_is_bridged() -> None:
    slots = [*range(10), *range(25, 35)]
    (fam,) = find(prints(2.5133, 0.5, 900.0, slots, rng=np.random.default_rng(4)))
    assert fam.count == 20 and fam.confidence == pytest.approx(20 / 35)
    assert fam.roll is None  # the deflector roll is not in this table
    assert fam.period_m == pytest.approx(2.5133, rel=1e-3)


def test_three_prints_make_a_family_and_confirm_repeats_confirms_it() -> None:
    assert find(prints(2.0, 1.0, 300.0, range(2))) == []
    (three,) = find(prints(2.0, 1.0, 300.0, range(3)))
    assert three.count == 3 and not three.confirmed
    (four,) = find(prints(2.0, 1.0, 300.0, range(4)))
    assert four.count == 4 and four.confirmed
    (strict,) = find(prints(2.0, 1.0, 300.0, range(4)), PeriodicConfig(confirm_repeats=5))
    assert not strict.confirmed


def test_periods_outside_the_search_range_are_not_families() -> None:
    assert find(prints(25.0, 1.0, 300.0, range(8))) == []
    assert find(prints(0.2, 1.0, 300.0, range(8))) == []
    (fam,) = find(prints(25.0, 1.0, 300.0, range(8)), PeriodicConfig(max_period_m=30.0))
    assert fam.period_m == pytest.approx(25.0, rel=1e-3)


def test_a_family_across_any_cd_is_one_lane_and_other_cds_stay_out() -> None:
    # CD jitter of +-8 mm around 1000 mm (no fixed lane boundary splits it); a print of the same
    # grid 60 mm away is another lane's.
    rng = np.random.default_rng(5)
    mark = [defect(1.0 + n * 2.0, 1000.0 + rng.uniform(-8, 8)) for n in range(10)]
    (fam,) = find([*mark, defect(1.0 + 10 * 2.0, 1060.0)])
    assert fam.count == 10 and fam.confidence == 1.0
    assert 992.0 <= fam.cd_mm <= 1008.0
    assert find([defect(1.0 + n * 2.0, 1000.0 + 60.0 * n) for n in range(10)]) == []


def test_prints_off_the_grid_by_more_than_the_md_tolerance_are_not_members() -> None:
    mds = [1.0 + n * 2.0 for n in range(8)]
    mds[4] += 0.030  # 30 mm off the grid (tolerance 15 mm)
    (fam,) = find([defect(m, 300.0) for m in mds])
    assert fam.count == 7 and round(mds[4], 6) not in {round(m, 6) for m in fam.md_m}


def test_uniformly_random_defects_make_no_family() -> None:
    rng = np.random.default_rng(2024)
    assert find(scatter(rng, 200, sides=("top", "bottom"))) == []


def test_a_dense_coil_of_3000_random_defects_confirms_only_the_planted_family() -> None:
    rng = np.random.default_rng(9)
    noise = scatter(rng, 3000, sides=("top", "bottom"))
    mark = prints(4.3354, 7.0, 250.0, range(0, 60), side="bottom", rng=rng)
    confirmed = [f for f in find(noise + mark) if f.confirmed]
    assert len(confirmed) == 1
    assert confirmed[0].side == "bottom" and confirmed[0].period_m == pytest.approx(4.3354, rel=1e-3)


def test_families_are_sorted_by_confidence_within_a_side() -> None:
    rng = np.random.default_rng(6)
    full = prints(2.0, 1.0, 200.0, range(10), rng=rng)
    gappy = prints(3.0, 1.5, 900.0, [0, 1, 2, 4, 5, 7, 8, 10], rng=rng)
    fams = find(gappy + full)
    assert [f.cd_mm > 500 for f in fams] == [False, True]
    assert fams[0].confidence > fams[1].confidence


def test_no_defects_and_bad_input() -> None:
    assert find([]) == []
    with pytest.raises(ValueError, match="non-finite"):
        find([defect(float("nan"), 10.0), defect(1.0, 10.0), defect(2.0, 10.0)])
    with pytest.raises(ValueError, match="roll_tolerance"):
        find_families([], cfg=CFG, rolls=ROLLS, roll_tolerance=0.0)


# Roll matching.


def test_match_roll_by_side_with_both_sides_rolls_for_either() -> None:
    assert match_roll(1.7593, "top", ROLLS, 0.005) == "work roll top"
    assert match_roll(1.7593, "bottom", ROLLS, 0.005) is None  # the top work roll does not touch the bottom
    assert match_roll(3.1416, "top", ROLLS, 0.005) == "bridle roll"
    assert match_roll(3.1416, "bottom", ROLLS, 0.005) == "bridle roll"


def test_match_roll_takes_the_closest_of_several() -> None:
    rolls = [
        RollConfig(name="a", circumference_mm=2000.0),
        RollConfig(name="b", circumference_mm=2030.0),
    ]
    assert match_roll(2.010, "top", rolls, 0.05) == "a"
    assert match_roll(2.020, "top", rolls, 0.05) == "b"
    assert match_roll(2.020, "top", list(reversed(rolls)), 0.05) == "b"


def test_match_roll_tolerance_edges_and_a_worn_roll() -> None:
    rolls = [RollConfig(name="r", circumference_mm=2000.0)]
    assert match_roll(2.0 * 1.0199, "top", rolls, 0.02) == "r"
    assert match_roll(2.0 * 1.0201, "top", rolls, 0.02) is None
    # Symmetric: shorter (a worn or reground roll) as longer (forward slip).
    assert match_roll(2.0 * 0.9801, "top", rolls, 0.02) == "r"
    assert match_roll(2.0 * 0.9799, "top", rolls, 0.02) is None
    # A work roll worn 1 % below its nominal circumference still matches at the default 2 %.
    assert match_roll(1.7593 * 0.99, "top", ROLLS, 0.02) == "work roll top"
    assert match_roll(1.7593 * 0.99, "top", ROLLS, 0.005) is None
    with pytest.raises(ValueError, match="period_m"):
        match_roll(0.0, "top", rolls, 0.02)


def test_a_worn_roll_s_family_is_matched() -> None:
    (fam,) = find(prints(1.7593 * 0.99, 3.0, 700.0, range(10), rng=np.random.default_rng(8)))
    assert fam.roll == "work roll top" and fam.period_m == pytest.approx(1.7593 * 0.99, rel=1e-3)


def test_a_chance_defect_on_the_grid_far_from_the_family_is_not_a_member() -> None:
    rng = np.random.default_rng(12)
    mark = prints(2.0, 1.0, 300.0, range(20), rng=rng)
    stray = defect(1.0 + 60 * 2.0, 301.0)  # on the grid, 40 empty slots after the last print
    noise = [defect(rng.uniform(0, 130), 300.0 + rng.uniform(-15, 15)) for _ in range(10)]
    (fam,) = [f for f in find([*mark, stray, *noise]) if f.confirmed]
    assert fam.count == 20 and fam.confidence == 1.0
    assert max(fam.md_m) < 60.0


def test_six_long_roll_marks_on_a_crowded_map_each_at_its_own_period() -> None:
    # Locally a complete grid of 5p looks as good as p: every family must come out at p anyway,
    # beside a lane crowded with 600 random defects.
    rng = np.random.default_rng(8)  # a map where one family is first grown at 3p and 6p
    defects = scatter(rng, 2000, sides=("top", "bottom"))
    planted = []
    for k in range(6):
        period, phase, side, cd = rng.uniform(0.5, 5), rng.uniform(0, 1), ("top", "bottom")[k % 2], rng.uniform(0, 1500)
        slots = [n for n in range(int(300 / period)) if rng.uniform() > 0.1]
        planted.append((side, period))
        defects += prints(period, phase, cd, slots, side=side, rng=rng)
    defects += [defect(rng.uniform(0, 300), 750 + rng.uniform(-5, 5)) for _ in range(600)]
    fams = find(defects)
    assert all(f.confirmed for f in fams)
    got = sorted((f.side, round(f.period_m, 3)) for f in fams)
    assert got == sorted((side, round(period, 3)) for side, period in planted)
    assert all(f.confidence > 0.8 for f in fams)


def test_a_full_width_transverse_mark_gives_families_across_the_width_at_its_period() -> None:
    # 30 defects across the width at every print: a lane's own print must not hide behind the others.
    rng = np.random.default_rng(13)
    marks = [
        defect(1.0 + n * 3.3 + rng.uniform(-0.001, 0.001), rng.uniform(0, 1500)) for n in range(12) for _ in range(30)
    ]
    fams = find(marks)
    # Where neighbouring lanes took every other print of a lane, what is left fills a 2p grid.
    assert all(f.period_m / 3.3 == pytest.approx(round(f.period_m / 3.3), rel=1e-3) for f in fams)
    assert sum(f.period_m == pytest.approx(3.3, rel=1e-3) for f in fams) >= 15
    assert all(f.confirmed for f in fams)


def test_a_tolerance_as_wide_as_half_the_shortest_period_is_refused() -> None:
    with pytest.raises(ValueError, match="md_tolerance_mm"):
        find(prints(2.0, 1.0, 300.0, range(5)), PeriodicConfig(md_tolerance_mm=150.0, min_period_m=0.3))
