"""``stripinspect run``: open the source, start the daemon and its metrics, show the work, drain.

On stderr: one status line about once a second (state, frames/s, Mpx/s, alerts, drops, end-to-end
latency p50/p99; redrawn in place on a terminal) and one line per alert; ``quiet`` keeps only
warnings and errors; ``log_json`` makes every line a JSON object (journald, log shippers). The
final summary (the daemon's counters) goes to stdout as JSON. SIGTERM and SIGINT drain and exit
0, SIGHUP reloads the bundle.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from pipeline.acquisition.factory import open_source
from pipeline.config import Config
from pipeline.process import CLEAR, logging_to
from pipeline.service.control import BindError
from pipeline.service.daemon import Daemon

log = logging.getLogger("stripinspect.run")
STATUS_PERIOD_S = 1.0
RATE_WINDOW_S = 5.0


def alert_line(h: dict[str, Any]) -> str:
    return (
        f"alert {h['seq']}: MD {h['md_m']:.3f} m, CD {h['cd_mm']:.1f} mm, {h['length_mm']:.1f} x "
        f"{h['width_mm']:.1f} mm ({h['area_mm2']:.1f} mm2), score {h['max_score']:.2f}"
    )


class Console:
    """Turns successive ``Daemon.snapshot()``s into a status line and alert lines."""

    def __init__(self, *, stream: TextIO, tty: bool, log_json: bool) -> None:
        self._stream, self._tty, self._json = stream, tty and not log_json, log_json
        # (time, frames scored, lines) of the last RATE_WINDOW_S: a line delivering 1.25 frames/s
        # reads 1 or 2 frames in any one second, so rates are taken over a few seconds.
        self._seen: deque[tuple[float, int, int]] = deque()
        self._last_alert = -1
        self._console_log = logging.getLogger("stripinspect.console")

    def status(self, snap: dict[str, Any], now: float) -> dict[str, Any]:
        counts = snap["counts"]
        frames, lines = counts.get("frames_scored_total", 0), counts.get("lines_total", 0)
        fps = mpx = 0.0
        while self._seen and now - self._seen[0][0] > RATE_WINDOW_S:
            self._seen.popleft()
        if self._seen and now > self._seen[0][0]:
            t0, frames0, lines0 = self._seen[0]
            fps = (frames - frames0) / (now - t0)
            mpx = (lines - lines0) * snap["camera"].get("width", 0) / (now - t0) / 1e6
        self._seen.append((now, frames, lines))
        e2e = snap["latency_seconds"].get("end_to_end", {})
        return {
            "state": snap["state"],
            "camera": snap["camera"].get("state", "online"),
            "frames_per_s": round(fps, 2),
            "mpx_per_s": round(mpx, 3),
            "alerts": counts.get("alerts_total", 0),
            "drops": sum(snap["drops"].values()),
            "e2e_p50_ms": None if "p50" not in e2e else round(1000 * e2e["p50"], 1),
            "e2e_p99_ms": None if "p99" not in e2e else round(1000 * e2e["p99"], 1),
        }

    @staticmethod
    def status_line(s: dict[str, Any]) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f} ms"

        return (
            f"{s['state']} (camera {s['camera']}) | {s['frames_per_s']:.1f} frames/s, {s['mpx_per_s']:.2f} Mpx/s | "
            f"alerts {s['alerts']} | drops {s['drops']} | latency p50 {ms(s['e2e_p50_ms'])} p99 {ms(s['e2e_p99_ms'])}"
        )

    def update(self, snap: dict[str, Any], now: float) -> None:
        s = self.status(snap, now)
        for h in snap["recent_alerts"]:
            if h["seq"] > self._last_alert:
                self._emit(
                    alert_line(h), {"event": "alert", **{k: h[k] for k in ("seq", "md_m", "cd_mm", "max_score")}}
                )
                self._last_alert = h["seq"]
        line = self.status_line(s)
        if self._tty:
            self._stream.write(CLEAR + line)
            self._stream.flush()
        else:
            self._emit(line, {"event": "status", **s})

    def _emit(self, text: str, fields: dict[str, Any]) -> None:
        if self._json:
            self._console_log.info(text, extra={"fields": fields})
        elif self._tty:
            self._stream.write(CLEAR + text + "\n")
        else:
            self._stream.write(text + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


@contextmanager
def signals_to(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT drain, SIGHUP reloads (only from the main thread, where Python allows it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    # Handlers only set events: a reload (seconds of hashing and warm-up) runs on the control
    # thread, which keeps the watchdog fed, not inside the handler on the main thread.
    wanted = {
        signal.SIGTERM: lambda *_: daemon.stop(),
        signal.SIGINT: lambda *_: daemon.stop(),
        signal.SIGHUP: lambda *_: daemon.request_reload(),
    }
    previous = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(cfg: Config, *, quiet: bool, log_json: bool, err: TextIO | None = None, out: TextIO | None = None) -> int:
    """Run the daemon until the source ends or a signal; 0 when it drained, 1 when a stage
    failed. Start-up problems raise a StripinspectError of one line (the CLI exits 2)."""
    err = err if err is not None else sys.stderr
    out = out if out is not None else sys.stdout
    tty = err.isatty()
    with logging_to(err, quiet=quiet, log_json=log_json, tty=tty):
        d = cfg.daemon
        daemon = Daemon(
            cfg=d, runtime=cfg.runtime, scoring=cfg.scoring, source=open_source(cfg), coil_grades=list(cfg.coil.grades)
        )
        server = None
        if d.metrics_port is not None:
            from pipeline.service.metrics import serve_metrics

            try:
                server, _ = serve_metrics(daemon, port=d.metrics_port, addr=d.metrics_addr)
            except OSError as e:
                daemon.close()
                reason = e if e.errno is None else os.strerror(e.errno)
                where = f"{d.metrics_addr}:{d.metrics_port}"
                raise BindError(key="daemon.metrics_port", endpoint=where, reason=reason) from None
        console = None if quiet else Console(stream=err, tty=tty, log_json=log_json)
        try:
            with signals_to(daemon):
                log.info("running: PUB %s, control %s", daemon.publisher.endpoint, daemon.control_endpoint)
                daemon.start()
                while not daemon.wait(STATUS_PERIOD_S):
                    if console is not None:
                        console.update(daemon.snapshot(), time.monotonic())
                daemon.stop()
                daemon.join()
                if console is not None:
                    console.update(daemon.snapshot(), time.monotonic())  # the totals, drained
        finally:
            if server is not None:  # first: it reads the daemon
                server.shutdown()
                server.server_close()
            # Also when start() or the console raised: no threads or sockets left behind.
            daemon.stop()
            daemon.join()
            if console is not None:
                console.close()
        summary = daemon.stats.snapshot()
        print(json.dumps(summary, indent=2), file=out, flush=True)
        if daemon.failed is not None:
            log.error("a stage failed: %r", daemon.failed)
            return 1
        return 0
