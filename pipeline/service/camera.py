"""The camera supervisor: stall detection and reopening with doubling backoff.

States: ``online`` (lines arrive), ``reconnecting`` (no lines for ``stall_s``; the source is
being reopened, backing off up to ``backoff_max_s``), ``offline`` (no lines and the source
cannot be reopened). ``progress`` is the monotonic time of the last read that returned or the
last reopen attempt: it advances while the camera is away and only stops when a read hangs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.acquisition.genicam import CameraError
from pipeline.acquisition.sources import Source
from pipeline.process import RateLimitedLog
from pipeline.service.stats import Stats
from pipeline.transport.messages import LineBlock

log = logging.getLogger("stripinspect.camera")


class CameraSupervisor:
    """Used by the acquire thread only; ``state``, ``progress`` and ``status()`` may be read from any."""

    def __init__(
        self, *, source: Source, stall_s: float, reconnect_s: float, backoff_max_s: float, stats: Stats
    ) -> None:
        if min(stall_s, reconnect_s, backoff_max_s) <= 0:
            raise ValueError(f"camera timings must be > 0: {stall_s}, {reconnect_s}, {backoff_max_s}")
        self.source = source
        self._stall_s, self._reconnect_s, self._backoff_max_s = stall_s, reconnect_s, backoff_max_s
        self._stats = stats
        self._ratelog = RateLimitedLog(log, interval_s=10.0)
        self.online = True
        self.reading = False  # between ``start`` and ``finish``: only then must ``progress`` move
        self.progress = time.monotonic()
        self._last_block = self.progress
        self._next_reopen, self._backoff = 0.0, 0.0

    @property
    def state(self) -> str:
        if self.online:
            return "online"
        return "reconnecting" if getattr(self.source, "reopen", None) is not None else "offline"

    def start(self) -> None:
        """Acquisition begins: the stall clock starts now, not at construction."""
        self.progress = self._last_block = time.monotonic()
        self.reading = True

    def finish(self) -> None:
        """The acquire stage reads no more (the source ended, or stop): nothing to supervise."""
        self.reading = False

    def read(self, timeout: float) -> tuple[LineBlock | None, bool]:
        """(block or None, True when the block is the first after an outage: lines are lost,
        the frame assembler must start a new sequence). EOFError when the source has ended."""
        try:
            block = self.source.read(timeout=timeout)
        except CameraError as err:
            # A camera that vanished mid-read: treated as a stall, reopened below.
            self._ratelog.warning("camera", "camera read failed: %s", err)
            block = None
        now = time.monotonic()
        self.progress = now
        if block is None:
            self._stalled(now)
            return None, False
        resumed = not self.online
        if resumed:
            self.online = True
            log.info("camera back online after %.1f s", now - self._last_block)
        self._last_block = now
        return block, resumed

    def _stalled(self, now: float) -> None:
        idle = now - self._last_block
        if idle > self._stall_s and self.online:
            self.online = False
            self._stats.count("camera_offline_total")
            log.warning("no lines from the camera for %.1f s: camera_offline", idle)
        reopen = getattr(self.source, "reopen", None)
        due = idle > self._reconnect_s and now >= self._next_reopen
        if self.online or reopen is None or not due:
            return
        try:
            reopen()
            self._stats.count("camera_reopens_total")
            log.info("camera reopened; waiting for lines")
            self._last_block = now  # give it a stall period to deliver
            self._backoff = 0.0
        except CameraError as err:
            self._backoff = min(self._backoff_max_s, max(1.0, 2 * self._backoff))
            self._next_reopen = now + self._backoff
            self._ratelog.warning("reopen", "camera reopen failed (next try in %.0f s): %s", self._backoff, err)
        self.progress = time.monotonic()

    def status(self) -> dict[str, Any]:
        """Online or not, the state, and the source's own counters where it keeps them (GenICam:
        buffers that arrived incomplete, read timeouts, reopens)."""
        out: dict[str, Any] = {"online": self.online, "state": self.state}
        for name in ("incomplete", "stalls", "reopens"):
            value = getattr(self.source, name, None)
            if isinstance(value, int):
                out[name] = value
        return out
