"""A coil's map as SVG geometry: both sides, MD across, CD up, in the report's colours.

Pure: defects, families and uninspected stretches in, shapes in SVG user units out (the template
writes the elements). The axes are to scale in their units; a coil is a thousand times longer
than it is wide, so CD gets more room per mm than MD and the factor is printed on the axis, as
on the report's map (``report_data.cd_exaggeration``). Colours, marker sizes and opacity are the
report's own functions, so a defect looks the same on the screen and on paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.coil.model import CoilDefect, PeriodicFamily, Uninspected
from pipeline.coil.report_data import UNCLASSIFIED, class_colours, class_name, marker_size, score_alpha

SIDES = ("top", "bottom")
WIDTH = 1000.0  # SVG user units across
LEFT, RIGHT = 70.0, 20.0
PANEL_H = 150.0  # plot height of one side
GAP = 46.0  # between the panels (room for the MD ticks and the next title)
TOP_PAD = 22.0
BOTTOM_PAD = 40.0
FAMILY_COLOUR = "#d62728"


@dataclass(frozen=True, kw_only=True)
class Mark:
    """A defect: circle at (x, y), radius ``r``; ``href``: its page, or None."""

    x: float
    y: float
    r: float
    fill: str
    opacity: float
    title: str
    href: str | None


@dataclass(frozen=True, kw_only=True)
class Shape:
    """A rectangle (uninspected stretch) or a ring (a periodic print)."""

    x: float
    y: float
    w: float
    h: float
    title: str


@dataclass(frozen=True, kw_only=True)
class Tick:
    pos: float
    label: str


@dataclass(frozen=True, kw_only=True)
class Panel:
    """One side: its plot's top edge ``y0``, its marks, stretches, rings and the MD the cameras
    have reached on it (x, or None)."""

    side: str
    y0: float
    marks: tuple[Mark, ...]
    stretches: tuple[Shape, ...]
    rings: tuple[Shape, ...]
    reach_x: float | None
    cd_ticks: tuple[Tick, ...]
    count: int


@dataclass(frozen=True, kw_only=True)
class MapDrawing:
    width: float
    height: float
    x0: float
    x1: float
    panel_h: float
    panels: tuple[Panel, ...]
    md_ticks: tuple[Tick, ...]
    length_m: float
    span_mm: tuple[float, float]
    cd_factor: float
    cd_label: str
    legend: tuple[tuple[str, str], ...]


def nice_step(x: float) -> float:
    """The smallest of 1, 2, 5 x 10^k at least ``x``."""
    if not x > 0:
        return 1.0
    e = 10.0 ** math.floor(math.log10(x))
    return next(m * e for m in (1.0, 2.0, 5.0, 10.0) if m * e >= x * (1 - 1e-9))


def grown_length_m(far_m: float) -> float:
    """The MD extent of a growing map: the furthest point rounded up to a tenth of a nice step, so
    the scale changes in steps as the coil passes rather than with every alert."""
    far = max(far_m, 1.0)
    step = nice_step(far / 10.0)
    return math.ceil(far / step - 1e-9) * step


def _fmt(v: float) -> str:
    return f"{v:g}"


def draw_coil_map(
    *,
    defects: Sequence[CoilDefect],
    families: Sequence[PeriodicFamily] = (),
    uninspected: Sequence[Uninspected] = (),
    length_m: float,
    span_mm: tuple[float, float],
    reach_m: dict[str, float] | None = None,
    href: Callable[[CoilDefect], str | None] | None = None,
) -> MapDrawing:
    """The map of a coil ``length_m`` long (MD 0 at the head, on the left) and ``span_mm`` across
    (CD low at the bottom of each panel); top side above bottom."""
    if not (math.isfinite(length_m) and length_m > 0):
        raise ValueError(f"length_m must be positive, got {length_m}")
    lo, hi = span_mm
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"span_mm must be (low, high) with high > low, got {span_mm}")
    x0, x1 = LEFT, WIDTH - RIGHT
    plot_w = x1 - x0
    # CD gets the room of a panel: that many times more units per mm than MD.
    cd_factor = (length_m * 1000.0 / plot_w) / ((hi - lo) / PANEL_H)

    def x_of(md_m: float) -> float:
        return x0 + min(max(md_m, 0.0), length_m) / length_m * plot_w

    def y_of(y0: float, cd_mm: float) -> float:
        return y0 + PANEL_H - (min(max(cd_mm, lo), hi) - lo) / (hi - lo) * PANEL_H

    colours = class_colours(tuple(defects))
    scores = np.array([d.score for d in defects], dtype=float)
    alphas = score_alpha(scores, float(scores.min()), float(scores.max())) if len(defects) else scores
    # marker_size is a matplotlib scatter size (points²) on the report; half its root is a radius.
    radii = np.sqrt(marker_size(np.array([d.area_mm2 for d in defects], dtype=float))) / 2.0 * 1.2
    panels = []
    cd_step = nice_step((hi - lo) / 4.0)
    first_tick = math.ceil(lo / cd_step - 1e-9) * cd_step
    cd_values = np.arange(first_tick, hi + cd_step * 1e-6, cd_step)
    for i, side in enumerate(SIDES):
        y0 = TOP_PAD + i * (PANEL_H + GAP)
        marks = tuple(
            Mark(
                x=round(x_of(d.md_m), 2),
                y=round(y_of(y0, d.cd_mm), 2),
                r=round(float(r), 2),
                fill=colours[class_name(d)],
                opacity=round(float(a), 3),
                title=(
                    f"{class_name(d)}: MD {d.md_m:.2f} m, CD {d.cd_mm:.0f} mm, {d.length_mm:.0f} x "
                    f"{d.width_mm:.0f} mm, {d.area_mm2:.0f} mm², score {d.score:.2f}"
                ),
                href=href(d) if href is not None else None,
            )
            for d, r, a in zip(defects, radii, alphas, strict=True)
            if d.side == side
        )
        stretches = tuple(
            Shape(
                x=round(x_of(u.md_from_m), 2),
                y=round(y_of(y0, u.cd_to_mm), 2),
                w=round(max(1.0, x_of(u.md_to_m) - x_of(u.md_from_m)), 2),
                h=round(y_of(y0, u.cd_from_mm) - y_of(y0, u.cd_to_mm), 2),
                title=f"uninspected ({u.camera}: {u.reason}) MD {u.md_from_m:.1f}-{u.md_to_m:.1f} m",
            )
            for u in uninspected
            if u.side == side
        )
        rings = tuple(
            Shape(
                x=round(x_of(md), 2),
                y=round(y_of(y0, f.cd_mm), 2),
                w=7.0,
                h=7.0,
                title=f"periodic every {f.period_m:.3f} m" + (f" ({f.roll})" if f.roll else ""),
            )
            for f in families
            if f.side == side
            for md in f.md_m
        )
        reach = (reach_m or {}).get(side)
        panels.append(
            Panel(
                side=side,
                y0=y0,
                marks=marks,
                stretches=stretches,
                rings=rings,
                reach_x=None if reach is None else round(x_of(reach), 2),
                cd_ticks=tuple(Tick(pos=round(y_of(y0, v), 2), label=_fmt(round(float(v), 6))) for v in cd_values),
                count=len(marks),
            )
        )
    md_step = nice_step(length_m / 8.0)
    md_ticks = tuple(
        Tick(pos=round(x_of(v), 2), label=_fmt(round(float(v), 6)))
        for v in np.arange(0.0, length_m + md_step * 1e-6, md_step)
    )
    legend = tuple((k, c) for k, c in colours.items() if k != UNCLASSIFIED) + (
        ((UNCLASSIFIED, colours[UNCLASSIFIED]),) if UNCLASSIFIED in colours else ()
    )
    return MapDrawing(
        width=WIDTH,
        height=TOP_PAD + 2 * PANEL_H + GAP + BOTTOM_PAD,
        x0=x0,
        x1=x1,
        panel_h=PANEL_H,
        panels=tuple(panels),
        md_ticks=md_ticks,
        length_m=length_m,
        span_mm=(lo, hi),
        cd_factor=cd_factor,
        cd_label=f"CD mm (exaggerated ×{cd_factor:.3g})"
        if cd_factor >= 1
        else f"CD mm (compressed ×{1 / cd_factor:.3g})",
        legend=legend,
    )
