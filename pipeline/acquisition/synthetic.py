"""A procedural steel strip: the project's own data for its demo and its tests.

Rolled texture with streaks along the rolling direction (MD runs down the image, one image row
per camera line), fine grain, slow illumination drift, vignetting across the strip (CD), strip
edges that wander with dark background beyond them, and plantable defects with ground-truth
masks. Everything is a function of the strip position and the seed, so a frame rendered in one
piece equals the same lines rendered as consecutive pieces, and a slice of columns (one of
several cameras across a wide strip) equals those columns of the whole strip's render.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import cv2
import numpy as np

DefectKind = Literal["scratch", "pit", "scale", "hole", "edge_crack", "roll_mark", "stamp"]
DEFECT_KINDS: tuple[DefectKind, ...] = ("scratch", "pit", "scale", "hole", "edge_crack", "roll_mark")

_BLOCK = 64  # lines per noise block; noise is seeded per block so any window renders the same
_PAD = 8  # lines of context either side of a window, more than the grain blur reaches
_CACHED_BLOCKS = 16  # noise blocks kept: the strip's and the background's of the last render or two


@dataclass(frozen=True)
class PlantedDefect:
    """A defect at strip position (``line`` along MD, ``col`` across, in pixels).

    ``size`` is the defect's characteristic length in pixels; ``period`` (lines) repeats a roll
    mark at every roll revolution from ``line`` on; ``seed`` fixes its shape.
    """

    kind: DefectKind  # "stamp" is no defect: a benign mark (ink stamp, label) printed on normal strip
    line: int
    col: int
    size: int
    seed: int
    period: int = 0


class SyntheticStrip:
    """Renders any window of lines of one endless strip; deterministic for a seed."""

    def __init__(self, *, width: int, seed: int, edge_margin: int | None = None, base_level: float = 128.0) -> None:
        if width < 32:
            raise ValueError(f"width must be >= 32, got {width}")
        if not 0.0 < base_level < 255.0:
            raise ValueError(f"base_level must be in (0, 255), got {base_level}")
        self.width = width
        self.seed = seed
        self.base_level = base_level
        self.edge_margin = default_edge_margin(width) if edge_margin is None else edge_margin
        if not 0 <= self.edge_margin < width // 3:
            raise ValueError(f"edge_margin {self.edge_margin} must be in [0, width/3)")
        rng = np.random.default_rng([seed, 0xC0FFEE])
        x = np.arange(width, dtype=np.float64)
        # Streaks: a column profile fixed along MD (rolls print their surface along the strip).
        coarse = cv2.GaussianBlur(rng.standard_normal((1, width)), (0, 0), sigmaX=12).ravel()
        fine = cv2.GaussianBlur(rng.standard_normal((1, width)), (0, 0), sigmaX=1.2).ravel()
        self._streaks = 60.0 * coarse + 10.0 * fine
        self._streak_mod = 2 * math.pi * rng.uniform(1 / 4000, 1 / 1500)
        # Vignetting of the line lamp: -12 % at the field edges.
        self._vignette = 1.0 - 0.12 * ((x - width / 2) / (width / 2)) ** 2
        self._edge_phase = rng.uniform(0, 2 * math.pi, size=2)
        # Noise blocks of the last renders: consecutive blocks of lines share blocks with their
        # neighbours, and drawing the normals is most of a render's time.
        self._blocks: dict[int, np.ndarray] = {}

    def edges(self, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left and right strip edge (float columns) at each line: the strip wanders slowly."""
        wander = 0.4 * self.edge_margin * np.sin(2 * math.pi * lines / 2500.0 + self._edge_phase[0])
        left = self.edge_margin + wander
        right = self.width - 1 - self.edge_margin + wander
        return left, right

    def _block(self, b: int) -> np.ndarray:
        block = self._blocks.get(b)
        if block is None:
            block = (
                np.random.default_rng([self.seed, 1, b + (1 << 32)])
                .standard_normal((_BLOCK, self.width))
                .astype(np.float32)
            )
            if len(self._blocks) >= _CACHED_BLOCKS:
                del self._blocks[next(iter(self._blocks))]  # the oldest: renders move forward
            self._blocks[b] = block
        return block

    def _grain(self, first: int, count: int, cols: slice) -> np.ndarray:
        # The noise is drawn and blurred at the whole strip's width, then cropped: the normals
        # come in one row-major stream per block, and OpenCV's blur of a crop differs from the
        # crop of its blur in the last bits near a row's end (its SIMD tail).
        b0 = (first - _PAD) // _BLOCK
        b1 = (first + count + _PAD - 1) // _BLOCK
        noise: np.ndarray = np.concatenate([self._block(b) for b in range(b0, b1 + 1)])
        # Elongated along MD, like rolled grain.
        noise = cv2.GaussianBlur(noise, (3, 7), sigmaX=0.7, sigmaY=1.6, borderType=cv2.BORDER_REFLECT)
        start = first - b0 * _BLOCK
        return noise[start : start + count, cols] * 9.0

    def _columns(self, cols: tuple[int, int] | None) -> slice:
        if cols is None:
            return slice(0, self.width)
        x0, x1 = cols
        if not 0 <= x0 < x1 <= self.width:
            raise ValueError(f"columns [{x0}, {x1}) are not inside the strip's {self.width}")
        return slice(x0, x1)

    def render_normal(self, first_line: int, lines: int, *, cols: tuple[int, int] | None = None) -> np.ndarray:
        """float32 (lines, x1 - x0) image of the defect-free strip's columns ``cols`` = (x0, x1)
        (None: all), before quantisation; exactly those columns of the whole strip's render."""
        if lines < 1:
            raise ValueError(f"lines must be >= 1, got {lines}")
        xs = self._columns(cols)
        y = np.arange(first_line, first_line + lines, dtype=np.float64)
        drift = 1.0 + 0.06 * np.sin(2 * math.pi * y / 7000.0)
        mod = 0.8 + 0.2 * np.sin(self._streak_mod * y)
        # Only elementwise arithmetic below: on a crop it gives the crop's values bit for bit.
        img = self.base_level + mod[:, None] * self._streaks[None, xs] * 0.3
        img = img + self._grain(first_line, lines, xs)
        img = img * drift[:, None] * self._vignette[None, xs]
        left, right = self.edges(y)
        columns = np.arange(xs.start, xs.stop)[None, :]
        inside = (columns >= left[:, None]) & (columns <= right[:, None])
        if inside.all():
            # A camera in the middle of a wide strip sees no background: its noise is not drawn.
            return img.astype(np.float32)
        background = 18.0 + 0.3 * self._grain(first_line + 100_000, lines, xs)
        return np.where(inside, img, background).astype(np.float32)

    def render(
        self,
        first_line: int,
        lines: int,
        defects: Sequence[PlantedDefect] = (),
        *,
        cols: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (lines, x1 - x0), mask bool (lines, x1 - x0)) of the columns ``cols`` =
        (x0, x1) of the strip (None: all) with ``defects`` (strip columns) drawn; exactly those
        columns of the whole strip's render, so cameras side by side see one strip."""
        xs = self._columns(cols)
        img = self.render_normal(first_line, lines, cols=cols)
        mask = np.zeros(img.shape, dtype=np.uint8)
        for d in defects:
            for line in occurrences(d, first_line, lines):
                # Drawn on a canvas centred on the defect, then the rows inside the window are
                # pasted: rasterising a shape clipped by the window would depend on the window.
                reach = _reach(d)
                canvas = _draw(self, d, reach)[:, xs]
                top = line - reach - first_line
                r0, r1 = max(0, -top), min(canvas.shape[0], lines - top)
                if r0 >= r1:
                    continue
                region = canvas[r0:r1] > 0
                rows = slice(top + r0, top + r1)
                delta = _DELTA[d.kind]
                if math.isnan(delta):
                    img[rows][region] = 18.0  # the background shows through
                else:
                    img[rows][region] += delta
                mask[rows] |= canvas[r0:r1]
        return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask > 0

    def footprint(self, d: PlantedDefect) -> Footprint:
        """One print of ``d``, centred on ``d.line``, as ``render`` draws it: its mask's box,
        pixels and centroid in strip pixels."""
        reach = _reach(d)
        canvas = _draw(self, d, reach)
        rows, cols = np.nonzero(canvas)
        if rows.size == 0:
            raise ValueError(f"{d} draws nothing on a strip {self.width} px wide")
        top = d.line - reach
        return Footprint(
            first_line=top + int(rows.min()),
            first_col=int(cols.min()),
            lines=int(rows.max() - rows.min()) + 1,
            cols=int(cols.max() - cols.min()) + 1,
            pixels=int(rows.size),
            centre_line=top + float(rows.mean()),
            centre_col=float(cols.mean()),
        )


@dataclass(frozen=True)
class Footprint:
    """Where one print of a planted defect lies on the strip (pixels): its mask's box from
    (``first_line``, ``first_col``), ``lines`` x ``cols``, ``pixels`` in it, centroid
    (``centre_line``, ``centre_col``)."""

    first_line: int
    first_col: int
    lines: int
    cols: int
    pixels: int
    centre_line: float
    centre_col: float


def default_edge_margin(width: int) -> int:
    """Nominal columns of background beyond each strip edge of a strip ``width`` px wide (the
    edges wander by 40 % of it either way, see ``SyntheticStrip.edges``)."""
    return max(4, width // 24)


_DELTA = {
    "scratch": -55.0,
    "pit": -75.0,
    "scale": -35.0,
    "hole": math.nan,
    "edge_crack": math.nan,
    "roll_mark": -28.0,
    "stamp": 40.0,  # light ink on the steel
}


def _reach(d: PlantedDefect) -> int:
    return 2 * d.size + 8


def occurrences(d: PlantedDefect, first: int, lines: int) -> list[int]:
    """Centre lines of ``d``'s prints (one, or one per ``period`` from ``d.line`` on) that reach
    into the window of ``lines`` lines from ``first``."""
    reach = _reach(d)
    if d.period <= 0:
        return [d.line] if first - reach <= d.line < first + lines + reach else []
    k0 = max(0, math.ceil((first - reach - d.line) / d.period))
    out = []
    k = k0
    while d.line + k * d.period < first + lines + reach:
        out.append(d.line + k * d.period)
        k += 1
    return out


def _draw(strip: SyntheticStrip, d: PlantedDefect, reach: int) -> np.ndarray:
    """uint8 canvas (2 reach + 1, width), 1 where the defect is; its centre line is row ``reach``."""
    rng = np.random.default_rng([strip.seed, 2, d.seed])
    shape = np.zeros((2 * reach + 1, strip.width), dtype=np.uint8)
    x, y = d.col, reach
    s = max(2, d.size)
    if d.kind == "scratch":
        angle = rng.uniform(-0.25, 0.25)
        dx, dy = s * math.sin(angle), s * math.cos(angle)
        cv2.line(
            shape,
            (round(x - dx / 2), round(y - dy / 2)),
            (round(x + dx / 2), round(y + dy / 2)),
            1,
            thickness=int(rng.integers(2, 4)),
        )
    elif d.kind == "pit":
        axes = (max(1, s // 2), max(1, int(s * rng.uniform(0.5, 0.9)) // 2))
        cv2.ellipse(shape, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif d.kind == "scale":
        n = 9
        ang = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = s / 2 * rng.uniform(0.5, 1.0, n)
        pts = np.stack([x + rad * np.cos(ang), y + rad * np.sin(ang)], axis=1).round().astype(np.int32)
        cv2.fillPoly(shape, [pts], 1)
    elif d.kind == "hole":
        cv2.circle(shape, (x, y), max(2, s // 2), 1, -1)
    elif d.kind == "edge_crack":
        left, right = strip.edges(np.array([d.line], dtype=np.float64))
        from_left = d.col < strip.width // 2
        x0 = round(float(left[0] if from_left else right[0]))
        step = 1 if from_left else -1
        crack = [(x0 - step * 2, y)]
        for i in range(1, 6):
            crack.append((x0 + step * round(s * i / 5), y + int(rng.integers(-3, 4))))
        cv2.polylines(shape, [np.asarray(crack, dtype=np.int32)], False, 1, thickness=2)
    elif d.kind == "stamp":
        # An ink stamp: a frame with a cross and a bar, the same print every time.
        half = s // 2
        cv2.rectangle(shape, (x - half, y - half // 2), (x + half, y + half // 2), 1, thickness=2)
        cv2.line(shape, (x - half, y - half // 2), (x + half, y + half // 2), 1, thickness=2)
        cv2.line(shape, (x - half // 2, y + half // 4), (x + half // 2, y + half // 4), 1, thickness=2)
    else:  # roll_mark: a shallow dent printed by a damaged roll, once per revolution
        cv2.ellipse(shape, (x, y), (max(2, s // 2), max(2, s // 3)), 0.0, 0, 360, 1, -1)
    return shape


def random_defects(
    rng: np.random.Generator,
    *,
    first_line: int,
    lines: int,
    width: int,
    count: int,
    kinds: Sequence[DefectKind] = DEFECT_KINDS,
    avoid: Sequence[PlantedDefect] = (),
    min_gap: int = 80,
) -> list[PlantedDefect]:
    """``count`` defects of the given kinds placed inside the window, away from its borders and
    at least ``min_gap`` pixels (plus their sizes) from each other and from ``avoid``, so that
    each one is a separate region with its own ground truth. Fewer come back when the window
    has no room left."""
    out: list[PlantedDefect] = []
    margin = max(24, width // 12)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        size = {"scratch": 60, "pit": 10, "scale": 36, "hole": 14, "edge_crack": 30, "roll_mark": 14}[kind]
        for _ in range(50):
            line = int(rng.integers(first_line + 32, first_line + max(33, lines - 32)))
            col = int(rng.integers(margin, width - margin))
            if kind == "edge_crack":
                col = margin if rng.random() < 0.5 else width - margin
            if all(max(abs(line - o.line), abs(col - o.col)) >= min_gap + (size + o.size) // 2 for o in (*avoid, *out)):
                out.append(PlantedDefect(kind=kind, line=line, col=col, size=size, seed=int(rng.integers(1 << 30))))
                break
    return out


def _periodic_mark(
    kind: DefectKind,
    *,
    rng: np.random.Generator,
    first_line: int,
    start: int,
    period: int,
    frame_lines: int,
    width: int,
    margin: int,
    size: int,
) -> PlantedDefect:
    """A mark printed once every ``period`` lines at one column (a roll's, a stamp's), its first
    print ``start`` lines or more into the strip, within the first period or frame."""
    return PlantedDefect(
        kind=kind,
        line=first_line + int(rng.integers(start, start + min(period, frame_lines))),
        col=int(rng.integers(margin, width - margin)),
        size=size,
        seed=int(rng.integers(1 << 30)),
        period=period,
    )


class DefectPlan:
    """What is planted along one strip, frame by frame: isolated defects at ``per_frame`` a
    frame's worth of lines (Poisson, every kind in turn in a seeded order) and, when
    ``roll_period`` is set, one roll mark printed once per revolution. It depends only on its
    arguments, never on who asks or how far ahead, so every camera of one strip plans the same
    defects and a planner run without any camera gives the same ground truth."""

    def __init__(
        self,
        *,
        seed: int,
        width: int,
        first_line: int,
        frame_lines: int,
        per_frame: float,
        roll_period: int | None,
        benign_period: int | None = None,
    ) -> None:
        if frame_lines < 64:
            raise ValueError(f"frame_lines must be >= 64, got {frame_lines}")
        if per_frame < 0:
            raise ValueError(f"per_frame must be >= 0, got {per_frame}")
        if roll_period is not None and roll_period < 1:
            raise ValueError(f"roll_period must be >= 1 line, got {roll_period}")
        self.width = width
        self.frame_lines = frame_lines
        self.per_frame = per_frame
        self._rng = np.random.default_rng(seed + 99)
        self._kind_rng = np.random.default_rng([seed, 0x6B1D])
        self._kinds: list[DefectKind] = []
        self.roll_mark: PlantedDefect | None = None
        if roll_period is not None:
            self.roll_mark = _periodic_mark(
                "roll_mark",
                rng=np.random.default_rng([seed, 0x2011]),
                first_line=first_line,
                start=64,
                period=roll_period,
                frame_lines=frame_lines,
                width=width,
                margin=max(24, width // 12),
                size=14,
            )
        # A benign mark (an ink stamp) printed every ``benign_period`` lines: normal strip the model
        # was not fitted on, so it raises false alarms until an operator says it is normal.
        self.benign: PlantedDefect | None = None
        if benign_period is not None:
            if benign_period < 64:
                raise ValueError(f"benign_period must be >= 64 lines, got {benign_period}")
            self.benign = _periodic_mark(
                "stamp",
                rng=np.random.default_rng([seed, 0x57A3]),
                first_line=first_line,
                start=96,
                period=benign_period,
                frame_lines=frame_lines,
                width=width,
                margin=max(40, width // 8),
                size=40,
            )
        self._marks = [m for m in (self.roll_mark, self.benign) if m is not None]
        # The last defects planned (the roll mark first): a new one keeps clear of them.
        self._recent: list[PlantedDefect] = list(self._marks)
        self.planned_to = first_line

    def _next_kinds(self, count: int) -> list[DefectKind]:
        # Every kind in turn, each round in a fresh seeded order: over any 6 defects all kinds
        # appear, and a frame's kind is not predictable from its position.
        while len(self._kinds) < count:
            self._kinds += [DEFECT_KINDS[i] for i in self._kind_rng.permutation(len(DEFECT_KINDS))]
        out, self._kinds = self._kinds[:count], self._kinds[count:]
        return out

    def plan(self, upto: int) -> list[PlantedDefect]:
        """The isolated defects of the frames' worth of lines from ``planned_to`` until it
        reaches ``upto`` (none when it already has)."""
        out: list[PlantedDefect] = []
        # Planned a frame's worth of lines at a time, so the rate is per length of strip.
        while self.planned_to < upto:
            start = self.planned_to
            count = int(self._rng.poisson(self.per_frame)) if self.per_frame > 0 else 0
            if count:
                # The roll mark's prints in this window count as defects to keep clear of.
                prints = [
                    replace(d, line=line, period=0)
                    for d in self._marks
                    for line in occurrences(d, start, self.frame_lines)
                ]
                new = random_defects(
                    self._rng,
                    first_line=start,
                    lines=self.frame_lines,
                    width=self.width,
                    count=count,
                    kinds=self._next_kinds(count),
                    avoid=[*self._recent, *prints],
                )
                out += new
                self._recent = [*self._recent, *new][-_AVOID_RECENT:]
            self.planned_to += self.frame_lines
        return out


_AVOID_RECENT = 20  # planned defects a new one keeps clear of (more than a frame ever holds)


@dataclass(frozen=True)
class LineCamera:
    """A line camera's fixed pattern: per-column gain (PRNU) and dark offset (DSNU), plus
    temporal noise. ``capture`` turns scene radiance (float, grey levels of an ideal camera)
    into the uint8 lines this camera would deliver."""

    gain: np.ndarray
    offset: np.ndarray
    noise: float

    @classmethod
    def random(
        cls,
        *,
        width: int,
        seed: int,
        gain_noise: float = 0.06,
        offset: float = 10.0,
        offset_noise: float = 2.0,
        noise: float = 1.0,
    ) -> LineCamera:
        rng = np.random.default_rng([seed, 0xCA])
        gain = 1.0 + gain_noise * rng.standard_normal(width)
        dark = offset + offset_noise * rng.standard_normal(width)
        return cls(gain=gain.astype(np.float32), offset=dark.astype(np.float32), noise=noise)

    def capture(self, radiance: np.ndarray, *, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 0xCB])
        raw = radiance * self.gain[None, :] + self.offset[None, :]
        raw = raw + self.noise * rng.standard_normal(raw.shape)
        return np.clip(np.rint(raw), 0, 255).astype(np.uint8)


def uniform_target(strip: SyntheticStrip, *, lines: int, level: float) -> np.ndarray:
    """Radiance of a uniform white target under the strip's line lamp (its vignetting)."""
    return np.broadcast_to(level * strip._vignette[None, :], (lines, strip.width)).astype(np.float32)
