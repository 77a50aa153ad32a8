"""The synthetic line camera: pacing by the wall clock and the defects it plants.

Timing checks are behaviour with generous margins (never faster than the line rate, a read that
returns within its timeout, a stalled reader caught up), not absolute speeds: the machine is shared.
"""

import time

import numpy as np
import pytest

from pipeline.acquisition import sources
from pipeline.acquisition.sources import SyntheticSource
from pipeline.acquisition.synthetic import DEFECT_KINDS, SyntheticStrip
from pipeline.config import Config, SourceConfig, load_config
from pipeline.transport.messages import LineBlock
from tests.conftest import REPO

WIDTH, FRAME = 128, 256


def _source(seed: int = 1, **cfg: object) -> SyntheticSource:
    return SyntheticSource(cfg=SourceConfig.model_validate(cfg), width=WIDTH, seed=seed, frame_lines=FRAME)


def _read_lines(src: SyntheticSource, lines: int) -> np.ndarray:
    out = []
    while sum(b.shape[0] for b in out) < lines:
        block = src.read(timeout=1.0)
        if block is not None:
            out.append(block.pixels)
    return np.concatenate(out)[:lines]


def test_shipped_camera_is_paced_and_plants_defects() -> None:
    assert load_config(REPO / "config.yaml").daemon.source == Config().daemon.source
    src = load_config(REPO / "config.yaml").daemon.source
    assert src.kind == "synthetic" and src.line_rate_hz is not None
    assert src.plant_defects and src.defects_per_100_frames > 0 and src.roll_period_lines is not None


def test_paced_source_delivers_no_faster_than_its_line_rate() -> None:
    rate, block = 2000.0, 100
    src = _source(block_lines=block, line_rate_hz=rate, plant_defects=False)
    t0 = time.monotonic()
    lines = 0
    while time.monotonic() - t0 < 0.6:
        b = src.read(timeout=0.5)
        if b is not None:
            lines += b.pixels.shape[0]
    elapsed = time.monotonic() - t0
    assert lines <= rate * elapsed + block  # one block may be due at the very end
    assert lines >= 0.5 * rate * elapsed  # about the rate; half of it even on a loaded machine


def test_read_returns_none_within_its_timeout() -> None:
    # 1000 lines at 100 lines/s: the first block is due in 10 s.
    src = _source(block_lines=1000, line_rate_hz=100.0, plant_defects=False)
    t0 = time.monotonic()
    assert src.read(timeout=0.05) is None
    assert src.read(timeout=0.05) is None
    assert time.monotonic() - t0 < 2.0


def test_schedule_is_against_the_start_so_a_stalled_reader_catches_up() -> None:
    # Sleeping a block period per read would drift by every stall; scheduled against the start,
    # the blocks due during a stall come at once and the rate over the run holds.
    rate, block = 1000.0, 50
    src = _source(block_lines=block, line_rate_hz=rate, plant_defects=False)
    first = src.read(timeout=1.0)
    assert first is not None
    time.sleep(0.5)  # ten blocks fall due meanwhile
    t0 = time.monotonic()
    caught_up = [src.read(timeout=1.0) for _ in range(8)]
    assert all(isinstance(b, LineBlock) for b in caught_up)
    assert time.monotonic() - t0 < 0.3  # 8 block periods are 0.4 s: these were not waited for
    lines = [b.first_line for b in (first, *caught_up) if b is not None]
    assert lines == [k * block for k in range(9)]  # consecutive: nothing skipped by the catch-up


def test_unpaced_source_and_strip_end() -> None:
    src = _source(block_lines=300, line_rate_hz=None, strip_lines=1000, plant_defects=False)
    sizes = []
    try:
        while True:
            b = src.read(timeout=0.01)
            assert b is not None  # unpaced: never waits
            sizes.append(b.pixels.shape[0])
    except EOFError:
        pass
    assert sizes == [300, 300, 300, 100]


def test_every_kind_is_planted_and_the_rate_is_per_length_of_strip() -> None:
    frames = 60
    src = _source(line_rate_hz=None, block_lines=1024, defects_per_100_frames=50, roll_period_lines=None)
    _read_lines(src, frames * FRAME)
    isolated = [d for d in src.planted if d.line < frames * FRAME]
    assert {d.kind for d in isolated} == set(DEFECT_KINDS)
    assert all(d.period == 0 for d in isolated)
    assert 10 <= len(isolated) <= 60  # Poisson around 30
    # In turn: any 6 consecutive planned defects are 6 different kinds (unless one found no room).
    kinds = [d.kind for d in src.planted]
    assert len(set(kinds[:6])) == 6


def test_roll_mark_repeats_at_its_period() -> None:
    period = 700
    src = _source(line_rate_hz=None, block_lines=128, defects_per_100_frames=0, roll_period_lines=period)
    (mark,) = src.planted
    assert mark.kind == "roll_mark" and mark.period == period
    img = _read_lines(src, mark.line + 3 * period + 64)
    normal = SyntheticStrip(width=WIDTH, seed=1).render(0, img.shape[0])[0]
    darker = (normal.astype(int) - img.astype(int)) > 10
    for k in range(4):
        assert darker[mark.line + k * period, mark.col], f"print {k} missing"
    # Nothing but the roll mark's prints: the strip between them is untouched.
    rows = np.flatnonzero(darker.any(axis=1))
    assert all(min(abs(r - (mark.line + k * period)) for k in range(4)) <= mark.size for r in rows)


def test_planting_is_deterministic_for_the_seed() -> None:
    cfg = {"line_rate_hz": None, "block_lines": 512, "defects_per_100_frames": 100}
    a, b, c = _source(seed=3, **cfg), _source(seed=3, **cfg), _source(seed=4, **cfg)
    pa, pb = _read_lines(a, 20 * FRAME), _read_lines(b, 20 * FRAME)
    _read_lines(c, 20 * FRAME)
    assert a.planted == b.planted and np.array_equal(pa, pb)
    assert a.planted != c.planted
    # Paced or not, the same strip comes out: planting follows the strip, not the clock.
    paced = _source(seed=3, **{**cfg, "line_rate_hz": 200_000.0})
    assert np.array_equal(_read_lines(paced, 20 * FRAME), pa) and paced.planted == a.planted


def test_planting_off_plants_nothing() -> None:
    src = _source(line_rate_hz=None, block_lines=512, plant_defects=False, defects_per_100_frames=500)
    img = _read_lines(src, 20 * FRAME)
    assert src.planted == []
    assert np.array_equal(img, SyntheticStrip(width=WIDTH, seed=1).render(0, 20 * FRAME)[0])


def test_ground_truth_stays_bounded_on_an_endless_strip(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"line_rate_hz": None, "block_lines": 1024, "defects_per_100_frames": 300, "roll_period_lines": 2048}
    full = _source(**settings)
    untrimmed = _read_lines(full, 80 * FRAME)
    monkeypatch.setattr(sources, "KEEP_PASSED", 10)
    src = _source(**settings)
    pixels = _read_lines(src, 80 * FRAME)
    everything = [d for d in full.planted if not d.period]
    kept = [d for d in src.planted if not d.period]
    assert len(everything) > 80  # up to 3 a frame over 80 frames, where they find room
    # The last 10 passed and those still ahead of the camera (up to a block and a frame ahead).
    assert 10 < len(kept) <= 10 + 3 * (1024 + 2 * FRAME) // FRAME + 10
    assert kept == everything[-len(kept) :]
    assert [d.period for d in src.planted if d.period] == [2048]  # the roll mark is kept
    assert np.array_equal(pixels, untrimmed)  # trimming changes no pixel
