"""The Modbus register map of the plant bridge, as data, and its encoding on plain ints.

No sockets here: ``modbus`` serves these registers, tests and PLC-side code decode them with the
same functions, and docs/plant_modbus.md describes the same tables. Addresses are 0-based
protocol addresses (what goes on the wire); a PLC's 1-based references are 30001 + address for
input registers, 40001 + address for holding registers, 10001 + address for discrete inputs and
00001 + address for coils.

Conventions (one rule each, used everywhere below):

- 32-bit values take two registers, high word first (big-endian word order, as the bytes within
  each register): the value 0x12345678 is register n = 0x1234, register n+1 = 0x5678.
- Strings are ASCII, two characters per register, the first character in the high byte, padded
  with NUL (0x00) bytes at the end.
- Scaled values are rounded to the nearest step and clamped to the type's range (a length of
  7000 mm in a u16 of 0.1 mm reads 6553.5 mm); counters wrap (a u32 counter after 4294967295 is 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pipeline.bridge.model import CommandResult, LineStatus, PlantDefect

MAP_VERSION = 1

# Modbus exception codes (Modbus Application Protocol v1.1b3, section 7).
ILLEGAL_DATA_ADDRESS = 0x02
ILLEGAL_DATA_VALUE = 0x03
SERVER_DEVICE_BUSY = 0x06
GATEWAY_TARGET_NO_RESPONSE = 0x0B

U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
I32_MIN, I32_MAX = -(2**31), 2**31 - 1

# --- codes ----------------------------------------------------------------------------------

STATE_CODES: dict[str, int] = {
    "unknown": 0,
    "starting": 1,
    "running": 2,
    "drift": 3,
    "camera_offline": 4,
    "stopped": 5,
}
SIDE_CODES: dict[str, int] = {"top": 1, "bottom": 2}  # 0: unknown
DECISION_CODES: dict[str, int] = {"accept": 0, "reject": 1}

CMD_NONE, CMD_COIL_START, CMD_COIL_END, CMD_SELECT_RECIPE = 0, 1, 2, 3
COMMAND_CODES: dict[int, str] = {
    CMD_NONE: "none",
    CMD_COIL_START: "coil_start",
    CMD_COIL_END: "coil_end",
    CMD_SELECT_RECIPE: "select_recipe",
}
RESULT_OK, RESULT_REFUSED, RESULT_NO_ANSWER = 0, 1, 2
ERR_NONE, ERR_LINE_REFUSED, ERR_NO_COIL_ID, ERR_NO_GRADE, ERR_NO_RECIPE, ERR_NO_ANSWER = 0, 1, 2, 3, 4, 5
ERROR_TEXTS: dict[int, str] = {
    ERR_NONE: "",
    ERR_LINE_REFUSED: "the line refused",
    ERR_NO_COIL_ID: "coil id empty",
    ERR_NO_GRADE: "grade empty",
    ERR_NO_RECIPE: "recipe empty",
    ERR_NO_ANSWER: "the line did not answer",
}


@dataclass(frozen=True)
class Reg:
    """One entry of the map: ``regs`` registers from ``address``; ``kind`` u16 / u32 / i32 / ascii;
    the value in ``unit`` is the register value divided by ``scale``."""

    name: str
    address: int
    regs: int
    kind: str
    meaning: str
    unit: str = ""
    scale: int = 1


# --- input registers (FC4, read-only) --------------------------------------------------------

IR_MAP_VERSION = 0
IR_HEARTBEAT = 1
IR_LINE_STATE = 2
IR_CAMERAS = 3
IR_CAMERAS_ONLINE = 4
IR_DEFECTS = 8
IR_FRAMES = 10
IR_ALERTS = 12
IR_CAMERA_DROPS = 14
IR_BRIDGE_DROPS = 16
IR_COIL_ID = 20
COIL_ID_REGS = 16
IR_RECIPE = 36
RECIPE_REGS = 8
IR_REJECT_COUNT = 48
IR_REJECT_SEQ = 50
IR_REJECT_IN_MM = 52
IR_REJECT_MD_MM = 54
IR_REJECT_AGE_MS = 56
IR_REJECT_ACTIVE = 57
IR_CMD_ACK_SEQ = 60
IR_CMD_RESULT = 61
IR_CMD_ERROR = 62
IR_CMD_BUSY = 63
IR_CMD_ERROR_TEXT = 64
ERROR_TEXT_REGS = 16
IR_NEWEST_SEQ = 80
IR_OLDEST_SEQ = 82
IR_RING_SIZE = 84
IR_SLOT_SIZE = 85
RING_BASE = 96
SLOT_SIZE = 24

INPUT_REGISTERS: tuple[Reg, ...] = (
    Reg("map_version", IR_MAP_VERSION, 1, "u16", f"register map version ({MAP_VERSION})"),
    Reg("heartbeat", IR_HEARTBEAT, 1, "u16", "+1 at every line status (twice a second); wraps"),
    Reg(
        "line_state",
        IR_LINE_STATE,
        1,
        "u16",
        "worst camera state: " + ", ".join(f"{v} {k}" for k, v in STATE_CODES.items()),
    ),
    Reg("cameras", IR_CAMERAS, 1, "u16", "cameras the bridge serves"),
    Reg("cameras_online", IR_CAMERAS_ONLINE, 1, "u16", "of them delivering frames"),
    Reg("defects", IR_DEFECTS, 2, "u32", "defects numbered so far (the last bridge_seq issued)"),
    Reg("frames", IR_FRAMES, 2, "u32", "frames inspected, all cameras; wraps"),
    Reg("alerts", IR_ALERTS, 2, "u32", "defect alerts published, all cameras; wraps"),
    Reg("camera_drops", IR_CAMERA_DROPS, 2, "u32", "frames the cameras dropped; wraps"),
    Reg("bridge_drops", IR_BRIDGE_DROPS, 2, "u32", "messages the bridge dropped at a slow protocol's queue"),
    Reg("coil_id", IR_COIL_ID, COIL_ID_REGS, "ascii", "coil under inspection (empty when none or cameras differ)"),
    Reg("recipe", IR_RECIPE, RECIPE_REGS, "ascii", "recipe in force (empty when cameras differ)"),
    Reg("reject_count", IR_REJECT_COUNT, 2, "u32", "reject pulses given since the bridge started"),
    Reg("reject_seq", IR_REJECT_SEQ, 2, "u32", "bridge_seq of the latest reject"),
    Reg(
        "reject_in_mm",
        IR_REJECT_IN_MM,
        2,
        "i32",
        "strip still to run at capture until that defect is at the actuator",
        "mm",
    ),
    Reg("reject_md_mm", IR_REJECT_MD_MM, 2, "i32", "that defect's MD from the coil head", "mm"),
    Reg(
        "reject_age_ms",
        IR_REJECT_AGE_MS,
        1,
        "u16",
        "capture to pulse start (the strip ran speed x age meanwhile)",
        "ms",
    ),
    Reg("reject_active", IR_REJECT_ACTIVE, 1, "u16", "1 while the reject pulse is on (discrete input 0)"),
    Reg("command_ack_seq", IR_CMD_ACK_SEQ, 1, "u16", "command_seq of the last command answered"),
    Reg("command_result", IR_CMD_RESULT, 1, "u16", "its result: 0 ok, 1 refused, 2 no answer"),
    Reg(
        "command_error",
        IR_CMD_ERROR,
        1,
        "u16",
        "why: " + ", ".join(f"{k} {v or 'none'}" for k, v in ERROR_TEXTS.items()),
    ),
    Reg("command_busy", IR_CMD_BUSY, 1, "u16", "1 while a command runs"),
    Reg(
        "command_error_text",
        IR_CMD_ERROR_TEXT,
        ERROR_TEXT_REGS,
        "ascii",
        "the line's words when it refused, or what failed (cut to 32)",
    ),
    Reg("newest_seq", IR_NEWEST_SEQ, 2, "u32", "bridge_seq of the newest defect in the ring (0: none yet)"),
    Reg("oldest_seq", IR_OLDEST_SEQ, 2, "u32", "bridge_seq of the oldest defect still in the ring (0: none)"),
    Reg("ring_size", IR_RING_SIZE, 1, "u16", "slots in the ring (bridge.modbus.ring_size)"),
    Reg("slot_size", IR_SLOT_SIZE, 1, "u16", f"registers per slot ({SLOT_SIZE})"),
)

# One ring slot: offsets from the slot's first register.
SLOT_REGISTERS: tuple[Reg, ...] = (
    Reg("seq", 0, 2, "u32", "bridge_seq of the defect in this slot (0: empty)"),
    Reg("camera", 2, 1, "u16", "camera number: position in bridge.cameras, from 1 (0: unknown)"),
    Reg("side", 3, 1, "u16", "strip side: 1 top, 2 bottom, 0 unknown"),
    Reg("md_mm", 4, 2, "i32", "MD from the coil head", "mm"),
    Reg("cd_mm", 6, 2, "i32", "CD in strip coordinates", "mm", 10),
    Reg("length_mm", 8, 1, "u16", "length along MD", "mm", 10),
    Reg("width_mm", 9, 1, "u16", "width along CD", "mm", 10),
    Reg("area_mm2", 10, 2, "u32", "area", "mm²", 10),
    Reg("score", 12, 2, "u32", "the defect's max anomaly score", "", 1000),
    Reg("threshold", 14, 2, "u32", "the pixel threshold in force", "", 1000),
    Reg("class", 16, 1, "u16", "defect class: position in the class list, from 1 (0: unknown)"),
    Reg("decision", 17, 1, "u16", "0 accept, 1 reject"),
    Reg("reject_in_mm", 18, 2, "i32", "strip still to run at capture until the actuator (< 0: passed)", "mm"),
    Reg("age_ms", 20, 1, "u16", "capture to the slot's writing (the strip ran speed x age meanwhile)", "ms"),
    Reg("class_confidence", 21, 1, "u16", "the classifier's confidence (65535: none)", "", 1000),
    Reg("reserved", 22, 2, "u16", "reads 0"),
)

# --- holding registers (FC3 read, FC6 / FC16 / FC22 / FC23 write): what the PLC writes --------

HR_BASE = 5000  # above the largest input map (ring of 200: 0..4095), so the two never share a number
HR_COIL_ID = HR_BASE
HR_GRADE = HR_BASE + 16
GRADE_REGS = 8
HR_RECIPE = HR_BASE + 24
HR_WIDTH_MM = HR_BASE + 32
HR_THICKNESS_UM = HR_BASE + 33
HR_LENGTH_M = HR_BASE + 34
HR_COMMAND_SEQ = HR_BASE + 35
HR_COMMAND = HR_BASE + 36
HR_SIZE = 37

HOLDING_REGISTERS: tuple[Reg, ...] = (
    Reg("coil_id", HR_COIL_ID, COIL_ID_REGS, "ascii", "coil id for coil start / end"),
    Reg("grade", HR_GRADE, GRADE_REGS, "ascii", "steel grade for coil start"),
    Reg("recipe", HR_RECIPE, RECIPE_REGS, "ascii", "recipe name for select recipe"),
    Reg("width_mm", HR_WIDTH_MM, 1, "u16", "strip width for coil start, 1..5000; 0 until written: not given", "mm"),
    Reg(
        "thickness_um",
        HR_THICKNESS_UM,
        1,
        "u16",
        "strip thickness for coil start, 1..30000; 0 until written: not given",
        "µm",
    ),
    Reg("length_m", HR_LENGTH_M, 1, "u16", "coil length for coil start, 1..60000; 0 until written: not given", "m"),
    Reg("command_seq", HR_COMMAND_SEQ, 1, "u16", "any number; echoed in command_ack_seq"),
    Reg("command", HR_COMMAND, 1, "u16", "written: 1 coil start, 2 coil end, 3 select recipe (0: nothing)"),
)
NUMBER_RANGES: dict[int, tuple[str, int, int]] = {
    HR_WIDTH_MM: ("width_mm", 1, 5000),
    HR_THICKNESS_UM: ("thickness_um", 1, 30000),
    HR_LENGTH_M: ("length_m", 1, 60000),
    HR_COMMAND_SEQ: ("command_seq", 0, U16_MAX),
    HR_COMMAND: ("command", 0, max(COMMAND_CODES)),
}
ASCII_FIELDS: tuple[Reg, ...] = tuple(r for r in HOLDING_REGISTERS if r.kind == "ascii")

# --- bits (discrete inputs FC2; coils FC1, read-only here) ----------------------------------

BITS = 16  # discrete inputs and coils 0..15 exist; the unnamed ones read 0
DI_REJECT, DI_INSPECTING, DI_ALARM, DI_COMMAND_BUSY = 0, 1, 2, 3
DISCRETE_INPUTS: tuple[Reg, ...] = (
    Reg("reject", DI_REJECT, 1, "bit", "reject output: on for bridge.reject.pulse_ms per rejected defect"),
    Reg("inspecting", DI_INSPECTING, 1, "bit", "line state running"),
    Reg("alarm", DI_ALARM, 1, "bit", "line state drift, camera_offline, stopped or unknown"),
    Reg("command_busy", DI_COMMAND_BUSY, 1, "bit", "a command runs"),
)
COILS: tuple[Reg, ...] = (Reg("reject", 0, 1, "bit", "the reject output again (discrete input 0); writes refused"),)


def input_size(ring_size: int) -> int:
    """Input registers 0 .. input_size - 1 exist (the ring ends the map)."""
    return RING_BASE + ring_size * SLOT_SIZE


# --- scalar encodings ------------------------------------------------------------------------


def clamp(v: int, lo: int, hi: int) -> int:
    return lo if v < lo else hi if v > hi else v


def u32_regs(v: int) -> list[int]:
    """A counter as two registers, high word first; wraps at 2**32."""
    v &= U32_MAX
    return [v >> 16, v & U16_MAX]


def i32_regs(v: int) -> list[int]:
    """A signed value as two registers (two's complement), high word first; clamped to i32."""
    v = clamp(v, I32_MIN, I32_MAX) & U32_MAX
    return [v >> 16, v & U16_MAX]


def regs_u32(regs: Sequence[int]) -> int:
    return (regs[0] << 16) | regs[1]


def regs_i32(regs: Sequence[int]) -> int:
    v = regs_u32(regs)
    return v - (1 << 32) if v & 0x8000_0000 else v


def scaled(x: float, scale: int, lo: int, hi: int) -> int:
    """``x`` in steps of 1/scale, rounded, clamped to [lo, hi] (NaN reads as lo)."""
    if x != x:  # NaN: no value is better than a random one
        return lo
    return clamp(round(x * scale), lo, hi)


def ascii_regs(text: str | None, regs: int) -> list[int]:
    """Text for the PLC: printable ASCII ('?' for anything else), cut to 2 * regs characters, NUL padded."""
    raw = bytes(b if 0x20 <= b <= 0x7E else 0x3F for b in (text or "").encode("utf-8", "replace"))
    raw = raw[: 2 * regs].ljust(2 * regs, b"\x00")
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, 2 * regs, 2)]


def regs_ascii(regs: Sequence[int]) -> str:
    """Text from the PLC: printable ASCII with NUL padding at the end; leading and trailing
    spaces dropped. Raises ValueError naming the first bad byte."""
    raw = b"".join(r.to_bytes(2, "big") for r in regs).rstrip(b"\x00")
    for i, b in enumerate(raw):
        if not 0x20 <= b <= 0x7E:
            raise ValueError(f"byte 0x{b:02x} at character {i + 1} is not printable ASCII")
    return raw.decode("ascii").strip()


# --- what the bridge writes (input registers) -----------------------------------------------

Patch = list[tuple[int, list[int]]]  # (address, registers)


def apply(image: list[int], patch: Patch) -> None:
    for address, values in patch:
        image[address : address + len(values)] = values


def header_registers(ring_size: int) -> Patch:
    return [(IR_MAP_VERSION, [MAP_VERSION]), (IR_RING_SIZE, [ring_size]), (IR_SLOT_SIZE, [SLOT_SIZE])]


def status_registers(s: LineStatus, *, heartbeat: int, newest_seq: int) -> Patch:
    cams = s.cameras
    return [
        (IR_HEARTBEAT, [heartbeat & U16_MAX]),
        (IR_LINE_STATE, [STATE_CODES.get(s.state, 0)]),
        (IR_CAMERAS, [clamp(len(cams), 0, U16_MAX)]),
        (IR_CAMERAS_ONLINE, [clamp(sum(1 for c in cams if c.camera_online), 0, U16_MAX)]),
        (IR_DEFECTS, u32_regs(max(s.defects, newest_seq))),
        (IR_FRAMES, u32_regs(sum(c.frames for c in cams))),
        (IR_ALERTS, u32_regs(sum(c.alerts for c in cams))),
        (IR_CAMERA_DROPS, u32_regs(sum(c.drops for c in cams))),
        (IR_BRIDGE_DROPS, u32_regs(sum(s.drops.values()))),
        (IR_COIL_ID, ascii_regs(s.coil_id, COIL_ID_REGS)),
        (IR_RECIPE, ascii_regs(s.recipe, RECIPE_REGS)),
    ]


def slot_address(seq: int, ring_size: int) -> int:
    """First register of the slot that holds defect ``seq`` (1, 2, 3, ...)."""
    if seq < 1 or ring_size < 1:
        raise ValueError(f"seq and ring_size must be positive, got {seq}, {ring_size}")
    return RING_BASE + ((seq - 1) % ring_size) * SLOT_SIZE


def encode_slot(d: PlantDefect, *, camera: int, klass: int, age_ms: float) -> list[int]:
    regs = [
        *u32_regs(d.bridge_seq),
        clamp(camera, 0, U16_MAX),
        SIDE_CODES.get(d.side, 0),
        *i32_regs(scaled(d.md_m, 1000, I32_MIN, I32_MAX)),
        *i32_regs(scaled(d.cd_mm, 10, I32_MIN, I32_MAX)),
        scaled(d.length_mm, 10, 0, U16_MAX),
        scaled(d.width_mm, 10, 0, U16_MAX),
        *u32_regs(scaled(d.area_mm2, 10, 0, U32_MAX)),
        *u32_regs(scaled(d.score, 1000, 0, U32_MAX)),
        *u32_regs(scaled(d.threshold, 1000, 0, U32_MAX)),
        clamp(klass, 0, U16_MAX),
        DECISION_CODES[d.decision],
        *i32_regs(scaled(d.reject_in_m, 1000, I32_MIN, I32_MAX)),
        scaled(age_ms, 1, 0, U16_MAX),
        U16_MAX if d.class_confidence is None else scaled(d.class_confidence, 1000, 0, U16_MAX - 1),
        0,
        0,
    ]
    assert len(regs) == SLOT_SIZE
    return regs


@dataclass(frozen=True)
class Slot:
    """A ring slot as a PLC decodes it (lengths in mm, scores in the model's units)."""

    seq: int
    camera: int
    side: int
    md_mm: int
    cd_mm: float
    length_mm: float
    width_mm: float
    area_mm2: float
    score: float
    threshold: float
    klass: int
    decision: int
    reject_in_mm: int
    age_ms: int
    class_confidence: float | None


def decode_slot(regs: Sequence[int]) -> Slot:
    if len(regs) != SLOT_SIZE:
        raise ValueError(f"a slot is {SLOT_SIZE} registers, got {len(regs)}")
    return Slot(
        seq=regs_u32(regs[0:2]),
        camera=regs[2],
        side=regs[3],
        md_mm=regs_i32(regs[4:6]),
        cd_mm=regs_i32(regs[6:8]) / 10,
        length_mm=regs[8] / 10,
        width_mm=regs[9] / 10,
        area_mm2=regs_u32(regs[10:12]) / 10,
        score=regs_u32(regs[12:14]) / 1000,
        threshold=regs_u32(regs[14:16]) / 1000,
        klass=regs[16],
        decision=regs[17],
        reject_in_mm=regs_i32(regs[18:20]),
        age_ms=regs[20],
        class_confidence=None if regs[21] == U16_MAX else regs[21] / 1000,
    )


def ring_registers(newest: int, ring_size: int) -> Patch:
    oldest = max(1, newest - ring_size + 1) if newest else 0
    return [(IR_NEWEST_SEQ, u32_regs(newest)), (IR_OLDEST_SEQ, u32_regs(oldest))]


def ring_reads(last_seen: int, newest: int, ring_size: int) -> tuple[list[int], int]:
    """The PLC's polling rule: after ``last_seen``, with ``newest`` in the header, read these
    sequence numbers' slots; the second value counts defects already overwritten (missed).
    Afterwards last_seen = newest (unless newest is 0: nothing since the bridge started).

    Each slot read must then show the seq asked for; one that shows another was overwritten
    between the header read and the slot read: count it missed too. A newest below last_seen
    (not 0) means the bridge's numbering started again (its journal was reset): from 1."""
    if 0 < newest < last_seen:
        last_seen = 0
    if newest <= last_seen:
        return [], 0
    first = max(last_seen + 1, newest - ring_size + 1)
    return list(range(first, newest + 1)), first - (last_seen + 1)


def reject_registers(count: int, d: PlantDefect, *, age_ms: float) -> Patch:
    return [
        (IR_REJECT_COUNT, u32_regs(count)),
        (IR_REJECT_SEQ, u32_regs(d.bridge_seq)),
        (IR_REJECT_IN_MM, i32_regs(scaled(d.reject_in_m, 1000, I32_MIN, I32_MAX))),
        (IR_REJECT_MD_MM, i32_regs(scaled(d.md_m, 1000, I32_MIN, I32_MAX))),
        (IR_REJECT_AGE_MS, [scaled(age_ms, 1, 0, U16_MAX)]),
    ]


def bits_register(bits: Sequence[int]) -> int:
    """Bits 0..15 as one register value (bit 0 the lowest), as pymodbus packs bit blocks."""
    return sum(1 << b for b in bits if 0 <= b < BITS)


def discrete_inputs(*, reject: bool, state_code: int, busy: bool) -> list[int]:
    on = []
    if reject:
        on.append(DI_REJECT)
    if state_code == STATE_CODES["running"]:
        on.append(DI_INSPECTING)
    elif state_code != STATE_CODES["starting"]:
        on.append(DI_ALARM)
    if busy:
        on.append(DI_COMMAND_BUSY)
    return on


# --- what the PLC writes (holding registers) ------------------------------------------------


class RefusedError(ValueError):
    """A request refused with Modbus exception ``code``; ``reason`` is one line for the log."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def check_read(space: str, address: int, count: int, *, ring_size: int) -> None:
    """Raises RefusedError(ILLEGAL_DATA_ADDRESS) when [address, address + count) is not all in
    the map; ``space`` ir / hr / bits (discrete inputs and coils)."""
    if space == "ir":
        lo, hi = 0, input_size(ring_size)
    elif space == "hr":
        lo, hi = HR_BASE, HR_BASE + HR_SIZE
    elif space == "bits":
        lo, hi = 0, BITS
    else:
        raise ValueError(f"unknown register space {space!r}")
    if count < 1 or address < lo or address + count > hi:
        raise RefusedError(ILLEGAL_DATA_ADDRESS, f"{space} {address}..{address + count - 1} outside {lo}..{hi - 1}")


def apply_holding_write(block: Sequence[int], address: int, values: Sequence[int]) -> list[int]:
    """The holding block (HR_BASE .. HR_BASE + HR_SIZE - 1) after a PLC's write of ``values`` at
    ``address``, or RefusedError: outside the block (ILLEGAL_DATA_ADDRESS), or a field that would
    hold a value out of its range or text that is not printable ASCII (ILLEGAL_DATA_VALUE).
    All or nothing: every field the write touches is checked whole before anything changes."""
    if len(block) != HR_SIZE:
        raise ValueError(f"the holding block is {HR_SIZE} registers, got {len(block)}")
    end = address + len(values)
    if not values or address < HR_BASE or end > HR_BASE + HR_SIZE:
        raise RefusedError(
            ILLEGAL_DATA_ADDRESS,
            f"write to {address}..{end - 1}: only {HR_BASE}..{HR_BASE + HR_SIZE - 1} (holding) is writable",
        )
    new = list(block)
    for i, v in enumerate(values):
        if not 0 <= v <= U16_MAX:
            raise RefusedError(ILLEGAL_DATA_VALUE, f"register {address + i}: {v} is not a 16-bit value")
        new[address - HR_BASE + i] = v
    for f in ASCII_FIELDS:
        if address < f.address + f.regs and end > f.address:
            lo = f.address - HR_BASE
            try:
                regs_ascii(new[lo : lo + f.regs])
            except ValueError as err:
                raise RefusedError(ILLEGAL_DATA_VALUE, f"{f.name}: {err}") from None
    for a, (name, low, high) in NUMBER_RANGES.items():
        if address <= a < end and not low <= new[a - HR_BASE] <= high:
            raise RefusedError(ILLEGAL_DATA_VALUE, f"{name}: {new[a - HR_BASE]} outside {low}..{high}")
    return new


@dataclass(frozen=True)
class PlcFields:
    """The holding block decoded (0: not given, for the numbers)."""

    coil_id: str
    grade: str
    recipe: str
    width_mm: int
    thickness_um: int
    length_m: int
    command_seq: int
    command: int


def decode_holding(block: Sequence[int]) -> PlcFields:
    """Raises ValueError for text that is not ASCII (apply_holding_write never lets it in)."""

    def text(r: Reg) -> str:
        return regs_ascii(block[r.address - HR_BASE : r.address - HR_BASE + r.regs])

    def num(a: int) -> int:
        return block[a - HR_BASE]

    coil, grade, recipe = (text(r) for r in ASCII_FIELDS)
    return PlcFields(
        coil_id=coil,
        grade=grade,
        recipe=recipe,
        width_mm=num(HR_WIDTH_MM),
        thickness_um=num(HR_THICKNESS_UM),
        length_m=num(HR_LENGTH_M),
        command_seq=num(HR_COMMAND_SEQ),
        command=num(HR_COMMAND),
    )


@dataclass(frozen=True)
class CommandCall:
    """What a PLC command asks of the line: PlantCommands.``method`` with these arguments."""

    method: Literal["coil_start", "coil_end", "select_recipe"]
    coil_id: str = ""
    grade: str = ""
    width_mm: float | None = None
    thickness_mm: float | None = None
    length_m: float | None = None
    recipe: str = ""


def plan_command(f: PlcFields) -> CommandCall | int:
    """The call a command register write asks for, or the error code when a field it needs is empty."""
    if f.command in (CMD_COIL_START, CMD_COIL_END) and not f.coil_id:
        return ERR_NO_COIL_ID
    if f.command == CMD_COIL_START:
        if not f.grade:
            return ERR_NO_GRADE
        return CommandCall(
            "coil_start",
            coil_id=f.coil_id,
            grade=f.grade,
            width_mm=float(f.width_mm) if f.width_mm else None,
            thickness_mm=f.thickness_um / 1000 if f.thickness_um else None,
            length_m=float(f.length_m) if f.length_m else None,
        )
    if f.command == CMD_COIL_END:
        return CommandCall("coil_end", coil_id=f.coil_id)
    if f.command == CMD_SELECT_RECIPE:
        if not f.recipe:
            return ERR_NO_RECIPE
        return CommandCall("select_recipe", recipe=f.recipe)
    raise ValueError(f"command {f.command} asks nothing of the line")


def ack_registers(seq: int, *, result: int, error: int, text: str = "") -> Patch:
    return [
        (IR_CMD_ACK_SEQ, [seq & U16_MAX]),
        (IR_CMD_RESULT, [result]),
        (IR_CMD_ERROR, [error]),
        (IR_CMD_ERROR_TEXT, ascii_regs(text or ERROR_TEXTS.get(error, ""), ERROR_TEXT_REGS)),
    ]


def result_ack(seq: int, r: CommandResult) -> Patch:
    if r.ok:
        return ack_registers(seq, result=RESULT_OK, error=ERR_NONE)
    return ack_registers(seq, result=RESULT_REFUSED, error=ERR_LINE_REFUSED, text=r.error or "")


# --- the map as documentation (docs/plant_modbus.md holds these tables; a test keeps them equal)


def _unit(r: Reg) -> str:
    if r.scale == 1:
        return r.unit
    return f"{1 / r.scale:g} {r.unit}" if r.unit else f"1/{r.scale}"


def _type(r: Reg) -> str:
    if r.kind == "ascii":
        return f"ascii, {r.regs} regs ({2 * r.regs} chars)"
    return r.kind


def markdown_table(regs: Sequence[Reg], *, ref_base: int | None) -> str:
    """A Markdown table of ``regs``: 0-based address and, with ``ref_base`` (30001 input, 40001
    holding, 10001 discrete input, 1 coil), the PLC's 1-based reference; without it the
    addresses are offsets in a ring slot."""
    if ref_base is None:
        head = "| Offset | Name | Type | Unit | Meaning |"
    else:
        head = "| Address | Ref | Name | Type | Unit | Meaning |"
    cols = head.count("|") - 1
    rows = [head, "|" + "---|" * cols]
    for r in regs:
        span = f"{r.address}" if r.regs == 1 else f"{r.address}-{r.address + r.regs - 1}"
        cells = [span]
        if ref_base is not None:
            refs = [f"{ref_base + a:05d}" for a in (r.address, r.address + r.regs - 1)]
            cells.append(refs[0] if r.regs == 1 else "-".join(refs))
        cells += [f"`{r.name}`", _type(r), _unit(r), r.meaning]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
