"""Plant commands to the line: ZeroMQ requests to the coil service's or the daemons' control
sockets (docs/messages.md). Blocking; the protocol servers call them off their event loop."""

from __future__ import annotations

import logging
from typing import Any

import zmq

from pipeline.bridge.model import CommandResult
from pipeline.config import BridgeCameraConfig, BridgeCoilServiceConfig
from pipeline.transport.request import request

log = logging.getLogger("stripinspect.bridge")


class ZmqCommands:
    """Coil start and end go to the coil service when one runs (it forwards them to every camera
    and keeps the coil record), else to every camera; recipes always to every camera."""

    def __init__(
        self,
        *,
        cameras: dict[str, BridgeCameraConfig],
        coil_service: BridgeCoilServiceConfig | None,
        context: zmq.Context,
        timeout_s: float,
    ) -> None:
        if not cameras:
            raise ValueError("commands need at least one camera")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.cameras, self.coil_service, self.context, self.timeout_s = cameras, coil_service, context, timeout_s

    def _ask(self, endpoint: str, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            return request(self.context, endpoint, msg, timeout_s=self.timeout_s)
        except TimeoutError as err:
            return {"ok": False, "error": str(err)}

    def _everyone(self, msg: dict[str, Any]) -> CommandResult:
        replies = {cid: self._ask(cam.control, msg) for cid, cam in self.cameras.items()}
        errors = [f"{cid}: {r.get('error')}" for cid, r in replies.items() if not r.get("ok")]
        result = CommandResult(ok=not errors, error="; ".join(errors) or None, detail={"cameras": replies})
        log.info("plant command %s: %s", msg.get("cmd"), "ok" if result.ok else result.error)
        return result

    def _coil(self, msg: dict[str, Any]) -> CommandResult:
        if self.coil_service is None:
            return self._everyone(msg)
        r = self._ask(self.coil_service.control, msg)
        log.info("plant command %s via the coil service: %s", msg["cmd"], "ok" if r.get("ok") else r.get("error"))
        return CommandResult(ok=bool(r.get("ok")), error=None if r.get("ok") else str(r.get("error")), detail=r)

    def coil_start(
        self,
        *,
        coil_id: str,
        grade: str,
        width_mm: float | None = None,
        thickness_mm: float | None = None,
        length_m: float | None = None,
    ) -> CommandResult:
        msg: dict[str, Any] = {"cmd": "coil_start", "coil_id": coil_id, "grade": grade}
        for k, v in (("width_mm", width_mm), ("thickness_mm", thickness_mm), ("length_m", length_m)):
            if v is not None:
                msg[k] = v
        return self._coil(msg)

    def coil_end(self, *, coil_id: str) -> CommandResult:
        return self._coil({"cmd": "coil_end", "coil_id": coil_id})

    def recipes(self) -> tuple[list[str], str | None]:
        names: set[str] | None = None
        current: set[str | None] = set()
        for cam in self.cameras.values():
            r = self._ask(cam.control, {"cmd": "status"})
            if not r.get("ok", True) or "recipes" not in r:
                continue
            mine = set(r.get("recipes") or [])
            names = mine if names is None else names & mine
            current.add(r.get("recipe"))
        return sorted(names or []), current.pop() if len(current) == 1 else None

    def select_recipe(self, name: str) -> CommandResult:
        return self._everyone({"cmd": "recipe", "name": name})
