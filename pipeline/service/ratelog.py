"""Logging at a limited rate: a camera sending bad buffers at 80 kHz must not flood the journal."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """At most one message per key every ``interval_s``; the next one says how many were held back."""

    def __init__(self, logger: logging.Logger, *, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Log unless ``key`` was logged within the interval; True when it was logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            held = self._held.pop(key, 0)
            self._last[key] = now
        suffix = f" ({held} more like it since the last report)" if held else ""
        self._log.warning(msg + suffix, *args)
        return True
