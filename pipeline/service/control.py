"""The REP control socket: status, reload, recipe, replay, coils, stop (JSON request, JSON reply)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from pipeline.coil.tracking import CoilError, CoilTracker
from pipeline.errors import StripinspectError
from pipeline.process import RateLimitedLog
from pipeline.service.feedback import Teacher
from pipeline.service.health import Liveness
from pipeline.service.slot import ModelSlot
from pipeline.transport.journal import AlertJournal

log = logging.getLogger("stripinspect.control")
COMMANDS = "status, reload, recipe, replay, coil_start, coil_end, coil, false_alarm, label, overlay, overlay_undo, stop"
POLL_S = 0.2  # the control loop comes round (beats, sees stop) at least this often


class BindError(StripinspectError):
    """An endpoint of the daemon is in use or cannot be bound; names the config key."""

    def __init__(self, *, key: str, endpoint: str, reason: object) -> None:
        super().__init__(f"{key} = {endpoint}: cannot bind: {reason}")


class Commands:
    """The replies; ``status`` and ``stop`` are the daemon's, passed in."""

    def __init__(
        self,
        *,
        slot: ModelSlot,
        journal: AlertJournal | None,
        replay_limit: int,
        coils: CoilTracker,
        status: Callable[[], dict[str, Any]],
        stop: Callable[[], None],
        teacher: Teacher | None = None,
    ) -> None:
        self.slot, self.journal, self.replay_limit, self.coils = slot, journal, replay_limit, coils
        self.status, self.stop, self.teacher = status, stop, teacher

    def handle(self, cmd: Any, req: dict[str, Any]) -> dict[str, Any]:
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "recipe":
            return self.slot.switch_recipe(req.get("name"))
        if cmd == "replay":
            return self.replay(req)
        if cmd in ("coil_start", "coil_end", "coil"):
            return self.coil(cmd, req)
        if cmd in ("false_alarm", "label", "overlay", "overlay_undo"):
            return self.feedback(cmd, req)
        if cmd == "stop":
            self.stop()
            return {"ok": True, "state": "stopping"}
        if cmd == "reload" and "threshold" in req and "bundle" not in req:
            return self.slot.set_threshold(req["threshold"])
        if cmd == "reload":
            bundle = req.get("bundle")
            if bundle is not None and not isinstance(bundle, str):
                return {"ok": False, "error": f"bundle must be a path (a string), got {bundle!r}"}
            return self.slot.reload(Path(bundle) if bundle else None)
        return {"ok": False, "error": f"unknown command {cmd!r}; known: {COMMANDS}"}

    def feedback(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        """The operator station's feedback on the model in force (docs/operator.md)."""
        if self.teacher is None:
            return {"ok": False, "error": "this daemon takes no feedback"}
        scorer = self.slot.current.frame_scorer.scorer
        if cmd == "false_alarm":
            return self.teacher.false_alarm(req, scorer=scorer)
        if cmd == "label":
            return self.teacher.label(req)
        if cmd == "overlay":
            return self.teacher.describe(getattr(scorer, "overlay", None))
        return self.teacher.undo(req, scorer=scorer)

    def coil(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        """Level 2's coil start and end (the plant bridge calls the same), and the coil state."""
        try:
            if cmd == "coil_start":
                keys = ("coil_id", "grade", "head_line", "width_mm", "thickness_mm", "length_m")
                args = {k: req.get(k) for k in keys}
                return {"ok": True, **self.coils.start(**args)}
            if cmd == "coil_end":
                return {"ok": True, **self.coils.end(coil_id=req.get("coil_id"), tail_line=req.get("tail_line"))}
        except CoilError as err:
            return {"ok": False, "error": str(err)}
        return {"ok": True, **self.coils.status()}

    def replay(self, req: dict[str, Any]) -> dict[str, Any]:
        """Alerts after ``after`` from the journal (zguide Clone pattern: the subscriber keeps its
        live subscription open while it fetches, then drops live alerts it already has)."""
        if self.journal is None:
            return {"ok": False, "error": "no alert journal (daemon.journal.path is null)"}
        after = req.get("after", 0)
        limit = req.get("limit", self.replay_limit)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            return {"ok": False, "error": f"after must be an integer >= 0, got {after!r}"}
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            return {"ok": False, "error": f"limit must be an integer >= 1, got {limit!r}"}
        alerts = self.journal.after(after, min(limit, self.replay_limit))
        first = self.journal.first_seq()
        return {
            "ok": True,
            "alerts": alerts,
            "last_seq": self.journal.last_seq,
            "journal": self.journal.journal_id,
            # Alerts between `after` and the oldest one kept were pruned (journal bounds).
            "pruned": first is not None and first > after + 1,
        }


class ControlServer:
    """Owns the REP socket; ``run`` serves ``handle`` on its own thread until ``stop``."""

    def __init__(
        self,
        *,
        context: zmq.Context,
        endpoint: str,
        secure: Callable[[zmq.Socket], None] | None,
        handle: Callable[[Any, dict[str, Any]], dict[str, Any]],
    ) -> None:
        self._handle = handle
        self._ratelog = RateLimitedLog(log, interval_s=10.0)
        self.reload_asked = threading.Event()  # set from a signal handler; the run loop reloads
        self._sock = context.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        if secure is not None:
            secure(self._sock)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as err:
            self._sock.close(0)
            raise BindError(key="daemon.control_endpoint", endpoint=endpoint, reason=err) from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def run(self, stop: threading.Event, live: Liveness) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not stop.is_set():
            live.beat("control")
            if self.reload_asked.is_set():  # SIGHUP: the handler only sets the event
                self.reload_asked.clear()
                reply = self._call("reload", {}, stop=stop, live=live)
                if not reply["ok"]:
                    log.error("reload failed, the running model stays: %s", reply["error"])
            if not poller.poll(int(POLL_S * 1000)):
                continue
            raw = self._sock.recv()
            try:
                req = json.loads(raw)
                cmd = req.get("cmd") if isinstance(req, dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                cmd, req = None, {}
            # A REP socket must answer every request, whatever the handler did.
            self._sock.send_json(self._call(cmd, req if isinstance(req, dict) else {}, stop=stop, live=live))

    def _call(self, cmd: Any, req: dict[str, Any], *, stop: threading.Event, live: Liveness) -> dict[str, Any]:
        """``handle`` on a short-lived worker thread while this one keeps beating: a reload
        (hashing, an ONNX session, a warm-up) may take longer than ``stage_stuck_s``, and systemd
        must not kill a daemon that is loading its next model. Abandoned (not killed) on stop."""
        box: dict[str, dict[str, Any]] = {}

        def work() -> None:
            try:
                box["reply"] = self._handle(cmd, req)
            except Exception as err:  # one bad request must never stop the line
                self._ratelog.error("handler", "control request %r failed: %r", cmd, err, exc_info=True)
                box["reply"] = {"ok": False, "error": f"internal error: {err!r}"}

        worker = threading.Thread(target=work, name="stripinspect-control-request", daemon=True)
        worker.start()
        while True:
            worker.join(POLL_S)
            if not worker.is_alive():
                return box["reply"]
            live.beat("control")
            if stop.is_set():
                return {"ok": False, "error": f"daemon stopping: {cmd!r} abandoned"}

    def close(self) -> None:
        self._sock.close(0)
