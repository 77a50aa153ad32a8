"""Assemble line blocks from a line camera into overlapping frames (pure, no threads).

Consecutive frames start ``lines - overlap`` lines apart, so a defect on a frame boundary is
seen whole by one of them and each frame's score map has ``overlap / 2`` lines of context on
both sides of the rows it is responsible for. The strip map is the union of those rows.
"""

from __future__ import annotations

import numpy as np

from pipeline.messages import Frame, LineBlock


class LineAssembler:
    """Feed ``LineBlock``s in strip order; take ``Frame``s out.

    Lines must arrive contiguous: a block that does not start where the previous one ended
    raises ValueError (the caller counts it and restarts the assembly with ``reset``).
    """

    def __init__(
        self, *, width: int, channels: int, lines: int, overlap: int, mm_per_line: float, camera_id: str
    ) -> None:
        if not 0 <= overlap < lines or overlap % 2:
            raise ValueError(f"overlap must be even and in [0, lines), got {overlap} for {lines} lines")
        if width < 1 or channels not in (1, 3) or mm_per_line <= 0:
            raise ValueError(f"bad assembler geometry width={width} channels={channels} mm_per_line={mm_per_line}")
        self.width, self.channels, self.lines, self.overlap = width, channels, lines, overlap
        self.step = lines - overlap
        self.mm_per_line = mm_per_line
        self.camera_id = camera_id
        self._buf = np.zeros((lines, width, channels), dtype=np.uint8)
        self._times = np.zeros(lines, dtype=np.float64)
        self._fill = 0
        self._next_line: int | None = None
        self._frame_first: int | None = None
        self._frame_id = 0

    def reset(self) -> None:
        """Drop partial lines (after a gap); the next block starts a new frame sequence."""
        self._fill = 0
        self._next_line = None
        self._frame_first = None

    def push(self, block: LineBlock) -> list[Frame]:
        px = block.pixels
        if px.ndim == 2:
            px = px[:, :, None]
        if px.dtype != np.uint8 or px.ndim != 3 or px.shape[1:] != (self.width, self.channels):
            raise ValueError(
                f"line block {px.dtype} {px.shape} does not match the camera ({self.width} px, {self.channels} ch)"
            )
        if self._next_line is not None and block.first_line != self._next_line:
            raise ValueError(f"line gap: expected line {self._next_line}, got {block.first_line}")
        if self._frame_first is None:
            self._frame_first = block.first_line
        self._next_line = block.first_line + px.shape[0]
        frames = []
        pos = 0
        while pos < px.shape[0]:
            take = min(self.lines - self._fill, px.shape[0] - pos)
            self._buf[self._fill : self._fill + take] = px[pos : pos + take]
            self._times[self._fill : self._fill + take] = block.capture_time
            self._fill += take
            pos += take
            if self._fill == self.lines:
                frames.append(self._emit())
        return frames

    def _emit(self) -> Frame:
        assert self._frame_first is not None
        first = self._frame_first
        half = self.overlap // 2
        frame = Frame(
            frame_id=self._frame_id,
            camera_id=self.camera_id,
            pixels=self._buf.copy(),
            first_line=first,
            valid_from=0 if self._frame_id == 0 else half,
            valid_to=self.lines - half,
            capture_time=float(self._times[-1]),
            md_m=first * self.mm_per_line / 1000.0,
        )
        self._frame_id += 1
        # Keep the overlap: the next frame starts `step` lines later.
        self._buf[: self.overlap] = self._buf[self.step :]
        self._times[: self.overlap] = self._times[self.step :]
        self._fill = self.overlap
        self._frame_first = first + self.step
        return frame
