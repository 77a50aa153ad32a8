"""Health: is every stage alive and making progress? Feeds the systemd watchdog while it is.

Frames need not advance: a line stop with the camera reconnecting is healthy (the supervisor's
``progress`` advances with every read timeout and reopen attempt). A stage whose loop has not
come round for ``stuck_s`` (a read, an ONNX call or a socket that hangs) stops the feeding, and
systemd restarts the daemon ``WatchdogSec`` later.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from pipeline.process import notify

log = logging.getLogger("stripinspect.health")


class Liveness:
    """Each stage loop calls ``beat(name)`` once per iteration, idle timeouts included."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._last[name] = now

    def ages(self) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            return {k: now - v for k, v in self._last.items()}


def watchdog_period_s(default: float = 1.0) -> float:
    """Half of systemd's WatchdogSec ($WATCHDOG_USEC, as sd_watchdog_enabled reads it)."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return default
    return max(0.01, usec / 2e6) if usec > 0 else default


class HealthLoop:
    """Runs in its own thread until ``done`` is set or a stage thread ends: ``problems()``
    empty -> WATCHDOG=1."""

    def __init__(
        self,
        *,
        liveness: Liveness,
        threads: Callable[[], list[threading.Thread]],
        camera_progress: Callable[[], float | None],
        stuck_s: float,
        period_s: float,
    ) -> None:
        if stuck_s <= 0 or period_s <= 0:
            raise ValueError(f"stuck_s and period_s must be > 0, got {stuck_s}, {period_s}")
        self._liveness = liveness
        self._threads = threads
        self._camera_progress = camera_progress
        self._stuck_s = stuck_s
        self._period_s = period_s

    def problems(self) -> dict[str, str]:
        """Why the daemon is not healthy now, by stage; empty when it is."""
        out = {}
        ages = self._liveness.ages()
        for t in self._threads():
            name = t.name.removeprefix("stripinspect-")
            if ages.get(name, 0.0) > self._stuck_s:
                out[name] = f"stage {name} stuck for {ages[name]:.1f} s"
        progress = self._camera_progress()  # None while the camera is not being read
        camera_age = 0.0 if progress is None else time.monotonic() - progress
        if camera_age > self._stuck_s:
            out["camera"] = f"camera supervisor made no progress for {camera_age:.1f} s"
        return out

    def run(self, done: threading.Event) -> None:
        reported: set[str] = set()
        while not done.wait(self._period_s):
            if not all(t.is_alive() for t in self._threads()):
                # Finishing: drained at the end of the source, stopping, or a stage crashed
                # (logged and failing the process already). systemd stops its watchdog on stop.
                return
            problems = self.problems()
            if not problems:
                notify("WATCHDOG=1")
            elif set(problems) != reported:
                log.error("not feeding the systemd watchdog: %s", "; ".join(problems.values()))
            reported = set(problems)
