import numpy as np
import pytest

from pipeline.acquisition.synthetic import DEFECT_KINDS, PlantedDefect, SyntheticStrip, random_defects


def test_deterministic_for_a_seed() -> None:
    a, _ = SyntheticStrip(width=128, seed=5).render(0, 100)
    b, _ = SyntheticStrip(width=128, seed=5).render(0, 100)
    c, _ = SyntheticStrip(width=128, seed=6).render(0, 100)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_consecutive_windows_equal_one_piece() -> None:
    strip = SyntheticStrip(width=160, seed=1)
    defects = [PlantedDefect(kind="scratch", line=90, col=80, size=40, seed=3)]
    whole, wmask = strip.render(37, 200, defects)
    parts = [strip.render(37 + s, n, defects) for s, n in ((0, 53), (53, 64), (117, 83))]
    assert np.array_equal(whole, np.concatenate([p[0] for p in parts]))
    assert np.array_equal(wmask, np.concatenate([p[1] for p in parts]))


def test_strip_has_texture_edges_and_background() -> None:
    strip = SyntheticStrip(width=256, seed=2)
    img, mask = strip.render(0, 128)
    assert img.dtype == np.uint8 and img.shape == (128, 256) and not mask.any()
    left, right = strip.edges(np.arange(128, dtype=np.float64))
    centre = img[:, int(left.max()) + 4 : int(right.min()) - 4]
    assert centre.mean() > 90 and centre.std() > 3
    assert img[:, : int(left.min()) - 1].mean() < 40


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_every_defect_kind_changes_pixels_inside_its_mask(kind: str) -> None:
    strip = SyntheticStrip(width=256, seed=4)
    rng = np.random.default_rng(0)
    d = random_defects(rng, first_line=0, lines=128, width=256, count=1, kinds=[kind])  # type: ignore[list-item]
    img, mask = strip.render(0, 128, d)
    clean, _ = strip.render(0, 128)
    assert mask.sum() >= 8
    diff = np.abs(img.astype(int) - clean.astype(int))
    assert diff[mask].mean() > 10
    assert (diff[~mask] == 0).all()


def test_roll_mark_repeats_every_revolution() -> None:
    strip = SyntheticStrip(width=128, seed=4)
    d = PlantedDefect(kind="roll_mark", line=20, col=64, size=10, seed=1, period=150)
    _, mask = strip.render(0, 480, [d])
    rows = np.flatnonzero(mask.any(axis=1))
    centres = [rows[(rows > c - 10) & (rows < c + 10)].mean() for c in (20, 170, 320, 470)]
    assert np.allclose(np.diff(centres), 150, atol=1)
