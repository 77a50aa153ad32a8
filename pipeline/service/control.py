"""The REP control socket: status, reload, recipe, replay, stop (JSON request, JSON reply)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from pipeline.errors import StripinspectError
from pipeline.service.health import Liveness
from pipeline.service.slot import ModelSlot
from pipeline.transport.journal import AlertJournal

COMMANDS = "status, reload, recipe, replay, stop"


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
        status: Callable[[], dict[str, Any]],
        stop: Callable[[], None],
    ) -> None:
        self.slot, self.journal, self.replay_limit = slot, journal, replay_limit
        self.status, self.stop = status, stop

    def handle(self, cmd: Any, req: dict[str, Any]) -> dict[str, Any]:
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "recipe":
            return self.slot.switch_recipe(req.get("name"))
        if cmd == "replay":
            return self.replay(req)
        if cmd == "stop":
            self.stop()
            return {"ok": True, "state": "stopping"}
        if cmd == "reload" and "threshold" in req and "bundle" not in req:
            return self.slot.set_threshold(req["threshold"])
        if cmd == "reload":
            bundle = req.get("bundle")
            return self.slot.reload(Path(bundle) if bundle else None)
        return {"ok": False, "error": f"unknown command {cmd!r}; known: {COMMANDS}"}

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
            if not poller.poll(200):
                continue
            raw = self._sock.recv()
            try:
                req = json.loads(raw)
                cmd = req.get("cmd") if isinstance(req, dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                cmd, req = None, {}
            self._sock.send_json(self._handle(cmd, req if isinstance(req, dict) else {}))

    def close(self) -> None:
        self._sock.close(0)
