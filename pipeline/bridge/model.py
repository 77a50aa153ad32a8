"""What the bridge hands to every plant protocol, and what the protocols may ask of the line.

Frozen dataclasses built from the daemons' published headers (docs/messages.md); the protocol
servers (``opcua``, ``modbus``, ``mqtt``) see only these, never a ZeroMQ socket.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

Decision = Literal["reject", "accept"]

# The daemon's states (heartbeat ``state``), worst last: a line's state is its worst camera's.
STATES: tuple[str, ...] = ("running", "drift", "starting", "camera_offline", "stopped", "unknown")


@dataclass(frozen=True)
class PlantDefect:
    """One defect alert as the plant sees it.

    ``bridge_seq`` numbers the defects of every camera the bridge serves 1, 2, 3, ... with no
    gaps and survives restarts (the Modbus ring and MQTT consumers address defects by it);
    ``camera_id``/``journal``/``seq`` are the daemon's own numbering. MD in metres from the
    coil head (``strip_md_m`` from strip line 0), CD in mm in strip coordinates, sizes in mm,
    scores in the model's units (``threshold`` the pixel threshold in force). ``reject_in_m`` is
    the strip still to run from ``capture_time`` until the defect reaches the reject actuator
    (negative: it had passed already). Times in seconds, Unix clock.
    """

    bridge_seq: int
    camera_id: str
    journal: str | None
    seq: int
    coil_id: str | None
    side: str
    md_m: float
    strip_md_m: float
    cd_mm: float
    length_mm: float
    width_mm: float
    area_mm2: float
    score: float
    threshold: float
    defect_class: str
    class_confidence: float | None
    decision: Decision
    reject_in_m: float
    capture_time: float
    publish_time: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CameraStatus:
    """A camera daemon's last heartbeat, as the plant needs it."""

    camera_id: str
    state: str  # one of STATES
    camera_online: bool
    recipe: str | None
    recipes: tuple[str, ...]
    coil_id: str | None
    md_m: float | None
    frames: int
    alerts: int
    drops: int
    heartbeat_time: float  # Unix s of the heartbeat; 0.0 before the first


@dataclass(frozen=True)
class LineStatus:
    """Every camera the bridge serves, and the bridge's own counters.

    ``state`` is the worst camera state (``STATES`` order); ``heartbeat`` counts the bridge's
    status updates (a PLC watches it change); ``defects`` is the last ``bridge_seq`` issued."""

    state: str
    heartbeat: int
    defects: int
    coil_id: str | None
    recipe: str | None
    cameras: tuple[CameraStatus, ...]
    drops: dict[str, int] = field(default_factory=dict)  # messages dropped per protocol queue
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlantCoil:
    """A coil message: ``kind`` start / end (a camera reached the coil's head / tail), or from the
    coil service: grading (live), periodic (a confirmed roll mark), closed (the coil's record is
    final, with its disposition). ``data`` is the published header as it came."""

    kind: Literal["start", "end", "grading", "periodic", "closed"]
    coil_id: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "coil_id": self.coil_id, **self.data}


@dataclass(frozen=True)
class CommandResult:
    """What the line answered to a plant command: ``ok`` and, when not, a one-line ``error``."""

    ok: bool
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class NotDeliveredError(Exception):
    """Raised by a sink's ``defect`` when its protocol cannot take the defect now (the broker is
    unreachable, no acknowledgement came in time). The bridge does not count it as delivered: it
    offers it again from its journal a little later, so nothing is lost while a protocol is down
    and nothing waits in a protocol's own memory where a crash would lose it."""


class PlantCommands(Protocol):
    """What a plant protocol may ask of the line. Blocking (ZeroMQ requests to the daemons' or
    the coil service's control sockets): an asyncio server calls them with ``asyncio.to_thread``."""

    def coil_start(
        self,
        *,
        coil_id: str,
        grade: str,
        width_mm: float | None = None,
        thickness_mm: float | None = None,
        length_m: float | None = None,
    ) -> CommandResult: ...

    def coil_end(self, *, coil_id: str) -> CommandResult: ...

    def recipes(self) -> tuple[list[str], str | None]:
        """(the recipe names every camera knows, the recipe in force: None when they differ)."""
        ...

    def select_recipe(self, name: str) -> CommandResult: ...


class Sink(Protocol):
    """One plant protocol. The bridge calls these from its asyncio loop, one message at a time
    per sink; ``defect`` returns once the protocol has the defect (acknowledged by the broker, in
    the registers, fired as an event), and then the bridge records it as delivered by this sink
    (never sent again after a restart); it raises NotDeliveredError when the protocol cannot take
    it now, and the bridge offers it again later."""

    name: str

    async def start(self) -> None: ...

    async def defect(self, d: PlantDefect) -> None: ...

    async def status(self, s: LineStatus) -> None: ...

    async def coil(self, c: PlantCoil) -> None: ...

    async def stop(self) -> None: ...

    def counters(self) -> dict[str, int]:
        """The protocol's own counters (clients, refused writes, failed logins ...)."""
        ...
