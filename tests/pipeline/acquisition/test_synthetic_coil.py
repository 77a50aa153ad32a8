"""The synthetic coil: cameras side by side see one strip, and the planted ground truth, in
strip pixels and in coil coordinates, is what those cameras were shown."""

import itertools
from dataclasses import replace

import numpy as np
import pytest

from pipeline.acquisition.factory import open_source
from pipeline.acquisition.sources import SyntheticSource
from pipeline.acquisition.synthetic import PlantedDefect, SyntheticStrip, occurrences
from pipeline.acquisition.synthetic_coil import (
    BOTTOM_SEED_OFFSET,
    camera_slices,
    cd_offset_mm,
    coil_cameras,
    nominal_edges_px,
    period_error,
    planted_on_strip,
    roll_for_side,
    roll_period_lines,
    side_seed,
    to_coil,
)
from pipeline.config import CoilConfig, Config, ConfigError, SourceConfig
from pipeline.postprocess.defects import extract_defects
from pipeline.transport.messages import Frame

STRIP, FRAME, SEED = 416, 256, 5
# Three cameras overlapping by 32 px: (0, 160), (128, 160), (256, 160); the middle one sees no edge.
SLICES = camera_slices(STRIP, 3, 32)
BUSY = {"line_rate_hz": None, "defects_per_100_frames": 400, "roll_period_lines": 1500}


def _source(x0: int, width: int, *, seed: int = SEED, block_lines: int = 128, **cfg: object) -> SyntheticSource:
    settings = {**BUSY, "strip_width": STRIP, "strip_x0": x0, "block_lines": block_lines, **cfg}
    return SyntheticSource(cfg=SourceConfig.model_validate(settings), width=width, seed=seed, frame_lines=FRAME)


def _read(src: SyntheticSource, lines: int) -> np.ndarray:
    out: list[np.ndarray] = []
    while sum(b.shape[0] for b in out) < lines:
        block = src.read(timeout=1.0)
        assert block is not None  # unpaced
        out.append(block.pixels)
    return np.concatenate(out)[:lines]


def test_slices_are_exactly_the_columns_of_the_whole_strip_defects_in_the_overlaps_included() -> None:
    lines = 24 * FRAME
    whole_src = _source(0, STRIP)
    whole = _read(whole_src, lines)
    # Block sizes differ between cameras: the strip does not depend on how it is read.
    cams = [_source(x0, w, block_lines=block) for (x0, w), block in zip(SLICES, (128, 200, 333), strict=True)]
    for (x0, w), cam in zip(SLICES, cams, strict=True):
        view = _read(cam, lines)
        assert view.shape == (lines, w)
        assert np.array_equal(view, whole[:, x0 : x0 + w]), f"camera at {x0} differs from the strip"
        # One plan for the whole strip, in strip columns (planned ahead by as much as a block).
        assert [d for d in cam.planted if d.line < lines] == [d for d in whole_src.planted if d.line < lines]
    # The test means something only with defects drawn across the overlaps [128, 160) and [256, 288).
    strip = SyntheticStrip(width=STRIP, seed=SEED)
    prints = planted_on_strip(cams[0].cfg, seed=SEED, frame_lines=FRAME, first_line=0, end_line=lines)
    boxes = [strip.footprint(d) for d in prints]
    for lo, hi in ((128, 160), (256, 288)):
        assert any(f.first_col < hi and f.first_col + f.cols > lo for f in boxes), f"no defect in [{lo}, {hi})"
    # Only the outer cameras see the dark background beyond the strip edges.
    assert whole[:, :4].mean() < 40 and whole[:, -4:].mean() < 40
    assert _read(_source(*SLICES[1], plant_defects=False), FRAME).min() > 60
    # A single camera over the strip (strip_width unset) is the same strip: nothing changed for it.
    single = SyntheticSource(cfg=SourceConfig.model_validate(BUSY), width=STRIP, seed=SEED, frame_lines=FRAME)
    assert np.array_equal(_read(single, lines), whole) and single.planted == whole_src.planted


def test_a_slice_is_the_whole_strip_s_columns_bit_for_bit_before_quantisation() -> None:
    # uint8 pixels hide differences in the last bits; the float radiance does not. (OpenCV's
    # blur of a crop is not the crop of its blur near a row's end: the source does not crop first.)
    strip = SyntheticStrip(width=STRIP, seed=9)
    whole = strip.render_normal(100, 300)
    windows = [(x0, x0 + w) for x0, w in SLICES] + [(x0, STRIP) for x0 in range(300, 410, 7)] + [(0, 3), (5, 411)]
    for x0, x1 in windows:
        assert np.array_equal(strip.render_normal(100, 300, cols=(x0, x1)), whole[:, x0:x1]), (x0, x1)


def test_sliced_renders_keep_frame_by_frame_determinism() -> None:
    strip = SyntheticStrip(width=STRIP, seed=2)
    defects = [
        PlantedDefect(kind="scratch", line=90, col=150, size=40, seed=3),
        PlantedDefect(kind="roll_mark", line=40, col=140, size=14, seed=4, period=120),
    ]
    cols = (128, 288)
    whole, wmask = strip.render(37, 200, defects, cols=cols)
    parts = [strip.render(37 + s, n, defects, cols=cols) for s, n in ((0, 53), (53, 64), (117, 83))]
    assert np.array_equal(whole, np.concatenate([p[0] for p in parts]))
    assert np.array_equal(wmask, np.concatenate([p[1] for p in parts]))
    assert wmask.any()
    # Out of order (the noise blocks are cached) it is the same strip as a fresh one renders.
    strip.render(5000, 300, cols=cols)
    again, _ = strip.render(37, 200, defects, cols=cols)
    assert np.array_equal(again, whole)
    full, fmask = SyntheticStrip(width=STRIP, seed=2).render(37, 200, defects)
    assert np.array_equal(full[:, 128:288], whole) and np.array_equal(fmask[:, 128:288], wmask)
    with pytest.raises(ValueError, match="not inside"):
        strip.render(0, 10, cols=(400, 420))


def test_planted_on_strip_is_what_the_cameras_planted_print_by_print() -> None:
    lines = 30 * FRAME
    cams = [_source(x0, w) for x0, w in SLICES[:2]]
    for cam in cams:
        _read(cam, lines)
    left, right = (sorted(c.planted, key=lambda d: (d.line, d.col)) for c in cams)
    assert left == right
    expanded = [d for d in left if not d.period and d.line < lines]
    (mark,) = [d for d in left if d.period]
    expanded += [replace(mark, line=line) for line in occurrences(mark, 0, lines) if line < lines]
    truth = planted_on_strip(cams[0].cfg, seed=SEED, frame_lines=FRAME, first_line=0, end_line=lines)
    assert truth == sorted(expanded, key=lambda d: (d.line, d.col))
    assert len(truth) > 40 and sum(d.period > 0 for d in truth) == 5  # prints at 1500 k + line
    # A window of it: the prints centred in the window, none of those only reaching into it.
    window = planted_on_strip(cams[0].cfg, seed=SEED, frame_lines=FRAME, first_line=2000, end_line=5000)
    assert window == [d for d in truth if 2000 <= d.line < 5000]
    with pytest.raises(ValueError, match="not source.strip_width"):
        planted_on_strip(cams[0].cfg, seed=SEED, frame_lines=FRAME, first_line=0, end_line=9, strip_width=STRIP + 16)


def test_roll_mark_from_the_roll_table_prints_at_its_exact_period() -> None:
    mm_per_line = 2.0  # a coarse line so that a few revolutions are a short test
    roll = roll_for_side(CoilConfig().rolls, "top")
    period = roll_period_lines(roll.circumference_mm, mm_per_line)
    assert roll.name == "work roll top" and period == 880  # 1759.3 mm / 2 mm = 879.65
    assert period_error(roll.circumference_mm, mm_per_line) < 0.0005
    # At 0.5 mm per line on the work rolls the rounding moves the period by < 0.03 %.
    assert all(period_error(r.circumference_mm, 0.5) < 0.0003 for r in CoilConfig().rolls)
    cfg = {"defects_per_100_frames": 0, "roll_period_lines": period}
    lines = 3 * period + 400  # the first print is on lines [64, 320): four prints
    truth = planted_on_strip(
        SourceConfig.model_validate({**cfg, "strip_width": STRIP}),
        seed=SEED,
        frame_lines=FRAME,
        first_line=0,
        end_line=lines,
    )
    assert [d.kind for d in truth] == ["roll_mark"] * 4 and all(d.period == period for d in truth)
    assert np.diff([d.line for d in truth]).tolist() == [period] * 3
    # Drawn where planned: darker than the clean strip at each print, nowhere else.
    (x0, w) = next(s for s in SLICES if s[0] <= truth[0].col < s[0] + s[1])
    img = _read(_source(x0, w, **cfg), lines)
    clean = _read(_source(x0, w, plant_defects=False), lines)
    darker = (clean.astype(int) - img.astype(int)) > 10
    assert all(darker[d.line, d.col - x0] for d in truth)
    rows = np.flatnonzero(darker.any(axis=1))
    assert all(min(abs(r - d.line) for d in truth) <= 14 for r in rows)
    with pytest.raises(ValueError, match=">= 64"):
        roll_period_lines(100.0, 2.0)


def test_top_and_bottom_are_different_strips() -> None:
    top, bottom = side_seed(SEED, "top"), side_seed(SEED, "bottom")
    assert (top, bottom) == (SEED, SEED + BOTTOM_SEED_OFFSET)
    a, b = _source(*SLICES[0], seed=top), _source(*SLICES[0], seed=bottom)
    pa, pb = _read(a, 8 * FRAME), _read(b, 8 * FRAME)
    assert np.abs(pa.astype(int) - pb.astype(int)).mean() > 5  # other texture
    assert a.planted != b.planted and {d.line for d in a.planted}.isdisjoint({d.line for d in b.planted})


def test_camera_slices_and_their_errors() -> None:
    assert camera_slices(2048, 2, 64) == [(0, 1056), (992, 1056)]
    assert camera_slices(512, 1, 0) == [(0, 512)]
    assert all(w % 16 == 0 for _, w in SLICES)
    assert [b[0] - (a[0] + a[1]) for a, b in itertools.pairwise(SLICES)] == [-32, -32]  # overlaps
    assert SLICES[-1][0] + SLICES[-1][1] == STRIP
    with pytest.raises(ValueError, match="strip widths 2016 or 2048 can") as err:
        camera_slices(2040, 2, 64)
    assert "2040" in str(err.value)
    assert camera_slices(2016, 2, 64)[-1] == (976, 1040)
    with pytest.raises(ValueError, match="more than the overlap"):
        camera_slices(32, 2, 32)


def test_a_slice_that_does_not_fit_is_refused_with_one_line() -> None:
    with pytest.raises(ValueError, match="runs past source.strip_width 416: at most 96 px fit"):
        _source(320, 128)
    with pytest.raises(ValueError, match="strip_width is not set"):
        SyntheticSource(cfg=SourceConfig(strip_x0=16), width=128, seed=1, frame_lines=FRAME)
    cfg = Config.model_validate(
        {"synthetic": {"width": 512}, "daemon": {"source": {"strip_width": 600, "strip_x0": 200}}}
    )
    with pytest.raises(ConfigError, match=r"^daemon.source: a camera 512 px wide") as err:
        open_source(cfg)
    assert "\n" not in str(err.value)


def test_to_coil_by_hand_and_as_the_daemon_measures_it() -> None:
    mm_per_line, mm_per_px, head = 0.5, 0.25, 1000
    strip = SyntheticStrip(width=STRIP, seed=SEED)
    left = nominal_edges_px(STRIP)[0]
    assert left == strip.edge_margin == 17
    hole = PlantedDefect(kind="hole", line=5000, col=217, size=14, seed=1)  # a disc of radius 7
    mark = PlantedDefect(kind="roll_mark", line=5400, col=300, size=14, seed=2, period=880)
    crack = PlantedDefect(kind="edge_crack", line=6000, col=300, size=30, seed=3)  # right half: the right edge
    h, m, c = to_coil(
        [hole, mark, crack],
        strip=strip,
        head_line=head,
        mm_per_line=mm_per_line,
        mm_per_px=mm_per_px,
        strip_left_px=left,
        side="bottom",
    )
    assert (h.kind, h.side, h.line, h.col, h.period_m) == ("hole", "bottom", 5000, 217, 0.0)
    assert h.md_m == pytest.approx(2.0)  # 4000 lines of 0.5 mm after the head
    assert h.cd_mm == pytest.approx(50.0)  # 200 px of 0.25 mm from the edge at column 17
    assert (h.length_mm, h.width_mm) == (7.5, 3.75)  # 15 lines x 15 columns
    _, mask = strip.render(4990, 21, [hole])
    assert h.area_mm2 == pytest.approx(mask.sum() * mm_per_line * mm_per_px)
    assert m.period_m == pytest.approx(0.44) and m.md_m == pytest.approx(2.2)
    # An edge crack is drawn from the edge in: its CD is inside the right edge at its line (which
    # wanders about the nominal one), not at its planned column.
    edge = float(strip.edges(np.array([6000.0]))[1][0])
    assert edge - 30 < c.cd_mm / mm_per_px + left < edge
    assert c.width_mm > 25 * mm_per_px

    # The third camera's alert for the hole, with its cd_offset_mm, has the strip's CD and MD.
    x0, w = SLICES[2]
    offset = cd_offset_mm(x0, strip_left_px=left, mm_per_px=mm_per_px)
    assert offset == pytest.approx((256 - 17) * 0.25)
    hole_r = replace(hole, col=330)
    (truth,) = to_coil(
        [hole_r],
        strip=strip,
        head_line=head,
        mm_per_line=mm_per_line,
        mm_per_px=mm_per_px,
        strip_left_px=left,
        side="top",
    )
    first = 4960
    pixels, mask = strip.render(first, 80, [hole_r], cols=(x0, x0 + w))
    frame = Frame(
        frame_id=0,
        camera_id="cam2",
        pixels=pixels[:, :, None],
        first_line=first,
        valid_from=0,
        valid_to=80,
        capture_time=0.0,
        md_m=(first - head) * mm_per_line / 1000.0,
    )
    (alert,) = extract_defects(
        mask.astype(np.float32),
        frame=frame,
        threshold=0.5,
        min_area_px=1,
        mm_per_px=mm_per_px,
        mm_per_line=mm_per_line,
        strip_left_px=0.0,  # daemon.strip_edge_px
    )
    assert alert.cd_mm + offset == pytest.approx(truth.cd_mm)
    assert alert.md_m == pytest.approx(truth.md_m)
    assert (alert.length_mm, alert.width_mm, alert.area_mm2) == pytest.approx(
        (truth.length_mm, truth.width_mm, truth.area_mm2)
    )


def test_coil_cameras_configure_both_sides_consistently() -> None:
    cams = coil_cameras(
        seed=SEED,
        strip_width=2048,
        cameras_per_side=2,
        overlap_px=64,
        mm_per_px=0.5,
        mm_per_line=0.5,
        rolls=CoilConfig().rolls,
    )
    assert [(c.side, c.strip_x0, c.width) for c in cams] == [
        ("top", 0, 1056),
        ("top", 992, 1056),
        ("bottom", 0, 1056),
        ("bottom", 992, 1056),
    ]
    assert [c.seed for c in cams] == [SEED, SEED, SEED + 1000, SEED + 1000]
    assert [c.roll_period_lines for c in cams] == [3519, 3519, 3456, 3456]  # 1759.3 and 1727.9 mm rolls
    left = nominal_edges_px(2048)[0]
    assert [c.cd_offset_mm for c in cams] == [-left * 0.5, (992 - left) * 0.5] * 2
