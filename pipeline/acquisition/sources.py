"""Frame sources behind one small interface: ``read(timeout) -> LineBlock | None``."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from pipeline.acquisition.images import ImageReadError, list_images, read_image
from pipeline.acquisition.synthetic import DefectPlan, PlantedDefect, SyntheticStrip
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
    can be replayed.

    With ``cfg.strip_width`` set, the camera is one of several side by side over a strip that
    wide: it sees the strip's columns ``[strip_x0, strip_x0 + width)``, and the strip, its edges
    and its defects (``planted`` in strip columns) are the same for every camera with that seed,
    strip width and ``frame_lines``."""

    def __init__(self, *, cfg: SourceConfig, width: int, seed: int, frame_lines: int) -> None:
        self.width = width
        self.channels = 1
        self.cfg = cfg
        strip_width = strip_width_of(cfg, width=width)
        self.strip = SyntheticStrip(width=strip_width, seed=seed)
        self._cols = (cfg.strip_x0, cfg.strip_x0 + width)
        if cfg.resume_line is not None and cfg.resume_line < cfg.first_line:
            raise ValueError(f"resume_line {cfg.resume_line} is before first_line {cfg.first_line}")
        # A restarted camera joins the strip where it then is; what is planted where does not move.
        self._line = cfg.first_line if cfg.resume_line is None else cfg.resume_line
        self._end = None if cfg.strip_lines is None else cfg.first_line + cfg.strip_lines
        self._plan = defect_plan(cfg, seed=seed, strip_width=strip_width, frame_lines=frame_lines)
        self._frame_lines = frame_lines
        self.planted: list[PlantedDefect] = []
        self._live = 0  # planted[:_live] lie behind the camera: not scanned again when rendering
        self._periodic: list[PlantedDefect] = []
        if self._plan.roll_mark is not None:
            self._periodic.append(self._plan.roll_mark)
            self.planted.append(self._plan.roll_mark)
        # Drawn, never in ``planted``: the benign mark is normal strip, not a defect.
        self.benign = self._plan.benign
        if self.benign is not None:
            self._periodic.append(self.benign)
        # The clock starts at the first read (when the daemon starts acquiring), not here.
        self._t0: float | None = None
        self._delivered = 0
        self._pending: LineBlock | None = None

    def _render(self, n: int) -> LineBlock:
        # Planned a frame beyond the block: a defect centred past its end can reach back into it.
        self.planted += self._plan.plan(self._line + n + self._frame_lines)
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
        pixels, _ = self.strip.render(self._line, n, [*self._periodic, *near], cols=self._cols)
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


def strip_width_of(cfg: SourceConfig, *, width: int) -> int:
    """The synthetic strip's width for a camera ``width`` px wide: ``cfg.strip_width``, or the
    camera's own width when that is None. ValueError of one line when the camera's slice from
    ``strip_x0`` does not fit on the strip."""
    if cfg.strip_width is None:
        if cfg.strip_x0:
            raise ValueError(f"source.strip_x0 is {cfg.strip_x0} but source.strip_width is not set")
        return width
    if width > cfg.strip_width - cfg.strip_x0:
        raise ValueError(
            f"a camera {width} px wide from source.strip_x0 {cfg.strip_x0} runs past source.strip_width "
            f"{cfg.strip_width}: at most {max(0, cfg.strip_width - cfg.strip_x0)} px fit"
        )
    return cfg.strip_width


def defect_plan(cfg: SourceConfig, *, seed: int, strip_width: int, frame_lines: int) -> DefectPlan:
    """The defects the synthetic source of ``cfg`` plants on a strip ``strip_width`` px wide: the
    one place that reads the planting settings, for the source and for ground truth without it."""
    planting = cfg.plant_defects
    return DefectPlan(
        seed=seed,
        width=strip_width,
        first_line=cfg.first_line,
        frame_lines=frame_lines,
        per_frame=cfg.defects_per_100_frames / 100.0 if planting else 0.0,
        roll_period=cfg.roll_period_lines if planting else None,
        benign_period=cfg.benign_period_lines,
    )


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
