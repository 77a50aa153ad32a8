"""The synthetic coil: one strip per side seen by cameras side by side, and what was planted on
it in the coil's coordinates, so that every figure of a coil's product can be checked against
what went in.

A side is one ``SyntheticStrip`` (``side_seed``: the bottom surface is another strip, other
texture, other defects); its cameras share the daemon settings ``synthetic.seed``,
``source.strip_width`` and ``daemon.frame_lines`` and each has its own ``source.strip_x0``,
``synthetic.width`` (``camera_slices``) and ``daemon.cd_offset_mm`` (``cd_offset_mm``), with
``strip_edge_px`` 0 and ``track_edges`` off (a camera in the middle of the strip sees no edge).
``planted_on_strip`` gives what those cameras were shown without running them and ``to_coil``
turns it into MD metres from the coil head and CD millimetres from the strip's left edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast

from pipeline.acquisition.sources import defect_plan
from pipeline.acquisition.synthetic import PlantedDefect, SyntheticStrip, default_edge_margin, occurrences
from pipeline.config import RollConfig, SourceConfig

Side = Literal["top", "bottom"]

# The bottom surface's seed is the top's plus this. Seeds of different coils' top sides should
# then differ by something other than this, or one coil's bottom is another's top.
BOTTOM_SEED_OFFSET = 1000

# Camera widths are multiples of the backbone's coarsest stride.
WIDTH_STEP = 16


def side_seed(seed: int, side: Side) -> int:
    """The strip seed of ``side`` for a coil whose top surface has ``seed``."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed if side == "top" else seed + BOTTOM_SEED_OFFSET


def camera_slices(strip_width: int, cameras: int, overlap_px: int) -> list[tuple[int, int]]:
    """(strip_x0, width) of ``cameras`` cameras side by side that cover the strip's columns
    ``[0, strip_width)`` exactly, all of one width (a multiple of 16), neighbours sharing
    ``overlap_px`` columns. ValueError of one line, with the nearest strip widths that work,
    when no such width exists."""
    if cameras < 1:
        raise ValueError(f"cameras must be >= 1, got {cameras}")
    if overlap_px < 0:
        raise ValueError(f"overlap_px must be >= 0, got {overlap_px}")
    covered = strip_width + (cameras - 1) * overlap_px
    if covered % (cameras * WIDTH_STEP):
        below = covered // (cameras * WIDTH_STEP) * WIDTH_STEP
        fits = [cameras * w - (cameras - 1) * overlap_px for w in (below, below + WIDTH_STEP)]
        raise ValueError(
            f"{cameras} cameras overlapping by {overlap_px} px cannot cover a strip {strip_width} px wide with "
            f"widths a multiple of {WIDTH_STEP}: strip widths {fits[0]} or {fits[1]} can"
        )
    width = covered // cameras
    if width < 32 or overlap_px >= width:
        raise ValueError(f"camera width {width} px: it must be >= 32 and more than the overlap {overlap_px} px")
    return [(i * (width - overlap_px), width) for i in range(cameras)]


def nominal_edges_px(strip_width: int) -> tuple[int, int]:
    """Left and right strip edge (columns) about which the synthetic strip's edges wander, by
    40 % of the edge margin either way (``SyntheticStrip.edges``)."""
    margin = default_edge_margin(strip_width)
    return margin, strip_width - 1 - margin


def cd_offset_mm(strip_x0: int, *, strip_left_px: float, mm_per_px: float, strip_edge_px: float = 0.0) -> float:
    """``daemon.cd_offset_mm`` for the camera whose column 0 is strip column ``strip_x0``: an
    alert's CD, (cx - strip_edge_px) mm_per_px + cd_offset_mm, is then (strip column -
    strip_left_px) mm_per_px, the same strip CD from every camera."""
    if mm_per_px <= 0:
        raise ValueError(f"mm_per_px must be > 0, got {mm_per_px}")
    return (strip_x0 + strip_edge_px - strip_left_px) * mm_per_px


@dataclass(frozen=True)
class CoilCamera:
    """One camera of the synthetic coil: its ``side``, strip ``seed`` (``synthetic.seed``),
    ``strip_x0`` and ``width`` (``source.strip_x0``, ``synthetic.width``), ``cd_offset_mm``
    (``daemon.cd_offset_mm``, with ``strip_edge_px`` 0) and ``roll_period_lines``
    (``source.roll_period_lines``, from the roll table: the same for the cameras of a side)."""

    side: Side
    seed: int
    strip_x0: int
    width: int
    cd_offset_mm: float
    roll_period_lines: int | None


def coil_cameras(
    *,
    seed: int,
    strip_width: int,
    cameras_per_side: int,
    overlap_px: int,
    mm_per_px: float,
    mm_per_line: float,
    rolls: Sequence[RollConfig] = (),
) -> list[CoilCamera]:
    """The cameras of both sides (top first, left to right) of a strip ``strip_width`` px
    wide whose top surface has ``seed``; each side's roll mark repeats at the circumference of
    the first roll of ``rolls`` touching it (none when ``rolls`` is empty)."""
    slices = camera_slices(strip_width, cameras_per_side, overlap_px)
    left = nominal_edges_px(strip_width)[0]
    out = []
    for side in ("top", "bottom"):
        side_ = cast(Side, side)
        period = roll_period_lines(roll_for_side(rolls, side_).circumference_mm, mm_per_line) if rolls else None
        out += [
            CoilCamera(
                side=side_,
                seed=side_seed(seed, side_),
                strip_x0=x0,
                width=width,
                cd_offset_mm=cd_offset_mm(x0, strip_left_px=left, mm_per_px=mm_per_px),
                roll_period_lines=period,
            )
            for x0, width in slices
        ]
    return out


def roll_period_lines(circumference_mm: float, mm_per_line: float) -> int:
    """``source.roll_period_lines`` of a roll: its circumference in whole lines. The rounding
    moves the period by at most mm_per_line / (2 circumference): 0.015 % for 0.5 mm lines on
    a 1.7 m work roll, far inside ``coil.roll_tolerance``."""
    if circumference_mm <= 0 or mm_per_line <= 0:
        raise ValueError(f"circumference_mm ({circumference_mm}) and mm_per_line ({mm_per_line}) must be > 0")
    lines = round(circumference_mm / mm_per_line)
    if lines < 64:
        raise ValueError(
            f"a {circumference_mm} mm roll is {lines} lines of {mm_per_line} mm: source.roll_period_lines needs >= 64"
        )
    return lines


def roll_for_side(rolls: Sequence[RollConfig], side: Side) -> RollConfig:
    """The first roll of the table that touches ``side`` (the example table's work roll)."""
    for roll in rolls:
        if roll.side in (side, "both"):
            return roll
    raise ValueError(f"no roll in the table touches the {side} side")


def planted_on_strip(
    cfg: SourceConfig,
    *,
    seed: int,
    frame_lines: int,
    first_line: int,
    end_line: int,
    strip_width: int | None = None,
) -> list[PlantedDefect]:
    """Every print centred on a line in ``[first_line, end_line)`` that synthetic sources of
    ``cfg``, ``seed`` and ``frame_lines`` draw on their strip, in strip pixels, by line: the
    isolated defects as planted, and each print of the roll mark as an entry of its own at
    its line (``period`` kept, so a print tells its family; it is one print, not a mark
    repeating from there). ``strip_width`` is needed when ``cfg.strip_width`` is None (the
    strip is then the one camera's width) and must match it otherwise."""
    if cfg.strip_width is None:
        if strip_width is None:
            raise ValueError("source.strip_width is not set: pass the strip (camera) width")
        width = strip_width
    else:
        if strip_width is not None and strip_width != cfg.strip_width:
            raise ValueError(f"strip_width {strip_width} is not source.strip_width {cfg.strip_width}")
        width = cfg.strip_width
    if end_line < first_line:
        raise ValueError(f"end_line {end_line} is before first_line {first_line}")
    plan = defect_plan(cfg, seed=seed, strip_width=width, frame_lines=frame_lines)
    # Defects lie inside the frame they are planned in, so planning through end_line finds all.
    out = [d for d in plan.plan(end_line) if first_line <= d.line < end_line]
    if plan.roll_mark is not None:
        mark = plan.roll_mark
        # occurrences also names the prints that only reach into the window: not theirs.
        lines = [line for line in occurrences(mark, first_line, end_line - first_line) if first_line <= line < end_line]
        out += [replace(mark, line=line) for line in lines]
    return sorted(out, key=lambda d: (d.line, d.col))


@dataclass(frozen=True)
class CoilTruth:
    """One planted print in coil coordinates: the centroid of its mask at ``md_m`` metres from
    the coil head and ``cd_mm`` from the strip's left edge, its box ``length_mm`` (MD) by
    ``width_mm`` (CD), ``area_mm2`` of mask, all measured as the daemon measures a defect
    region (``postprocess.defects``); ``period_m`` for a roll mark's print (0.0 for an
    isolated defect); ``line``, ``col``: where it was planted on the strip (pixels)."""

    kind: str
    side: Side
    md_m: float
    cd_mm: float
    length_mm: float
    width_mm: float
    area_mm2: float
    period_m: float
    line: int
    col: int


def to_coil(
    defects: Sequence[PlantedDefect],
    *,
    strip: SyntheticStrip,
    head_line: int,
    mm_per_line: float,
    mm_per_px: float,
    strip_left_px: float,
    side: Side,
) -> list[CoilTruth]:
    """``defects`` (prints, as from ``planted_on_strip``) drawn on ``strip`` (the whole strip
    of that side), in the coordinates of the coil whose head is strip line ``head_line``.

    CD is measured from the fixed column ``strip_left_px``, the reference the cameras' alerts
    use (``cd_offset_mm``); pass ``nominal_edges_px(strip.width)[0]``. The drawn edge wanders
    about it by up to 40 % of the edge margin (``strip.edge_margin``), so an edge rule's zone
    is that much off the edge actually drawn at a given line."""
    if mm_per_line <= 0 or mm_per_px <= 0:
        raise ValueError(f"mm_per_line ({mm_per_line}) and mm_per_px ({mm_per_px}) must be > 0")
    out = []
    for d in defects:
        f = strip.footprint(d)
        out.append(
            CoilTruth(
                kind=d.kind,
                side=side,
                md_m=(f.centre_line - head_line) * mm_per_line / 1000.0,
                cd_mm=(f.centre_col - strip_left_px) * mm_per_px,
                length_mm=f.lines * mm_per_line,
                width_mm=f.cols * mm_per_px,
                area_mm2=f.pixels * mm_per_px * mm_per_line,
                period_m=d.period * mm_per_line / 1000.0,
                line=d.line,
                col=d.col,
            )
        )
    return out


def period_error(circumference_mm: float, mm_per_line: float) -> float:
    """Relative change of a roll's period by ``roll_period_lines``' rounding."""
    lines = roll_period_lines(circumference_mm, mm_per_line)
    return math.fabs(lines * mm_per_line - circumference_mm) / circumference_mm
