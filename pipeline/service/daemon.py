"""The inspection daemon: the one place where stages, queues, threads and sockets are wired.

acquire -> (frames) -> embed -> (embedded) -> score -> (results) -> publish, one thread each
(``stages``), plus the control socket (``control``) and the health loop that feeds systemd's
watchdog (``health``). The camera is supervised (``camera``), the model sits in a slot that
swaps between frames (``slot``). Everything started is closed in reverse order, also when the
constructor fails half-way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from contextlib import ExitStack
from typing import Any

import numpy as np
import zmq

from pipeline.acquisition.sources import Source
from pipeline.coil.tracking import CoilTracker, read_schedule
from pipeline.config import DaemonConfig, RuntimeConfig, ScoringConfig
from pipeline.process import RateLimitedLog, notify
from pipeline.service.camera import CameraSupervisor
from pipeline.service.control import POLL_S, BindError, Commands, ControlServer
from pipeline.service.drift import DriftMonitor
from pipeline.service.feedback import Teacher
from pipeline.service.health import HealthLoop, Liveness, watchdog_period_s
from pipeline.service.slot import ModelSlot
from pipeline.service.stages import Flow, build_stages
from pipeline.service.stats import Stats
from pipeline.transport.journal import AlertJournal, JournalError
from pipeline.transport.publish import Publisher
from pipeline.transport.security import CurveServer

log = logging.getLogger("stripinspect.daemon")
CONTROL_JOIN_S = POLL_S + 1.0  # the control loop sees stop within one poll (an abandoned request too)
HEALTH_JOIN_S = 5.0  # the health loop wakes at once when told it is done


class Daemon:
    """Construct, ``start()``, then ``stop()`` and ``join()``; or ``run_until_done()``.
    The daemon owns ``source`` from construction on: ``join()`` (or a failed constructor) closes it."""

    def __init__(
        self,
        *,
        cfg: DaemonConfig,
        runtime: RuntimeConfig,
        scoring: ScoringConfig,
        source: Source,
        coil_grades: Collection[str] = (),
        context: zmq.Context | None = None,
    ) -> None:
        self.source = source
        self.stats = Stats()
        self.state = "starting"
        self.failed: BaseException | None = None
        self.stop_event = threading.Event()
        self._flow = Flow(stop=self.stop_event, crashed=threading.Event(), live=Liveness())
        self._context = context or zmq.Context.instance()
        self._threads: list[threading.Thread] = []
        self._health_done = threading.Event()
        self._health_thread: threading.Thread | None = None
        # (what, stage threads that use it, close): closed in reverse order, never while one of
        # those threads still runs (ZeroMQ sockets are not thread-safe; a read may be in the driver).
        self._closers: list[tuple[str, tuple[str, ...], Callable[[], None]]] = []

        def opened_by(what: str, users: tuple[str, ...], close: Callable[[], None]) -> None:
            opened.callback(close)  # a failed constructor closes everything, no thread runs yet
            self._closers.append((what, users, close))

        with ExitStack() as opened:
            opened_by("source", ("acquire",), source.close)
            self.slot = ModelSlot(
                cfg=cfg, runtime=runtime, scoring=scoring, width=source.width, channels=source.channels
            )
            cfg = self.slot.current.cfg
            self.journal: AlertJournal | None = None
            j = cfg.journal
            if j.path is not None:
                self.journal = AlertJournal(
                    path=j.path, max_rows=j.max_rows, max_age_s=j.max_age_days * 86400.0, synchronous=j.synchronous
                )
                opened_by("alert journal", ("publish", "control"), self.journal.close)
            curve = None
            if cfg.curve_keys is not None:
                curve = CurveServer(context=self._context, keys_dir=cfg.curve_keys)
                opened_by("ZAP thread", (), curve.stop)
            secure = curve.secure if curve is not None else None
            try:
                self.publisher = Publisher(
                    context=self._context,
                    endpoint=cfg.pub_endpoint,
                    camera_id=cfg.camera_id,
                    send_hwm=cfg.send_hwm,
                    secure=secure,
                )
            except OSError as err:
                reason = err if err.errno is None else os.strerror(err.errno)
                raise BindError(key="daemon.pub_endpoint", endpoint=cfg.pub_endpoint, reason=reason) from None
            opened_by("PUB socket", ("publish",), self.publisher.close)
            if self.journal is not None:
                # Alert numbers continue across restarts: a subscriber never sees one number twice.
                self.publisher.seq["alert"] = self.journal.last_seq
            self.coils = self._coil_tracker(cfg, coil_grades)
            self.teacher = Teacher(cfg=cfg.feedback, camera_id=cfg.camera_id)
            commands = Commands(
                slot=self.slot,
                journal=self.journal,
                replay_limit=cfg.journal.replay_limit,
                coils=self.coils,
                status=lambda: self.snapshot(alerts=False),
                stop=self.stop,
                teacher=self.teacher,
            )
            self._control = ControlServer(
                context=self._context, endpoint=cfg.control_endpoint, secure=secure, handle=commands.handle
            )
            opened_by("control socket", ("control",), self._control.close)
            self.control_endpoint = self._control.endpoint
            self._wire(cfg)
            opened.pop_all()  # from here on ``close`` closes them

    def _coil_tracker(self, cfg: DaemonConfig, grades: Collection[str]) -> CoilTracker:
        """Coils from the schedule file or the control socket, resumed from the journal after a
        restart (a journal that cannot be written only loses that: inspection goes on)."""
        journal = self.journal
        schedule = read_schedule(cfg.coil_schedule, mm_per_line=cfg.mm_per_line) if cfg.coil_schedule else ()
        ratelog = RateLimitedLog(log, interval_s=10.0)

        def save(state: str) -> None:
            if journal is None:
                return
            try:
                journal.save_state("coils", state)
            except JournalError as err:
                self.stats.drop("journal", "write_error")
                ratelog.error("coils", "coil state not saved: %s", err)

        saved = journal.load_state("coils") if journal is not None else None
        return CoilTracker(mm_per_line=cfg.mm_per_line, grades=grades, schedule=schedule, save=save, saved=saved)

    def _wire(self, cfg: DaemonConfig) -> None:
        flow, stats, source = self._flow, self.stats, self.source
        self.camera = CameraSupervisor(
            source=source,
            stall_s=cfg.camera_stall_s,
            reconnect_s=cfg.camera_reconnect_s,
            backoff_max_s=cfg.camera_backoff_max_s,
            stats=stats,
        )
        self.drift_monitor = DriftMonitor(window=cfg.drift_window_frames)
        self._pipeline = build_stages(
            cfg=cfg,
            source=source,
            camera=self.camera,
            slot=self.slot,
            publisher=self.publisher,
            journal=self.journal,
            coils=self.coils,
            drift=self.drift_monitor,
            heartbeat=self._heartbeat,
            drained=self._drained,
            teacher=self.teacher,
            stats=stats,
            flow=flow,
        )
        # Publish first (wait() watches it), acquire last of the stages; control beside them.
        self._stages = [*self._pipeline.runs, ("control", lambda: self._control.run(self.stop_event, flow.live))]
        self._health = HealthLoop(
            liveness=flow.live,
            threads=lambda: list(self._threads),
            # Only while the acquire stage reads: before acquisition starts and while it hands
            # its last frames on, the camera does not move and need not.
            camera_progress=lambda: self.camera.progress if self.camera.reading else None,
            stuck_s=cfg.stage_stuck_s,
            period_s=watchdog_period_s(),
        )

    # --- what the model slot holds now ---------------------------------------------------

    @property
    def cfg(self) -> DaemonConfig:
        """The config in force (with the current recipe's bundle, flat-field and threshold)."""
        return self.slot.current.cfg

    @property
    def threshold(self) -> float | np.ndarray:
        return self.slot.current.threshold

    @property
    def frame_scorer(self) -> Any:
        return self.slot.current.frame_scorer

    @property
    def camera_online(self) -> bool:
        return self.camera.online

    def camera_status(self) -> dict[str, Any]:
        return {**self.camera.status(), "width": self.source.width}

    def drift(self) -> dict[str, Any]:
        """Rolling median score of the normal surface against the calibration's (bundle quantiles)."""
        return self.drift_monitor.report(reference=self.slot.calibrated_normal_median(), bound=self.cfg.drift_bound)

    def request_reload(self) -> None:
        """Load the configured bundle again (SIGHUP), on the control thread, which keeps beating
        meanwhile; swapped in between frames. Safe in a signal handler: it only sets an event."""
        self._control.reload_asked.set()

    # --- reports -------------------------------------------------------------------------

    def snapshot(self, *, alerts: bool = True) -> dict[str, Any]:
        """The public view (status replies, heartbeats, a console): state, recipe, threshold,
        drift, camera, counters, drops, latency percentiles and, with ``alerts``, the last
        published alert headers."""
        drift = self.drift()
        state = self.state
        if state == "running" and not self.camera.online:
            state = "camera_offline"
        elif state == "running" and drift["drifting"]:
            state = "drift"
        cid, md = self.coils.locate(self.coils.camera_line)
        out = {
            "state": state,
            "recipe": self.cfg.recipe,
            "recipes": sorted(self.cfg.recipes),
            "coil": {"coil_id": cid, "md_m": md, "camera_line": self.coils.camera_line},
            "side": self.cfg.side,
            "threshold": self.slot.threshold_json(),
            "drift": drift,
            "camera": self.camera_status(),
            **self.stats.snapshot(),
        }
        return {**out, "recent_alerts": self._pipeline.publish.recent_alerts()} if alerts else out

    def _heartbeat(self) -> dict[str, Any]:
        return {**self.snapshot(alerts=False), "frame_id": None, "capture_time": None}

    def _drained(self) -> None:
        self.state = "stopped"

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, *, acquire: bool = True) -> None:
        for name, target in self._stages:
            t = threading.Thread(target=self._guard(name, target), name=f"stripinspect-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._health_thread = threading.Thread(
            target=self._health.run, args=(self._health_done,), name="stripinspect-health", daemon=True
        )
        self._health_thread.start()
        if acquire:
            self.start_acquisition()

    def start_acquisition(self) -> None:
        self.state = "running"
        self._pipeline.go.set()
        notify("READY=1")

    def _guard(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            # A stage that hangs before its own first beat is stuck too, not ageless.
            self._flow.live.beat(name)
            try:
                target()
            except Exception as err:
                # A crashed stage must not leave a half-alive daemon: stop everything, and the
                # process exits non-zero so that systemd restarts it.
                log.exception("stage %s crashed", threading.current_thread().name)
                self.failed = err
                self._flow.crashed.set()
                self.stop_event.set()

        return run

    def stop(self) -> None:
        """Stop acquiring; frames already acquired are scored and published (drained)."""
        if not self.stop_event.is_set():
            notify("STOPPING=1")
        self.stop_event.set()

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the pipeline to drain, then stop the control and health threads and close
        everything in reverse order of opening; idempotent."""
        deadline = time.monotonic() + timeout
        for t in reversed(self._threads):
            if not t.name.endswith("control"):
                t.join(max(0.0, deadline - time.monotonic()))
        self.stop_event.set()
        for t in self._threads:
            if t.name.endswith("control"):
                t.join(CONTROL_JOIN_S)  # its own bound: a stuck stage may have used the deadline
        self.close()

    def close(self) -> None:
        """Close sockets, journal, ZAP thread and source without draining (also for a daemon
        that was never started); idempotent. What a still running thread uses stays open (an
        error names the thread) and is closed by a later ``close``."""
        self.stop_event.set()
        self._health_done.set()
        if self._health_thread is not None:
            self._health_thread.join(HEALTH_JOIN_S)
            if self._health_thread.is_alive():
                log.error("thread %s did not stop within %.0f s", self._health_thread.name, HEALTH_JOIN_S)
        running = {t.name.removeprefix("stripinspect-") for t in self._threads if t.is_alive()}
        kept = []
        for what, users, close in reversed(self._closers):
            busy = sorted(running.intersection(users))
            if busy:
                log.error("not closing the %s: thread stripinspect-%s still runs", what, busy[0])
                kept.append((what, users, close))
            else:
                close()
        self._closers = kept[::-1]

    def wait(self, timeout: float) -> bool:
        """True once the pipeline has drained (the source ended) or ``stop`` was asked for;
        waits at most ``timeout`` seconds for either."""
        end = time.monotonic() + timeout
        while self._threads and self._threads[0].is_alive() and not self.stop_event.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.stop_event.wait(min(0.1, left))
        return True

    def run_until_done(self) -> None:
        """Until the source ends or ``stop``; then drain and close."""
        self.start()
        while not self.wait(1.0):
            pass
        self.stop()
        self.join()
