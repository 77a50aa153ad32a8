"""Modbus TCP server of the plant bridge: the register map of ``registers`` served with pymodbus.

pymodbus 3.16 serves a ``SimDevice`` made of ``SimData`` blocks (its ModbusDeviceContext and data
blocks are deprecated, to go in 4.0). Every request to the device reaches ``_action`` before
pymodbus touches its own copy of the registers; the action decides with the register map what
exists and what may be written (``registers.check_read`` / ``apply_holding_write``), answers a
refusal with its exception code, and copies the sink's own images into the registers a read is
about to return. So ``defect()`` only writes a few ints into a list: the next poll sees them.

Everything runs on the bridge's event loop: the images change between requests, never during
one, so a single read is always consistent (a slot read in one request is never torn).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence

from pymodbus import ModbusDeviceIdentification
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from pipeline.bridge import registers as rm
from pipeline.bridge.model import CommandResult, LineStatus, PlantCoil, PlantCommands, PlantDefect
from pipeline.config import ModbusConfig, RejectRuleConfig
from pipeline.errors import StripinspectError
from pipeline.process import RateLimitedLog

log = logging.getLogger("stripinspect.bridge.modbus")

COMMAND_WAIT_S = 10.0  # at stop, how long a command in flight to the line may still take
HOLDING_FCS = frozenset((3, 6, 16, 22, 23))
COIL_FCS = frozenset((1, 5, 15))
READ_FCS = frozenset((1, 2, 3, 4, 23))
# File records and the FIFO queue: nothing here has them, but pymodbus answers them with dummy
# data (and FC21 as a write that succeeded); the diagnostics and identification it answers
# itself (FC7, 8, 11, 12, 17, 43) touch nothing of the map.
UNSERVED_FCS = frozenset((20, 21, 24))
ADDRESS_SPACE = 65536


class ModbusStartError(StripinspectError):
    """The Modbus server could not start; one line."""


def call_line(commands: PlantCommands, c: rm.CommandCall) -> CommandResult:
    """Blocking: the PLC's command as a PlantCommands call."""
    if c.method == "coil_start":
        return commands.coil_start(
            coil_id=c.coil_id, grade=c.grade, width_mm=c.width_mm, thickness_mm=c.thickness_mm, length_m=c.length_m
        )
    if c.method == "coil_end":
        return commands.coil_end(coil_id=c.coil_id)
    return commands.select_recipe(c.recipe)


def bit_span(address: int, reg_count: int) -> int:
    """Bits from ``address`` to the end of the last 16-bit register a bit request covers.

    pymodbus hands the action of a bit block the number of registers a request spans, not its
    bit count; the request fits in bits 0..15 exactly when that span ends at bit 16 or before."""
    return (address // 16 + reg_count) * 16 - address


class ModbusSink:
    """Serves the register map on ``cfg.host:cfg.port`` for unit ``cfg.unit_id``; other units get
    exception 0x0B (gateway target failed to respond). ``cameras`` and ``classes`` number the
    cameras and defect classes in the ring slots (1, 2, ...; 0 unknown); without ``cameras``
    the order of the cameras in the line status numbers them."""

    name = "modbus"

    def __init__(
        self,
        *,
        cfg: ModbusConfig,
        commands: PlantCommands,
        reject: RejectRuleConfig,
        cameras: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> None:
        if not isinstance(cfg, ModbusConfig):
            raise TypeError(f"cfg must be a ModbusConfig, got {type(cfg).__name__}")
        if not isinstance(reject, RejectRuleConfig):
            raise TypeError(f"reject must be a RejectRuleConfig, got {type(reject).__name__}")
        for what, names in (("cameras", cameras), ("classes", classes)):
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"{what} must be a sequence of non-empty names, got {names!r}")
            if len(set(names)) != len(names):
                raise ValueError(f"{what} must not repeat a name, got {list(names)}")
        self.cfg, self.commands, self.reject = cfg, commands, reject
        self._camera_no = {c: i + 1 for i, c in enumerate(cameras)}
        self._cameras_fixed = bool(cameras)
        self._class_no = {c: i + 1 for i, c in enumerate(classes)}
        self._ir = [0] * rm.input_size(cfg.ring_size)
        rm.apply(self._ir, rm.header_registers(cfg.ring_size))
        self._hr = [0] * rm.HR_SIZE
        self._heartbeat = 0
        self._state_code = rm.STATE_CODES["unknown"]
        self._newest = 0
        self._reject_on = False
        self._pulse: asyncio.TimerHandle | None = None
        self._busy = False
        self._command: asyncio.Task[None] | None = None
        self._server: ModbusTcpServer | None = None
        self._ratelog = RateLimitedLog(log, interval_s=10.0)
        self._counts = dict.fromkeys(
            (
                "reads",
                "writes",
                "refused_reads",
                "refused_writes",
                "other_units",
                "commands",
                "rejects",
                "rejects_late",
                "stale",
                "clients",
                "connections",
            ),
            0,
        )

    # --- the Sink protocol ----------------------------------------------------------------

    async def start(self) -> None:
        host, port, unit = self.cfg.host, self.cfg.port, self.cfg.unit_id
        # Every block spans the whole address space, so that every request reaches the action
        # and the register map alone decides what exists (and a refusal is counted).
        device = SimDevice(
            id=unit,
            simdata=(
                [SimData(0, values=[False] * ADDRESS_SPACE, datatype=DataType.BITS)],
                [SimData(0, values=[False] * ADDRESS_SPACE, datatype=DataType.BITS)],
                [SimData(0, count=ADDRESS_SPACE, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=ADDRESS_SPACE, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )
        devices = [device]
        if unit != 0:
            # SimDevice id 0 answers every unit without a device of its own; without it pymodbus
            # 3.16 answers an unknown unit with 0x04 and logs a traceback per request.
            other = SimDevice(
                id=0,
                simdata=[SimData(0, count=ADDRESS_SPACE, values=0, datatype=DataType.REGISTERS)],
                use_bit_addressing=True,
                action=self._other_unit,
            )
            devices.append(other)
        identity = ModbusDeviceIdentification(
            info_name={
                "VendorName": "stripinspect",
                "ProductCode": "stripinspect-bridge",
                "ProductName": "stripinspect plant bridge",
                "ModelName": f"register map {rm.MAP_VERSION}",
            }
        )
        self._server = ModbusTcpServer(
            devices,
            address=(host, port),
            identity=identity,
            trace_connect=self._on_connect,
            trace_pdu=self._on_pdu,
        )
        try:
            await self._server.serve_forever(background=True)
        except RuntimeError:
            self._server = None
            raise ModbusStartError(
                f"bridge.modbus: cannot listen on {host}:{port} (in use, or not an address of this machine)"
            ) from None
        log.info("modbus: unit %d on %s:%d, ring of %d defects", unit, host, port, self.cfg.ring_size)

    async def defect(self, d: PlantDefect) -> None:
        ring = self.cfg.ring_size
        if d.bridge_seq <= self._newest - ring or d.bridge_seq < 1:
            self._counts["stale"] += 1
            self._ratelog.warning("stale", "modbus: defect %d is older than the ring holds", d.bridge_seq)
            return
        age_ms = max(0.0, (time.time() - d.capture_time) * 1000.0)
        camera, klass = self._camera_no.get(d.camera_id, 0), self._class_no.get(d.defect_class, 0)
        slot = rm.encode_slot(d, camera=camera, klass=klass, age_ms=age_ms)
        rm.apply(self._ir, [(rm.slot_address(d.bridge_seq, ring), slot)])
        if d.bridge_seq > self._newest:
            self._newest = d.bridge_seq
            rm.apply(self._ir, rm.ring_registers(self._newest, ring))
        if d.decision == "reject":
            self._start_reject(d, age_ms=age_ms)

    async def status(self, s: LineStatus) -> None:
        self._heartbeat = (self._heartbeat + 1) & rm.U16_MAX
        self._state_code = rm.STATE_CODES.get(s.state, 0)
        if not self._cameras_fixed:
            self._camera_no = {c.camera_id: i + 1 for i, c in enumerate(s.cameras)}
        rm.apply(self._ir, rm.status_registers(s, heartbeat=self._heartbeat, newest_seq=self._newest))

    async def coil(self, c: PlantCoil) -> None:
        # The head of a coil shows before the next status does; the rest (grading, closed) is
        # for OPC UA and MQTT: a PLC has no use for a coil summary in registers.
        if c.kind == "start":
            rm.apply(self._ir, [(rm.IR_COIL_ID, rm.ascii_regs(c.coil_id, rm.COIL_ID_REGS))])

    async def stop(self) -> None:
        if self._pulse is not None:
            self._pulse.cancel()
            self._pulse = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
        if self._command is not None and not self._command.done():
            # The call to the line runs in a thread and cannot be cut short; its answer is lost.
            _, pending = await asyncio.wait({self._command}, timeout=COMMAND_WAIT_S)
            if pending:
                log.warning("modbus: a command to the line still runs at stop; its answer is lost")

    def counters(self) -> dict[str, int]:
        return dict(self._counts)

    # --- reject output ------------------------------------------------------------------------

    def _start_reject(self, d: PlantDefect, *, age_ms: float) -> None:
        """Latch the defect in the reject registers and (re)start the pulse: a reject during the
        pulse keeps the output on for another pulse_ms, so the counter, not the edge, counts."""
        self._counts["rejects"] += 1
        if d.reject_in_m < 0:
            self._counts["rejects_late"] += 1
        rm.apply(self._ir, rm.reject_registers(self._counts["rejects"], d, age_ms=age_ms))
        self._set_reject(True)
        if self._pulse is not None:
            self._pulse.cancel()
        self._pulse = asyncio.get_running_loop().call_later(self.reject.pulse_ms / 1000.0, self._set_reject, False)

    def _set_reject(self, on: bool) -> None:
        self._reject_on = on
        self._ir[rm.IR_REJECT_ACTIVE] = int(on)
        if not on:
            self._pulse = None

    # --- commands -----------------------------------------------------------------------------

    def _take(self, f: rm.PlcFields) -> None:
        plan = rm.plan_command(f)
        if isinstance(plan, int):
            log.info("modbus: command %d (seq %d) refused: %s", f.command, f.command_seq, rm.ERROR_TEXTS[plan])
            rm.apply(self._ir, rm.ack_registers(f.command_seq, result=rm.RESULT_REFUSED, error=plan))
            return
        self._set_busy(True)
        self._command = asyncio.get_running_loop().create_task(self._run(f.command_seq, plan))

    async def _run(self, seq: int, call: rm.CommandCall) -> None:
        self._counts["commands"] += 1
        try:
            result = await asyncio.to_thread(functools.partial(call_line, self.commands, call))
        except Exception as err:
            # The line's client belongs to the bridge and may fail in ways of its own; whatever
            # it raises, the PLC waiting on command_ack_seq must get an answer.
            log.error("modbus: %s (seq %d) failed: %r", call.method, seq, err, exc_info=True)
            patch = rm.ack_registers(seq, result=rm.RESULT_NO_ANSWER, error=rm.ERR_NO_ANSWER, text=str(err))
        else:
            log.info("modbus: %s (seq %d): %s", call.method, seq, "ok" if result.ok else result.error)
            patch = rm.result_ack(seq, result)
        rm.apply(self._ir, patch)
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        self._ir[rm.IR_CMD_BUSY] = int(busy)

    # --- pymodbus ---------------------------------------------------------------------------

    def _on_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending and pdu.function_code in UNSERVED_FCS:
            return ExceptionResponse(
                pdu.function_code, ExcCodes.ILLEGAL_FUNCTION, device_id=pdu.dev_id, transaction=pdu.transaction_id
            )
        return pdu

    def _on_connect(self, connected: bool) -> None:
        self._counts["clients"] += 1 if connected else -1
        if connected:
            self._counts["connections"] += 1

    async def _action(
        self,
        fc: int,
        start: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Every request to our unit, before pymodbus reads or writes its registers (a write
        request's echo or read-back comes as a second, read call)."""
        try:
            if values is None:
                self._read(fc, start, address, count, registers)
            else:
                self._write(fc, address, values)
        except rm.RefusedError as r:
            kind = "reads" if values is None else "writes"
            self._counts[f"refused_{kind}"] += 1
            n = count if values is None else len(values)
            self._ratelog.warning(
                f"refused-{kind}",
                "modbus: refused FC%d at %d (x%d), exception 0x%02X: %s",
                fc,
                address,
                n,
                r.code,
                r.reason,
            )
            return ExcCodes(r.code)
        return None

    def _read(self, fc: int, start: int, address: int, count: int, registers: list[int]) -> None:
        ring = self.cfg.ring_size
        if fc == 4:
            rm.check_read("ir", address, count, ring_size=ring)
            registers[address - start : address - start + count] = self._ir[address : address + count]
        elif fc in HOLDING_FCS:
            rm.check_read("hr", address, count, ring_size=ring)
            lo = address - rm.HR_BASE
            registers[address - start : address - start + count] = self._hr[lo : lo + count]
        else:
            rm.check_read("bits", address, bit_span(address, count), ring_size=ring)
            if fc == 2:
                on = rm.discrete_inputs(reject=self._reject_on, state_code=self._state_code, busy=self._busy)
            else:
                on = [0] if self._reject_on else []
            registers[address // 16 - start] = rm.bits_register(on)
        if fc in READ_FCS:  # not the read-back of a write
            self._counts["reads"] += 1

    def _write(self, fc: int, address: int, values: list[int] | list[bool]) -> None:
        if fc in COIL_FCS:
            raise rm.RefusedError(rm.ILLEGAL_DATA_ADDRESS, "coils are read-only (the reject output is the bridge's)")
        if fc not in HOLDING_FCS:
            raise rm.RefusedError(rm.ILLEGAL_DATA_ADDRESS, f"function {fc} writes nothing here")
        new = rm.apply_holding_write(self._hr, address, [int(v) for v in values])
        command = address <= rm.HR_COMMAND < address + len(values) and new[rm.HR_COMMAND - rm.HR_BASE] != 0
        if command and self._busy:
            raise rm.RefusedError(rm.SERVER_DEVICE_BUSY, "a command to the line is still running")
        self._hr = new
        self._counts["writes"] += 1
        if command:
            self._take(rm.decode_holding(new))

    async def _other_unit(
        self,
        fc: int,
        start: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        self._counts["other_units"] += 1
        self._ratelog.warning(
            "other-unit", "modbus: FC%d for a unit other than %d: exception 0x0B", fc, self.cfg.unit_id
        )
        return ExcCodes.GATEWAY_NO_RESPONSE
