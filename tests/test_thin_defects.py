"""The planter of benchmarks/thin_defects.py: cracks of the width asked for, nothing changed
outside the mask, only on the surface, the same defects for the same seed, an MVTec layout that
evaluate reads."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.thin_defects import KINDS, plant, plant_crack, write_planted_set
from calibration.evaluate import find_test_images


def _texture(h: int = 240, w: int = 320, seed: int = 0) -> np.ndarray:
    """uint8 (h, w, 3): grey 128 with noise of std 6 (local std well above the surface floor)."""
    rng = np.random.default_rng(seed)
    grey = np.clip(128 + rng.normal(0.0, 6.0, (h, w)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_crack_has_the_requested_width(width: int) -> None:
    image = _texture()
    for seed in range(3):
        p = plant_crack(image, np.random.default_rng(seed), KINDS[f"crack_{width}px"], length=150.0)
        length = float(np.hypot(*np.diff(p.path, axis=0).T).sum())
        assert length == pytest.approx(150.0, abs=1.0)
        assert p.contrast <= -8.0
        # The line itself: pixels changed by at least half the contrast, area / polyline length.
        core = _changed(p.image, image) >= abs(p.contrast) / 2
        assert core.sum() / length == pytest.approx(width, abs=0.35)
        # The mask adds the antialiased fringe (> 2 levels) and 1 px of dilation on each side.
        assert width + 2.0 <= p.mask.sum() / length <= width + 4.0
        assert p.mask[core].all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_pixels_outside_the_mask_are_unchanged_and_seed_decides(kind: str) -> None:
    image = _texture()
    a = plant(image, np.random.default_rng(7), kind)
    b = plant(image, np.random.default_rng(7), kind)
    c = plant(image, np.random.default_rng(8), kind)
    assert a.mask.any()
    assert np.array_equal(a.image[~a.mask], image[~a.mask])
    assert (_changed(a.image, image)[a.mask] > 2).mean() > 0.3  # the mask is where it changed
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)
    assert np.array_equal(image, _texture())  # the input is not written to


@pytest.mark.parametrize("kind", ["crack_3px", "stain_strong"])
def test_defects_stay_off_a_uniform_background(kind: str) -> None:
    image = _texture()
    image[:, :160] = 255  # MVTec bottle's white border: no local std
    image[:, 240:] = 0  # a black surround
    for seed in range(5):
        p = plant(image, np.random.default_rng(seed), kind)
        assert not p.mask[:, :150].any() and not p.mask[:, 250:].any()


def test_planted_set_is_an_mvtec_layout_evaluate_reads(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "test" / "good").mkdir(parents=True)
    for i in range(6):
        cv2.imwrite(str(data / "test" / "good" / f"{i:03d}.png"), _texture(seed=i))
    out = tmp_path / "planted"
    planted, originals = write_planted_set(data, out, seed=1)
    assert len(planted) == len(originals) == 3 * len(KINDS)
    items = find_test_images(out)
    types = [it.defect_type for it in items]
    assert types.count("good") == 3
    assert all(types.count(k) == 3 for k in KINDS)
    assert all(it.mask_path is not None for it in items if it.defect_type != "good")
    # The same seed writes the same files; a rerun replaces the old set.
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    write_planted_set(data, out, seed=1)
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))} == first
