"""Frame sources behind one small interface: ``read(timeout) -> LineBlock | None``."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from pipeline.acquisition.images import ImageReadError, list_images, read_image
from pipeline.acquisition.synthetic import (
    DEFECT_KINDS,
    DefectKind,
    PlantedDefect,
    SyntheticStrip,
    occurrences,
    random_defects,
)
from pipeline.config import SourceConfig
from pipeline.transport.messages import LineBlock


class Source(Protocol):
    width: int
    channels: int

    def read(self, timeout: float) -> LineBlock | None:
        """The next block, or None when nothing came within ``timeout`` seconds.
        Raises EOFError when the source has ended."""
        ...

    def close(self) -> None: ...


class SyntheticSource:
    """The procedural strip as a line camera: blocks of lines, paced by the wall clock when
    ``line_rate_hz`` is set, with defects planted along the strip. ``planted`` is the ground
    truth: every defect ahead of the camera and the last ``KEEP_PASSED`` behind it. What is
    planted where depends only on the seed and the strip position, never on timing, so a run
    can be replayed."""

    def __init__(self, *, cfg: SourceConfig, width: int, seed: int, frame_lines: int) -> None:
        if frame_lines < 64:
            raise ValueError(f"frame_lines must be >= 64, got {frame_lines}")
        self.width = width
        self.channels = 1
        self.cfg = cfg
        self.strip = SyntheticStrip(width=width, seed=seed)
        self._line = cfg.first_line
        self._end = None if cfg.strip_lines is None else cfg.first_line + cfg.strip_lines
        self._rng = np.random.default_rng(seed + 99)
        self._kind_rng = np.random.default_rng([seed, 0x6B1D])
        self._kinds: list[DefectKind] = []
        self._frame_lines = frame_lines
        self.planted: list[PlantedDefect] = []
        self._live = 0  # planted[:_live] lie behind the camera: not scanned again when rendering
        self._periodic: list[PlantedDefect] = []
        self._planned_to = cfg.first_line
        if cfg.plant_defects and cfg.roll_period_lines is not None:
            self._periodic.append(self._roll_mark(cfg.roll_period_lines))
            self.planted.append(self._periodic[-1])
        # The clock starts at the first read (when the daemon starts acquiring), not here.
        self._t0: float | None = None
        self._delivered = 0
        self._pending: LineBlock | None = None

    def _roll_mark(self, period: int) -> PlantedDefect:
        rng = np.random.default_rng([self.strip.seed, 0x2011])
        margin = max(24, self.width // 12)
        return PlantedDefect(
            kind="roll_mark",
            line=self.cfg.first_line + int(rng.integers(64, 64 + min(period, self._frame_lines))),
            col=int(rng.integers(margin, self.width - margin)),
            size=14,
            seed=int(rng.integers(1 << 30)),
            period=period,
        )

    def _next_kinds(self, count: int) -> list[DefectKind]:
        # Every kind in turn, each round in a fresh seeded order: over any 6 defects all kinds
        # appear, and a frame's kind is not predictable from its position.
        while len(self._kinds) < count:
            self._kinds += [DEFECT_KINDS[i] for i in self._kind_rng.permutation(len(DEFECT_KINDS))]
        out, self._kinds = self._kinds[:count], self._kinds[count:]
        return out

    def _plan(self, upto: int) -> None:
        # Defects are planned one frame's worth of lines ahead, so the rate is per length of strip.
        while self._planned_to < upto:
            start = self._planned_to
            expected = self.cfg.defects_per_100_frames / 100.0 if self.cfg.plant_defects else 0.0
            count = int(self._rng.poisson(expected)) if expected > 0 else 0
            if count:
                # The roll mark's prints in this window count as defects to keep clear of.
                prints = [
                    replace(d, line=line, period=0)
                    for d in self._periodic
                    for line in occurrences(d, start, self._frame_lines)
                ]
                self.planted += random_defects(
                    self._rng,
                    first_line=start,
                    lines=self._frame_lines,
                    width=self.width,
                    count=count,
                    kinds=self._next_kinds(count),
                    avoid=[*self.planted[-20:], *prints],
                )
            self._planned_to += self._frame_lines

    def _render(self, n: int) -> LineBlock:
        self._plan(self._line + n + self._frame_lines)
        while self._live < len(self.planted) and self.planted[self._live].line < self._line - _PASSED:
            self._live += 1
        if self._live > KEEP_PASSED:
            # A daemon runs for months: the ground truth keeps the last KEEP_PASSED defects the
            # camera has passed (and the roll mark), not every one since start.
            drop = self._live - KEEP_PASSED
            periodic = [d for d in self.planted[:drop] if d.period]
            self.planted[:drop] = periodic
            self._live -= drop - len(periodic)
        near = [
            d for d in self.planted[self._live :] if not d.period and abs(d.line - self._line) < n + 4 * d.size + 16
        ]
        pixels, _ = self.strip.render(self._line, n, [*self._periodic, *near])
        return LineBlock(pixels=pixels, first_line=self._line, capture_time=time.time())

    def read(self, timeout: float) -> LineBlock | None:
        if self._pending is None:
            if self._end is not None and self._line >= self._end:
                raise EOFError("synthetic strip length reached")
            n = self.cfg.block_lines if self._end is None else min(self.cfg.block_lines, self._end - self._line)
            # Rendered before waiting, so the block leaves on time rather than a render late.
            self._pending = self._render(n)
            self._line += n
        block = self._pending
        rate = self.cfg.line_rate_hz
        if rate is not None:
            now = time.monotonic()
            if self._t0 is None:
                self._t0 = now
            # Scheduled against the start: a block is due when its last line has been exposed.
            # Sleeping a block period per read would drift by the render and hand-over time.
            wait = self._t0 + (self._delivered + block.pixels.shape[0]) / rate - now
            if wait > timeout:
                time.sleep(max(0.0, timeout))
                return None
            if wait > 0:
                time.sleep(wait)
            block = replace(block, capture_time=time.time())
        self._pending = None
        self._delivered += block.pixels.shape[0]
        return block

    def close(self) -> None:
        pass


# Planted defects behind the camera kept in ``SyntheticSource.planted``.
KEEP_PASSED = 10_000

# Lines behind the camera after which a planted (non-periodic) defect can no longer reach a
# block: more than the largest defect's reach (2 size + 8 for a 60 px scratch).
_PASSED = 256


class FolderSource:
    """Replays image files in name order as consecutive blocks of the strip."""

    def __init__(self, *, folder: Path, channels: int) -> None:
        self.files = list_images(folder)
        if not self.files:
            raise ImageReadError(f"{folder}: no images to replay")
        first = read_image(self.files[0], channels)
        self.width = first.shape[1]
        self.channels = channels
        self._i = 0
        self._line = 0
        self.errors = 0

    def read(self, timeout: float) -> LineBlock | None:
        while self._i < len(self.files):
            path = self.files[self._i]
            self._i += 1
            try:
                img = read_image(path, self.channels)
            except ImageReadError:
                self.errors += 1
                continue
            if img.shape[1] != self.width:
                self.errors += 1
                continue
            block = LineBlock(pixels=img, first_line=self._line, capture_time=time.time())
            self._line += img.shape[0]
            return block
        raise EOFError("folder replay finished")

    def close(self) -> None:
        pass


class VideoSource:
    """A video file through OpenCV; each video frame is one block of lines, converted to grey."""

    def __init__(self, *, path: Path) -> None:
        if not path.is_file():
            raise ImageReadError(f"{path}: no such video file")
        self._cap = cv2.VideoCapture(str(path))
        ok, first = self._cap.read()
        if not ok or first is None:
            self._cap.release()
            raise ImageReadError(f"{path}: OpenCV cannot decode this video")
        self._pending: np.ndarray | None = _grey(first)
        self.width = self._pending.shape[1]
        self.channels = 1
        self._line = 0
        self.errors = 0

    def read(self, timeout: float) -> LineBlock | None:
        if self._pending is not None:
            img, self._pending = self._pending, None
        else:
            ok, frame = self._cap.read()
            if not ok or frame is None:
                raise EOFError("video finished")
            img = _grey(frame)
            if img.shape[1] != self.width:
                self.errors += 1
                return None
        block = LineBlock(pixels=img, first_line=self._line, capture_time=time.time())
        self._line += img.shape[0]
        return block

    def close(self) -> None:
        self._cap.release()


def _grey(frame: np.ndarray) -> np.ndarray:
    return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
