"""Frame sources behind one small interface: ``read(timeout) -> LineBlock | None``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from pipeline.acquisition.images import ImageReadError, list_images, read_image
from pipeline.acquisition.synthetic import PlantedDefect, SyntheticStrip, random_defects
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
    """The procedural strip as a line camera: blocks of lines, defects planted at random."""

    def __init__(self, *, cfg: SourceConfig, width: int, seed: int, frame_lines: int) -> None:
        self.width = width
        self.channels = 1
        self.cfg = cfg
        self.strip = SyntheticStrip(width=width, seed=seed)
        self._line = cfg.first_line
        self._end = None if cfg.strip_lines is None else cfg.first_line + cfg.strip_lines
        self._rng = np.random.default_rng(seed + 99)
        self._frame_lines = frame_lines
        self.planted: list[PlantedDefect] = []
        self._planned_to = cfg.first_line
        self._t0 = time.monotonic()

    def _plan(self, upto: int) -> None:
        # Defects are planned one frame's worth of lines ahead, so the rate is per length of strip.
        while self._planned_to < upto:
            start = self._planned_to
            expected = self.cfg.defects_per_100_frames / 100.0
            count = int(self._rng.poisson(expected)) if expected > 0 else 0
            if count:
                self.planted += random_defects(
                    self._rng,
                    first_line=start,
                    lines=self._frame_lines,
                    width=self.width,
                    count=count,
                    avoid=self.planted[-20:],
                )
            self._planned_to += self._frame_lines

    def read(self, timeout: float) -> LineBlock | None:
        if self._end is not None and self._line >= self._end:
            raise EOFError("synthetic strip length reached")
        n = self.cfg.block_lines if self._end is None else min(self.cfg.block_lines, self._end - self._line)
        if self.cfg.line_rate_hz is not None:
            due = self._t0 + (self._line - self.cfg.first_line + n) / self.cfg.line_rate_hz
            wait = due - time.monotonic()
            if wait > timeout:
                time.sleep(timeout)
                return None
            if wait > 0:
                time.sleep(wait)
        self._plan(self._line + n + self._frame_lines)
        near = [d for d in self.planted if d.period or abs(d.line - self._line) < n + 4 * d.size + 16]
        pixels, _ = self.strip.render(self._line, n, near)
        block = LineBlock(pixels=pixels, first_line=self._line, capture_time=time.time())
        self._line += n
        return block

    def close(self) -> None:
        pass


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
