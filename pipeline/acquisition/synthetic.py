"""A procedural steel strip: the project's own data for its demo and its tests.

Rolled texture with streaks along the rolling direction (MD runs down the image, one image row
per camera line), fine grain, slow illumination drift, vignetting across the strip (CD), strip
edges that wander with dark background beyond them, and plantable defects with ground-truth
masks. Everything is a function of the strip position and the seed, so a frame rendered in one
piece equals the same lines rendered as consecutive pieces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

DefectKind = Literal["scratch", "pit", "scale", "hole", "edge_crack", "roll_mark"]
DEFECT_KINDS: tuple[DefectKind, ...] = ("scratch", "pit", "scale", "hole", "edge_crack", "roll_mark")

_BLOCK = 64  # lines per noise block; noise is seeded per block so any window renders the same
_PAD = 8  # lines of context either side of a window, more than the grain blur reaches


@dataclass(frozen=True)
class PlantedDefect:
    """A defect at strip position (``line`` along MD, ``col`` across, in pixels).

    ``size`` is the defect's characteristic length in pixels; ``period`` (lines) repeats a roll
    mark at every roll revolution from ``line`` on; ``seed`` fixes its shape.
    """

    kind: DefectKind
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
        self.edge_margin = max(4, width // 24) if edge_margin is None else edge_margin
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

    def edges(self, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left and right strip edge (float columns) at each line: the strip wanders slowly."""
        wander = 0.4 * self.edge_margin * np.sin(2 * math.pi * lines / 2500.0 + self._edge_phase[0])
        left = self.edge_margin + wander
        right = self.width - 1 - self.edge_margin + wander
        return left, right

    def _grain(self, first: int, count: int) -> np.ndarray:
        b0 = (first - _PAD) // _BLOCK
        b1 = (first + count + _PAD - 1) // _BLOCK
        blocks = [
            np.random.default_rng([self.seed, 1, b + (1 << 32)])
            .standard_normal((_BLOCK, self.width))
            .astype(np.float32)
            for b in range(b0, b1 + 1)
        ]
        noise: np.ndarray = np.concatenate(blocks)
        # Elongated along MD, like rolled grain.
        noise = cv2.GaussianBlur(noise, (3, 7), sigmaX=0.7, sigmaY=1.6, borderType=cv2.BORDER_REFLECT)
        start = first - b0 * _BLOCK
        return noise[start : start + count] * 9.0

    def render_normal(self, first_line: int, lines: int) -> np.ndarray:
        """float32 (lines, width) image of the defect-free strip, before quantisation."""
        if lines < 1:
            raise ValueError(f"lines must be >= 1, got {lines}")
        y = np.arange(first_line, first_line + lines, dtype=np.float64)
        drift = 1.0 + 0.06 * np.sin(2 * math.pi * y / 7000.0)
        mod = 0.8 + 0.2 * np.sin(self._streak_mod * y)
        img = self.base_level + mod[:, None] * self._streaks[None, :] * 0.3
        img = img + self._grain(first_line, lines)
        img = img * drift[:, None] * self._vignette[None, :]
        left, right = self.edges(y)
        cols = np.arange(self.width)[None, :]
        inside = (cols >= left[:, None]) & (cols <= right[:, None])
        background = 18.0 + 0.3 * self._grain(first_line + 100_000, lines)
        return np.where(inside, img, background).astype(np.float32)

    def render(
        self, first_line: int, lines: int, defects: Sequence[PlantedDefect] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (lines, width), mask bool (lines, width)) with ``defects`` drawn."""
        img = self.render_normal(first_line, lines)
        mask = np.zeros((lines, self.width), dtype=np.uint8)
        for d in defects:
            for line in occurrences(d, first_line, lines):
                # Drawn on a canvas centred on the defect, then the rows inside the window are
                # pasted: rasterising a shape clipped by the window would depend on the window.
                reach = _reach(d)
                canvas = _draw(self, d, reach)
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


_DELTA = {"scratch": -55.0, "pit": -75.0, "scale": -35.0, "hole": math.nan, "edge_crack": math.nan, "roll_mark": -28.0}


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
