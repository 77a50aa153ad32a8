"""Assemble line blocks from a line camera into overlapping frames (pure, no threads).

Consecutive frames start ``lines - overlap`` lines apart, so a defect on a frame boundary is
seen whole by one of them and each frame's score map has ``overlap / 2`` lines of context on
both sides of the rows it is responsible for. The strip map is the union of those rows.
"""

from __future__ import annotations

import numpy as np

from pipeline.transport.messages import Frame, LineBlock


class BadBlockError(ValueError):
    """A line block the assembler cannot take; ``reason`` names why, for the drop counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_block(block: LineBlock, *, width: int, channels: int) -> np.ndarray:
    """The block's pixels as (lines, width, channels) uint8, or BadBlockError with the reason."""
    px = block.pixels
    if not isinstance(px, np.ndarray):
        raise BadBlockError("not_an_array", f"line block pixels are {type(px).__name__}, not an array")
    if px.dtype != np.uint8:
        if px.dtype.kind == "f" and not np.isfinite(px).all():
            raise BadBlockError("non_finite", f"line block {px.dtype} {px.shape} holds NaN or inf")
        # Never guess a pixel scale from the data: only 8-bit lines are taken.
        raise BadBlockError("wrong_dtype", f"line block is {px.dtype}, expected uint8")
    if px.ndim == 2:
        px = px[:, :, None]
    if px.ndim != 3 or px.shape[1:] != (width, channels):
        raise BadBlockError(
            "wrong_shape", f"line block {px.shape} does not match the camera ({width} px, {channels} ch)"
        )
    if px.shape[0] == 0:
        raise BadBlockError("empty", "line block has no lines")
    return px


class LineAssembler:
    """Feed ``LineBlock``s in strip order; take ``Frame``s out.

    Lines must arrive contiguous. A block that starts past where the previous one ended (lines
    lost) raises BadBlockError("line_gap"): the caller counts it, calls ``reset`` and pushes the
    block again as the start of a new sequence. A block that starts before (repeated or out of
    order) raises BadBlockError("repeated_lines") and changes nothing.
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
        px = check_block(block, width=self.width, channels=self.channels)
        if self._next_line is not None and block.first_line > self._next_line:
            raise BadBlockError("line_gap", f"line gap: expected line {self._next_line}, got {block.first_line}")
        if self._next_line is not None and block.first_line < self._next_line:
            raise BadBlockError(
                "repeated_lines", f"lines from {block.first_line} again or out of order (expected {self._next_line})"
            )
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
