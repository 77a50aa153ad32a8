"""What every stripinspect process shares (the daemon, the proxy, the coil service, the
bridge): log lines on stderr (text, or JSON for journald), logging at a limited rate (a camera
sending bad buffers at 80 kHz must not flood the journal), SIGTERM/SIGINT as a stop event, and
systemd's readiness and watchdog notifications."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

CLEAR = "\r\x1b[K"  # carriage return, erase to end of line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, *, tty: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._prefix = CLEAR if tty else ""  # a log line replaces the status line, which is redrawn

    def format(self, record: logging.LogRecord) -> str:
        return self._prefix + super().format(record)


@contextmanager
def logging_to(stream: TextIO, *, quiet: bool, log_json: bool, tty: bool) -> Iterator[None]:
    logger = logging.getLogger("stripinspect")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_json else TextFormatter(tty=tty))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` (only on the main thread, where Python allows handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def notify(message: str) -> bool:
    """Send e.g. "READY=1" or "WATCHDOG=1"; False when not run by systemd with Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


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
