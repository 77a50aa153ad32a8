"""Shared builders for the bridge tests: plant messages and a line that records commands.

``RecordingCommands`` stands in for the daemons' control sockets in the protocol servers' unit
tests (the daemons themselves are exercised in tests/pipeline/bridge/test_bridge.py and in
benchmarks/plc_latency.py); it answers as a daemon does, refusing unknown grades and recipes."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from pipeline.bridge.model import CameraStatus, CommandResult, LineStatus, PlantDefect


def make_defect(bridge_seq: int, **over: Any) -> PlantDefect:
    base = PlantDefect(
        bridge_seq=bridge_seq,
        camera_id="cam0",
        journal="j-test",
        seq=bridge_seq,
        coil_id="24-118734",
        side="top",
        md_m=12.5 + bridge_seq,
        strip_md_m=112.5 + bridge_seq,
        cd_mm=310.25,
        length_mm=14.0,
        width_mm=6.5,
        area_mm2=71.0,
        score=3.25,
        threshold=1.5,
        defect_class="unknown",
        class_confidence=None,
        decision="reject" if bridge_seq % 2 else "accept",
        reject_in_m=3.2,
        capture_time=time.time() - 0.05,
        publish_time=time.time() - 0.01,
    )
    return replace(base, **over)


def make_status(heartbeat: int = 1, state: str = "running", **over: Any) -> LineStatus:
    cam = CameraStatus(
        camera_id="cam0",
        state=state,
        camera_online=state != "camera_offline",
        recipe="DC04",
        recipes=("DC01", "DC04"),
        coil_id="24-118734",
        md_m=42.0,
        frames=100 + heartbeat,
        alerts=7,
        drops=0,
        heartbeat_time=time.time(),
    )
    base = LineStatus(
        state=state,
        heartbeat=heartbeat,
        defects=7,
        coil_id="24-118734",
        recipe="DC04",
        cameras=(cam,),
        drops={},
        time=time.time(),
    )
    return replace(base, **over)


@dataclass
class RecordingCommands:
    """A line that accepts grades ``grades`` and recipes ``names`` and records every call."""

    grades: tuple[str, ...] = ("DC01", "DC04")
    names: tuple[str, ...] = ("DC01", "DC04")
    current: str | None = "DC04"
    open_coil: str | None = None
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def coil_start(
        self,
        *,
        coil_id: str,
        grade: str,
        width_mm: float | None = None,
        thickness_mm: float | None = None,
        length_m: float | None = None,
    ) -> CommandResult:
        self.calls.append(
            (
                "coil_start",
                {
                    "coil_id": coil_id,
                    "grade": grade,
                    "width_mm": width_mm,
                    "thickness_mm": thickness_mm,
                    "length_m": length_m,
                },
            )
        )
        if grade not in self.grades:
            return CommandResult(ok=False, error=f"unknown grade {grade!r}")
        self.open_coil = coil_id
        return CommandResult(ok=True)

    def coil_end(self, *, coil_id: str) -> CommandResult:
        self.calls.append(("coil_end", {"coil_id": coil_id}))
        if self.open_coil != coil_id:
            return CommandResult(ok=False, error=f"coil {coil_id!r} is not open")
        self.open_coil = None
        return CommandResult(ok=True)

    def recipes(self) -> tuple[list[str], str | None]:
        return list(self.names), self.current

    def select_recipe(self, name: str) -> CommandResult:
        self.calls.append(("select_recipe", {"name": name}))
        if name not in self.names:
            return CommandResult(ok=False, error=f"unknown recipe {name!r}")
        self.current = name
        return CommandResult(ok=True)


@pytest.fixture
def commands() -> RecordingCommands:
    return RecordingCommands()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
