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
        return self._emit(logging.WARNING, key, msg, args, exc_info=False)

    def error(self, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """As ``warning``, at error level, with the current exception's traceback on request."""
        return self._emit(logging.ERROR, key, msg, args, exc_info=exc_info)

    def _emit(self, level: int, key: str, msg: str, args: tuple[object, ...], *, exc_info: bool) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            held = self._held.pop(key, 0)
            self._last[key] = now
        suffix = f" ({held} more like it since the last report)" if held else ""
        self._log.log(level, msg + suffix, *args, exc_info=exc_info)
        return True
