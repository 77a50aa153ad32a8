"""Every chart renders to a PNG of the size asked for, from plain arrays, without a display."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration import plots
from calibration.metrics import roc_curve


def _png(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    assert img is not None, f"{path} is not a readable PNG"
    return img


def _coloured(img: np.ndarray) -> int:
    return int((img.astype(np.int16).std(axis=2) > 40).sum())


def _pixels_of(img: np.ndarray, rgb: tuple[int, int, int]) -> int:
    bgr = np.array(rgb[::-1], dtype=np.int16)
    return int((np.abs(img.astype(np.int16) - bgr).max(axis=2) < 40).sum())


def _red_lines(img: np.ndarray) -> list[float]:
    """Columns (mean x of each run) where a vertical line of matplotlib's tab:red is drawn."""
    b, g, r = (img[:, :, i].astype(np.int16) for i in range(3))
    red = (abs(r - 214) < 40) & (abs(g - 39) < 40) & (abs(b - 40) < 40)
    columns = np.flatnonzero(red.sum(axis=0) > img.shape[0] // 3)
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    return [float(run.mean()) for run in runs if run.size]


def test_band_curves(tmp_path: Path) -> None:
    curves = [[(t, 2000.0 * np.exp(-3 * (t - 1 - 0.2 * k))) for t in np.linspace(1, 3, 30)] for k in range(4)]
    path = plots.plot_band_curves(
        tmp_path / "thresholds.png",
        edges=[0, 64, 128, 192, 256],
        curves=curves,
        thresholds=[1.8, 2.0, 2.2, 2.4],
        rates=[180.0, 190.0, 200.0, 150.0],
        target_share=250.0,
    )
    img = _png(path)
    assert img.shape == (400, 700, 3) and _coloured(img) > 500


def test_flatfield_and_scale(tmp_path: Path) -> None:
    cols = np.arange(512)
    before = 150 + 40 * np.cos(cols / 512 * np.pi - np.pi / 2)
    img = _png(
        plots.plot_flatfield(
            tmp_path / "flatfield.png", white_before=before, white_after=np.full(512, 165.0), dark=np.full(512, 8.0)
        )
    )
    assert img.shape == (400, 800, 3) and _coloured(img) > 500
    # The three curves, each in its colour (tab:red raw white, tab:green corrected, tab:blue dark).
    for rgb in ((214, 39, 40), (44, 160, 44), (31, 119, 180)):
        assert _pixels_of(img, rgb) > 300, rgb
    profile = np.where((cols >= 150) & (cols < 450), 210.0, 20.0)
    img = _png(plots.plot_scale_profile(tmp_path / "scale.png", profile=profile, edges=(149.5, 449.5), width_mm=150))
    assert img.shape == (350, 800, 3)
    # The edge lines stand where the edges are: drawn for edges 50 columns further left, both
    # lines move by the same number of pixels, 50/300 of the distance between them.
    moved = _png(plots.plot_scale_profile(tmp_path / "moved.png", profile=profile, edges=(99.5, 399.5), width_mm=150))
    (left, right), (left2, right2) = _red_lines(img), _red_lines(moved)
    assert right - left == pytest.approx(right2 - left2, abs=1.5)
    assert left - left2 == pytest.approx(right - right2, abs=1.5)
    assert left - left2 == pytest.approx((right - left) * 50 / 300, abs=2.0)


def test_loss_curves_one_panel_per_term(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(400)
    curves = {
        "loss": list(2 * np.exp(-steps / 100) + 0.1 * rng.random(400)),
        "SVDD'": list(1e-3 * np.exp(-steps / 50) + 1e-4 * rng.random(400)),
        "SSL": list(2.0 * np.exp(-steps / 150) + 0.1 * rng.random(400)),
        "SSL accuracy": list(np.clip(0.125 + steps / 500 + 0.05 * rng.random(400), 0, 1)),
        "empty": [],  # not drawn
    }
    img = _png(plots.plot_loss_curves(tmp_path / "loss.png", curves))
    assert img.shape == (int(100 * (1.2 + 1.6 * 4)), 700, 3) and _coloured(img) > 500
    short = _png(plots.plot_loss_curves(tmp_path / "short.png", {k: v[:6] for k, v in curves.items()}))
    assert short.shape == img.shape and _coloured(short) > 300  # six steps: drawn plainly, not faint


def test_histogram_and_roc(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(60, bool), np.ones(40, bool)]
    scores = np.r_[rng.normal(1.0, 0.2, 60), rng.normal(1.8, 0.4, 40)]
    img = _png(
        plots.plot_score_histogram(
            tmp_path / "scores.png", scores=scores, labels=labels, threshold=1.4, threshold_label="best-F1 threshold"
        )
    )
    assert img.shape == (400, 700, 3) and _coloured(img) > 1000
    fpr, tpr = roc_curve(scores, labels)
    img = _png(plots.plot_roc(tmp_path / "roc.png", fpr=fpr, tpr=tpr, auc=0.97))
    assert img.shape == (460, 480, 3) and _coloured(img) > 200


@pytest.mark.parametrize(("shape", "channels"), [((128, 512), 1), ((256, 96), 3)])
def test_overlay_wide_and_tall(tmp_path: Path, shape: tuple[int, int], channels: int) -> None:
    rng = np.random.default_rng(2)
    h, w = shape
    image = rng.integers(60, 120, (h, w, channels), dtype=np.uint8)
    amap = rng.random((h, w)).astype(np.float32)
    mask = np.zeros((h, w), bool)
    mask[h // 3 : h // 2, w // 3 : w // 2] = True
    amap[mask] += 2.0
    img = _png(
        plots.plot_overlay(tmp_path / "o.png", image=image, score_map=amap, mask=mask, vmin=0, vmax=3, title="o")
    )
    assert _coloured(img) > 1000
