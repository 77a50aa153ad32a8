"""GigE Vision / USB3 Vision cameras through Aravis (Debian's gir1.2-aravis-0.8, PyGObject).

Imported only when the config asks for a genicam source, so the rest of the runtime does not
need GObject. Each stream buffer is one block of lines; buffer ids that jump mean lost buffers,
and the block's first line jumps with them, so the frame assembler sees the gap.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pipeline.config import GenicamConfig
from pipeline.errors import StripinspectError
from pipeline.transport.messages import LineBlock

log = logging.getLogger("stripinspect.genicam")


class CameraError(StripinspectError):
    """The camera cannot be opened or configured."""


def _aravis() -> tuple[Any, type[Exception]]:
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ImportError, ValueError) as err:
        raise CameraError(
            f"Aravis is not available ({err}); install gir1.2-aravis-0.8 and PyGObject (extra 'genicam')"
        ) from None
    return Aravis, GLib.Error


class GenicamSource:
    """Blocks of lines from a GenICam camera. ``incomplete`` counts buffers that arrived bad."""

    def __init__(self, *, cfg: GenicamConfig) -> None:
        aravis, glib_error = _aravis()
        self._aravis = aravis
        self._glib_error = glib_error
        self._cfg = cfg
        self._open()
        self.channels = 1
        self.timeout_s = cfg.timeout_s
        self.model = self._cam.get_model_name()
        self.incomplete = 0
        self.stalls = 0
        self.reopens = 0
        self._last_id: int | None = None
        self._line = 0

    def _open(self) -> None:
        aravis, glib_error, cfg = self._aravis, self._glib_error, self._cfg
        try:
            aravis.update_device_list()
            self._cam = aravis.Camera.new(cfg.device_id)
            if cfg.region is not None:
                self._cam.set_region(*cfg.region)
            self._cam.set_pixel_format_from_string(cfg.pixel_format)
            if cfg.exposure_us is not None:
                self._cam.set_exposure_time(cfg.exposure_us)
            if cfg.frame_rate_hz is not None:
                self._cam.set_frame_rate(cfg.frame_rate_hz)
            if cfg.trigger_source is not None:
                self._cam.set_trigger(cfg.trigger_source)
            _, _, self.width, self.lines = self._cam.get_region()
            payload = self._cam.get_payload()
            self._stream = self._cam.create_stream(None, None)
            for _ in range(cfg.buffers):
                self._stream.push_buffer(aravis.Buffer.new_allocate(payload))
            self._cam.start_acquisition()
        except glib_error as err:
            raise CameraError(f"camera {cfg.device_id or '(first found)'}: {err}") from None

    def reopen(self) -> None:
        """Open the camera again after it stalled or vanished (CameraError while it is away).
        Line numbers jump past the outage so that the frame assembler starts a new sequence."""
        self.close()
        self._cam = None
        self._stream = None
        self._open()
        self.reopens += 1
        self._last_id = None
        self._line += 1_000_000

    def read(self, timeout: float) -> LineBlock | None:
        buf = self._stream.timeout_pop_buffer(int(min(timeout, self.timeout_s) * 1e6))
        if buf is None:
            self.stalls += 1
            return None
        try:
            if buf.get_status() != self._aravis.BufferStatus.SUCCESS:
                self.incomplete += 1
                return None
            w, h = buf.get_image_width(), buf.get_image_height()
            data = np.frombuffer(buf.get_data(), dtype=np.uint8)
            if w != self.width or data.size < w * h:
                self.incomplete += 1
                return None
            frame_id = int(buf.get_frame_id())
            if self._last_id is not None and frame_id != self._last_id + 1:
                self._line += max(0, frame_id - self._last_id - 1) * h
            self._last_id = frame_id
            block = LineBlock(
                pixels=data[: w * h].reshape(h, w).copy(), first_line=self._line, capture_time=time.time()
            )
            self._line += h
            return block
        finally:
            self._stream.push_buffer(buf)

    def close(self) -> None:
        if self._cam is None:
            return
        try:
            self._cam.stop_acquisition()
        except self._glib_error as err:
            # The camera may already be gone (unplugged, simulator stopped); closing must not raise.
            log.info("camera stop failed: %s", err)
