"""Every chart the offline tools write, drawn with matplotlib on its Agg canvas (PNG files).

One place for them so that they look alike: each function takes plain arrays and numbers and
writes one PNG. No pyplot: a ``Figure`` of its own per chart, so nothing is shared between
calls or threads and no display is ever needed. The runtime (``pipeline/``) never imports
this module; only the offline tools (calibration, evaluation, training) draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5}


def _figure(width_in: float = 7.0, height_in: float = 4.0) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _band_colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * k / max(1, n - 1)) for k in range(n)]


def plot_band_curves(
    path: Path,
    *,
    edges: Sequence[int],
    curves: Sequence[Sequence[tuple[float, float]]],
    thresholds: Sequence[float],
    rates: Sequence[float],
    target_share: float,
) -> Path:
    """Alarm rate on the normal run against the threshold, one curve per CD band, the chosen
    threshold of each band marked, and each band's share of the budget dashed."""
    fig = _figure()
    ax = fig.add_subplot()
    for k, colour in enumerate(_band_colours(len(curves))):
        if curves[k]:
            t, r = np.asarray(curves[k]).T
            ax.plot(t, r, color=colour, lw=1.5, label=f"band {k}: columns {edges[k]}-{edges[k + 1] - 1}")
        ax.plot([thresholds[k]], [rates[k]], "o", color=colour, ms=6, mec="black", mew=0.6, clip_on=False, zorder=3)
    ax.axhline(target_share, color="grey", ls="--", lw=1, label=f"budget per band {target_share:g} /km")
    # Rates reach 0 at high thresholds: linear below a tenth of the budget, logarithmic above.
    ax.set_yscale("symlog", linthresh=max(target_share / 10, 1e-3))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("pixel threshold (anomaly score)")
    ax.set_ylabel("alarms per km of normal strip")
    ax.set_title("Per-band thresholds: alarm rate on the calibration run (dot: chosen)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_flatfield(path: Path, *, white_before: np.ndarray, white_after: np.ndarray, dark: np.ndarray) -> Path:
    """Column profiles (mean over lines) of the white reference before and after correction,
    and of the dark reference."""
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    cols = np.arange(white_before.size)
    ax.plot(cols, white_before, color="tab:red", lw=1, label="white reference, raw")
    ax.plot(cols, white_after, color="tab:green", lw=1, label="white reference, flat-field corrected")
    ax.plot(cols, dark, color="tab:blue", lw=1, label="dark reference")
    ax.set_xlim(0, max(1, white_before.size - 1))
    ax.set_ylim(0, 255)
    ax.set_xlabel("column (px)")
    ax.set_ylabel("grey level (DN, 8 bit)")
    ax.set_title("Flat-field: column profiles")
    ax.grid(True, alpha=0.3)
    fig.legend(fontsize="small", loc="outside lower center", ncols=3)
    return _save(fig, path)


def plot_scale_profile(path: Path, *, profile: np.ndarray, edges: tuple[float, float], width_mm: float) -> Path:
    """The target's column profile with the detected edges, and the scale they give."""
    fig = _figure(8.0, 3.5)
    ax = fig.add_subplot()
    ax.plot(np.arange(profile.size), profile, color="black", lw=1, label="target, mean over lines")
    for e, name in zip(edges, ("left", "right"), strict=True):
        ax.axvline(e, color="tab:red", lw=1)
        ax.text(
            e, 128, f"{name} edge {e:.1f} px", rotation=90, ha="center", va="center", fontsize="small", bbox=_LABEL_BOX
        )
    ax.set_xlim(0, max(1, profile.size - 1))
    ax.set_ylim(0, 255)
    ax.set_xlabel("column (px)")
    ax.set_ylabel("grey level (DN, 8 bit)")
    ax.set_title(
        f"Scale: {width_mm:g} mm over {edges[1] - edges[0]:.1f} px = {width_mm / (edges[1] - edges[0]):.4f} mm/px"
    )
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_loss_curves(path: Path, curves: Mapping[str, Sequence[float]], *, smooth: int = 50) -> Path:
    """Training curves, one panel each (the terms differ by orders of magnitude): every step
    faint and the running mean over ``smooth`` steps on top (fewer on a short run, a fifth of
    it; none under 15 steps, where every step is drawn plainly)."""
    shown = {name: np.asarray(c, dtype=np.float64) for name, c in curves.items() if len(c)}
    steps_max = max((c.size for c in shown.values()), default=0)
    window = min(smooth, steps_max // 5)
    fig = _figure(7.0, 1.2 + 1.6 * max(1, len(shown)))
    axes = fig.subplots(max(1, len(shown)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, c) in zip(axes, shown.items(), strict=False):
        steps = np.arange(1, c.size + 1)
        if window >= 3 and c.size >= window:
            ax.plot(steps, c, color="tab:blue", lw=0.5, alpha=0.35)
            # The mean of each window drawn at the window's centre, so it does not lag the data.
            mid = (window - 1) // 2
            mean = np.convolve(c, np.ones(window) / window, mode="valid")
            ax.plot(steps[mid : mid + mean.size], mean, color="tab:blue", lw=1.5)
        else:
            ax.plot(steps, c, color="tab:blue", lw=1.2, marker="." if c.size <= 50 else None)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("training step")
    if window >= 3:
        axes[0].set_title(f"Training curves (faint: every step; bold: mean over {window} steps)")
    else:
        axes[0].set_title("Training curves (every step)")
    return _save(fig, path)


def plot_score_histogram(
    path: Path,
    *,
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    what: str = "image anomaly score",
) -> Path:
    """Scores of normal and defective samples on common bins."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    fig = _figure()
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(s, bins=min(50, max(10, s.size // 4)))
    ax.hist(s[~y], bins=list(bins), color="tab:blue", alpha=0.6, label=f"normal ({int((~y).sum())})")
    ax.hist(s[y], bins=list(bins), color="tab:red", alpha=0.6, label=f"defect ({int(y.sum())})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", lw=1, label=f"{threshold_label} {threshold:.3g}")
    ax.set_xlabel(what)
    ax.set_ylabel("images" if what.startswith("image") else "count")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{what[0].upper()}{what[1:]}s, normal and defective")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_roc(path: Path, *, fpr: np.ndarray, tpr: np.ndarray, auc: float, what: str = "image") -> Path:
    fig = _figure(4.8, 4.6)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="tab:red", lw=1.5, drawstyle="default", label=f"{what} AUROC {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    ax.set_xlim(-0.02, 1.02)  # a little room, so that a perfect curve on the edges stays visible
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC, {what} level")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def plot_overlay(
    path: Path,
    *,
    image: np.ndarray,
    score_map: np.ndarray,
    mask: np.ndarray | None,
    vmin: float,
    vmax: float,
    title: str,
) -> Path:
    """The image, and the image with its score map over it on a fixed colour scale (so that all
    overlays of a run compare), with the ground-truth outline in green."""
    h, w = image.shape[:2]
    wide = w >= h  # panels one above the other for wide frames, side by side for tall ones
    panel_w = 9.0 if wide else 4.0
    panel_h = min(8.0, panel_w * h / w)
    fig = _figure(panel_w + 1.2, 2 * panel_h + 0.8) if wide else _figure(2 * panel_w + 1.2, panel_h + 0.8)
    axes = fig.subplots(2, 1) if wide else fig.subplots(1, 2)
    rgb = image[:, :, 0] if image.shape[2] == 1 else image
    grey = {"cmap": "gray", "vmin": 0, "vmax": 255} if image.shape[2] == 1 else {}
    for ax in axes:
        ax.imshow(rgb, interpolation="nearest", **grey)
        ax.set_axis_off()
    axes[0].set_title(title, fontsize="small")
    heat = axes[1].imshow(score_map, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax, interpolation="nearest")
    if mask is not None and mask.any():
        _outline(axes[1], mask)
    fig.colorbar(heat, ax=axes[1], label="anomaly score", shrink=0.9)
    return _save(fig, path)


def _outline(ax: Axes, mask: np.ndarray) -> None:
    ax.contour(mask.astype(np.float32), levels=[0.5], colors="lime", linewidths=1)
