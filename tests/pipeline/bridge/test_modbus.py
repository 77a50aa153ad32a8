"""The Modbus sink served on 127.0.0.1 and read by a real pymodbus client, as a PLC would.

Each test runs its own event loop with the sink and an AsyncModbusTcpClient on a free port,
under a timeout; the server stops in a ``finally``."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import FileRecord

from pipeline.bridge import registers as rm
from pipeline.bridge.modbus import ModbusSink, ModbusStartError
from pipeline.bridge.model import CommandResult, PlantCoil
from pipeline.config import ModbusConfig, RejectRuleConfig
from tests.pipeline.bridge.conftest import RecordingCommands, free_port, make_defect, make_status

UNIT = 1
TIMEOUT_S = 20.0


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


@contextlib.asynccontextmanager
async def served(
    commands: Any, *, ring_size: int = 32, pulse_ms: int = 100, unit_id: int = UNIT, **kw: Any
) -> AsyncIterator[tuple[ModbusSink, AsyncModbusTcpClient]]:
    port = free_port()
    sink = ModbusSink(
        cfg=ModbusConfig(port=port, ring_size=ring_size, unit_id=unit_id),
        commands=commands,
        reject=RejectRuleConfig(pulse_ms=pulse_ms),
        **kw,
    )
    await sink.start()
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    try:
        assert await client.connect()
        yield sink, client
    finally:
        client.close()
        await sink.stop()


async def ir(client: AsyncModbusTcpClient, address: int, count: int = 1) -> list[int]:
    r = await client.read_input_registers(address, count=count, device_id=UNIT)
    assert not r.isError(), r
    return list(r.registers)


async def hr(client: AsyncModbusTcpClient, address: int, count: int = 1) -> list[int]:
    r = await client.read_holding_registers(address, count=count, device_id=UNIT)
    assert not r.isError(), r
    return list(r.registers)


async def u32(client: AsyncModbusTcpClient, address: int) -> int:
    return rm.regs_u32(await ir(client, address, 2))


async def di(client: AsyncModbusTcpClient, address: int = 0, count: int = 8) -> list[bool]:
    r = await client.read_discrete_inputs(address, count=count, device_id=UNIT)
    assert not r.isError(), r
    return list(r.bits[:count])


async def until(pred: Callable[[], Awaitable[bool]], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@dataclass
class Plc:
    """A PLC polling the ring by sequence number, by the rule in docs/plant_modbus.md."""

    client: AsyncModbusTcpClient
    last_seen: int = 0
    missed: int = 0
    got: dict[int, rm.Slot] = field(default_factory=dict)

    async def poll(self, between: Callable[[], Awaitable[None]] | None = None) -> None:
        newest = await u32(self.client, rm.IR_NEWEST_SEQ)
        ring = (await ir(self.client, rm.IR_RING_SIZE))[0]
        reads, missed = rm.ring_reads(self.last_seen, newest, ring)
        self.missed += missed
        if between is not None:
            await between()  # the bridge moves on between the header and the slot reads
        for seq in reads:
            slot = rm.decode_slot(await ir(self.client, rm.slot_address(seq, ring), rm.SLOT_SIZE))
            if slot.seq == seq:
                self.got[seq] = slot
            else:
                self.missed += 1  # overwritten by a newer defect since the header read
        if newest:
            self.last_seen = newest


def same_slot(got: rm.Slot, seq: int, *, camera: int = 1) -> bool:
    """``got`` holds make_defect(seq), given to the sink within a second of its making."""
    return 40 <= got.age_ms < 1000 and replace(got, age_ms=0) == expected_slot(seq, camera=camera)


def expected_slot(seq: int, *, camera: int) -> rm.Slot:
    d = make_defect(seq)
    return rm.Slot(
        seq=seq,
        camera=camera,
        side=1,
        md_mm=round(d.md_m * 1000),
        cd_mm=310.2,
        length_mm=14.0,
        width_mm=6.5,
        area_mm2=71.0,
        score=3.25,
        threshold=1.5,
        klass=0,
        decision=1 if seq % 2 else 0,
        reject_in_mm=3200,
        age_ms=0,
        class_confidence=None,
    )


# --- the ring -------------------------------------------------------------------------------------


def test_a_plc_polling_in_time_gets_every_defect_with_its_fields(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands, ring_size=32, cameras=("cam0",)) as (sink, client):
            plc = Plc(client)
            await plc.poll()
            assert plc.got == {}
            seq = 0
            for burst in (10, 1, 21, 8):  # 40 defects; never more than the ring between polls
                for _ in range(burst):
                    seq += 1
                    await sink.defect(make_defect(seq))
                await plc.poll()
            assert plc.missed == 0
            assert sorted(plc.got) == list(range(1, 41))
            assert all(same_slot(plc.got[s], s) for s in plc.got)
            assert await u32(client, rm.IR_OLDEST_SEQ) == 9
            assert (await ir(client, rm.IR_RING_SIZE, 2)) == [32, rm.SLOT_SIZE]

    run(main())


def test_a_slow_plc_counts_exactly_the_defects_it_missed(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands, ring_size=32) as (sink, client):
            for seq in range(1, 26):
                await sink.defect(make_defect(seq))
            slow = Plc(client, last_seen=0)
            for seq in range(26, 41):
                await sink.defect(make_defect(seq))
            await slow.poll()  # 40 issued, the ring holds 9..40
            assert slow.missed == 8
            assert sorted(slow.got) == list(range(9, 41))

    run(main())


def test_a_late_copy_never_moves_the_ring_back(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands, ring_size=32) as (sink, client):
            for seq in range(1, 41):
                await sink.defect(make_defect(seq))
            await sink.defect(make_defect(35, cd_mm=99.0))  # again, within the ring: its slot only
            await sink.defect(make_defect(3))  # older than the ring holds: dropped, counted
            assert await u32(client, rm.IR_NEWEST_SEQ) == 40
            assert rm.decode_slot(await ir(client, rm.slot_address(35, 32), rm.SLOT_SIZE)).cd_mm == 99.0
            assert rm.decode_slot(await ir(client, rm.slot_address(3, 32), rm.SLOT_SIZE)).seq == 35
            assert sink.counters()["stale"] == 1

    run(main())


def test_a_slot_overwritten_during_a_poll_is_detected_by_its_seq(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands, ring_size=32) as (sink, client):
            for seq in range(1, 33):
                await sink.defect(make_defect(seq))
            plc = Plc(client)

            async def eight_more() -> None:
                for seq in range(33, 41):
                    await sink.defect(make_defect(seq))

            await plc.poll(between=eight_more)  # header said 1..32; slots of 1..8 now hold 33..40
            assert plc.missed == 8
            assert sorted(plc.got) == list(range(9, 33))
            await plc.poll()
            assert plc.missed == 8
            assert sorted(plc.got) == list(range(9, 41))
            # no cameras given and no status yet: the camera is unknown
            assert all(same_slot(plc.got[s], s, camera=0) for s in plc.got)

    run(main())


def test_cameras_and_classes_are_numbered(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands, classes=("scratch", "scale")) as (sink, client):
            await sink.defect(make_defect(1, camera_id="cam1", defect_class="scale"))
            assert (await ir(client, rm.RING_BASE + 2))[0] == 0  # no status yet
            s = make_status(1)
            await sink.status(replace(s, cameras=(s.cameras[0], replace(s.cameras[0], camera_id="cam1"))))
            await sink.defect(make_defect(2, camera_id="cam1", defect_class="rust"))
            slot = rm.decode_slot(await ir(client, rm.slot_address(1, 32), rm.SLOT_SIZE))
            assert slot.klass == 2
            slot = rm.decode_slot(await ir(client, rm.slot_address(2, 32), rm.SLOT_SIZE))
            assert (slot.camera, slot.klass) == (2, 0)

    run(main())


def test_a_plc_polling_every_5ms_sees_a_defect_within_a_few_ms(commands: RecordingCommands) -> None:
    delays: list[float] = []

    async def main() -> None:
        async with served(commands) as (sink, client):
            returned: dict[int, float] = {}
            stop = asyncio.Event()

            async def poller() -> None:
                seen = 0
                while not stop.is_set():
                    newest = await u32(client, rm.IR_NEWEST_SEQ)
                    now = time.perf_counter()
                    for s in range(seen + 1, newest + 1):
                        delays.append(now - returned[s])
                    seen = max(seen, newest)
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(poller())
            for seq in range(1, 41):
                await sink.defect(make_defect(seq))
                returned[seq] = time.perf_counter()
                await asyncio.sleep(0.013)
            await asyncio.sleep(0.05)
            stop.set()
            await task

    run(main())
    assert len(delays) == 40
    print(f"poll latency: median {statistics.median(delays) * 1e3:.1f} ms, max {max(delays) * 1e3:.1f} ms")
    assert max(delays) < 0.1  # one 5 ms poll period plus a round trip; loose for a loaded CI machine


# --- status, reject output ---------------------------------------------------------------------------


def test_heartbeat_state_and_counters_follow_status(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands) as (sink, client):
            assert (await ir(client, 0, 3)) == [rm.MAP_VERSION, 0, 0]
            assert await di(client, 0, 4) == [False, False, True, False]  # unknown: alarm
            await sink.status(make_status(1, state="starting"))
            assert (await ir(client, 0, 5)) == [rm.MAP_VERSION, 1, 1, 1, 1]
            assert await di(client, 0, 4) == [False, False, False, False]
            await sink.status(make_status(2, state="running"))
            assert (await ir(client, rm.IR_HEARTBEAT, 2)) == [2, 2]
            assert await di(client, 0, 4) == [False, True, False, False]
            assert await u32(client, rm.IR_FRAMES) == 102
            assert await u32(client, rm.IR_ALERTS) == 7
            assert await u32(client, rm.IR_DEFECTS) == 7
            coil = await ir(client, rm.IR_COIL_ID, rm.COIL_ID_REGS)
            assert rm.regs_ascii(coil) == "24-118734"
            assert rm.regs_ascii(await ir(client, rm.IR_RECIPE, rm.RECIPE_REGS)) == "DC04"
            await sink.status(make_status(3, state="camera_offline"))
            assert (await ir(client, rm.IR_HEARTBEAT, 4)) == [3, 4, 1, 0]
            assert await di(client, 0, 4) == [False, False, True, False]

    run(main())


def test_a_coil_start_shows_before_the_next_status(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands) as (sink, client):
            await sink.coil(PlantCoil(kind="start", coil_id="24-118735", data={}))
            assert rm.regs_ascii(await ir(client, rm.IR_COIL_ID, rm.COIL_ID_REGS)) == "24-118735"
            await sink.coil(PlantCoil(kind="closed", coil_id="24-118735", data={"disposition": "prime"}))
            assert rm.regs_ascii(await ir(client, rm.IR_COIL_ID, rm.COIL_ID_REGS)) == "24-118735"

    run(main())


def test_reject_output_pulses_and_the_counter_counts(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands, pulse_ms=300) as (sink, client):
            assert await di(client, 0, 1) == [False]
            await sink.defect(make_defect(1, md_m=100.25, reject_in_m=3.2))  # odd: reject
            t0 = time.monotonic()
            assert await di(client, 0, 1) == [True]
            coil = await client.read_coils(0, count=1, device_id=UNIT)
            assert coil.bits[0] is True
            assert await u32(client, rm.IR_REJECT_COUNT) == 1
            assert await u32(client, rm.IR_REJECT_SEQ) == 1
            assert rm.regs_i32(await ir(client, rm.IR_REJECT_IN_MM, 2)) == 3200
            assert rm.regs_i32(await ir(client, rm.IR_REJECT_MD_MM, 2)) == 100_250
            age, active = await ir(client, rm.IR_REJECT_AGE_MS, 2)
            assert 40 <= age < 1000  # make_defect captures 50 ms before now
            assert active == 1
            await until(lambda: _off(client))
            assert time.monotonic() - t0 >= 0.29
            assert (await ir(client, rm.IR_REJECT_ACTIVE))[0] == 0

            await sink.defect(make_defect(2))  # accept: no pulse
            assert await di(client, 0, 1) == [False]
            assert await u32(client, rm.IR_REJECT_COUNT) == 1
            await sink.defect(make_defect(3))
            await asyncio.sleep(0.2)
            await sink.defect(make_defect(5, reject_in_m=-0.5))  # during the pulse: it goes on
            t1 = time.monotonic()
            await asyncio.sleep(0.15)  # 3's pulse alone would have ended 0.05 s before
            assert await di(client, 0, 1) == [True]
            assert await u32(client, rm.IR_REJECT_COUNT) == 3
            assert await u32(client, rm.IR_REJECT_SEQ) == 5
            assert rm.regs_i32(await ir(client, rm.IR_REJECT_IN_MM, 2)) == -500
            await until(lambda: _off(client))
            assert time.monotonic() - t1 >= 0.29
            c = sink.counters()
            assert (c["rejects"], c["rejects_late"]) == (3, 1)

    run(main())


async def _off(client: AsyncModbusTcpClient) -> bool:
    return await di(client, 0, 1) == [False]


# --- commands from the PLC -------------------------------------------------------------------------


async def write_text(client: AsyncModbusTcpClient, address: int, text: str, regs: int) -> None:
    r = await client.write_registers(address, rm.ascii_regs(text, regs), device_id=UNIT)
    assert not r.isError(), r


async def command(client: AsyncModbusTcpClient, seq: int, code: int) -> tuple[int, int, str]:
    """Write seq and command in one FC16, wait for the ack, return result, error and its text."""
    r = await client.write_registers(rm.HR_COMMAND_SEQ, [seq, code], device_id=UNIT)
    assert not r.isError(), r

    async def acked() -> bool:
        ack_seq, _, _, busy = await ir(client, rm.IR_CMD_ACK_SEQ, 4)
        return ack_seq == seq and busy == 0

    await until(acked)
    regs = await ir(client, rm.IR_CMD_RESULT, 2 + 1 + rm.ERROR_TEXT_REGS)
    return regs[0], regs[1], rm.regs_ascii(regs[3:])


def test_plc_commands_reach_the_line_and_are_acknowledged(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands) as (sink, client):
            await write_text(client, rm.HR_COIL_ID, "24-118734", rm.COIL_ID_REGS)
            await write_text(client, rm.HR_GRADE, "DC04", rm.GRADE_REGS)
            r = await client.write_registers(rm.HR_WIDTH_MM, [1250, 800, 3000], device_id=UNIT)
            assert not r.isError()
            assert commands.calls == []  # data alone runs nothing
            assert await command(client, 1, rm.CMD_COIL_START) == (rm.RESULT_OK, rm.ERR_NONE, "")
            assert commands.calls == [
                (
                    "coil_start",
                    {
                        "coil_id": "24-118734",
                        "grade": "DC04",
                        "width_mm": 1250.0,
                        "thickness_mm": 0.8,
                        "length_m": 3000.0,
                    },
                )
            ]
            await write_text(client, rm.HR_GRADE, "X99", rm.GRADE_REGS)
            res = await command(client, 2, rm.CMD_COIL_START)
            assert res == (rm.RESULT_REFUSED, rm.ERR_LINE_REFUSED, "unknown grade 'X99'")
            assert await command(client, 3, rm.CMD_COIL_END) == (rm.RESULT_OK, rm.ERR_NONE, "")
            assert commands.calls[-1] == ("coil_end", {"coil_id": "24-118734"})
            await write_text(client, rm.HR_RECIPE, "DC01", rm.RECIPE_REGS)
            r = await client.write_register(rm.HR_COMMAND_SEQ, 4, device_id=UNIT)  # FC6, one at a time
            assert not r.isError()
            r = await client.write_register(rm.HR_COMMAND, rm.CMD_SELECT_RECIPE, device_id=UNIT)
            assert not r.isError() and r.registers == [rm.CMD_SELECT_RECIPE]  # the echo
            await until(lambda: _acked(client, 4))
            assert commands.current == "DC01"
            assert await hr(client, rm.HR_RECIPE, 2) == rm.ascii_regs("DC01", 2)
            assert len(commands.calls) == 4
            # A field the command needs is empty: refused without asking the line.
            await write_text(client, rm.HR_RECIPE, "", rm.RECIPE_REGS)
            res = await command(client, 5, rm.CMD_SELECT_RECIPE)
            assert res == (rm.RESULT_REFUSED, rm.ERR_NO_RECIPE, "recipe empty")
            assert len(commands.calls) == 4
            assert sink.counters()["commands"] == 4

    run(main())


async def _acked(client: AsyncModbusTcpClient, seq: int) -> bool:
    ack_seq, _, _, busy = await ir(client, rm.IR_CMD_ACK_SEQ, 4)
    return ack_seq == seq and busy == 0


class GatedCommands(RecordingCommands):
    """A line that takes its time: select_recipe waits until ``go`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def select_recipe(self, name: str) -> CommandResult:
        self.go.wait(5.0)
        return super().select_recipe(name)


class BrokenCommands(RecordingCommands):
    def coil_end(self, *, coil_id: str) -> CommandResult:
        raise ConnectionError("control socket gone")


def test_a_command_while_one_runs_is_refused_busy_and_changes_nothing() -> None:
    line = GatedCommands()

    async def main() -> None:
        async with served(line) as (sink, client):
            await write_text(client, rm.HR_RECIPE, "DC01", rm.RECIPE_REGS)
            r = await client.write_registers(rm.HR_COMMAND_SEQ, [1, rm.CMD_SELECT_RECIPE], device_id=UNIT)
            assert not r.isError()
            assert (await ir(client, rm.IR_CMD_BUSY))[0] == 1
            assert (await di(client, 0, 4))[rm.DI_COMMAND_BUSY]
            before = await hr(client, rm.HR_BASE, rm.HR_SIZE)
            r = await client.write_registers(rm.HR_COMMAND_SEQ, [2, rm.CMD_COIL_END], device_id=UNIT)
            assert r.isError() and r.exception_code == rm.SERVER_DEVICE_BUSY
            assert await hr(client, rm.HR_BASE, rm.HR_SIZE) == before
            r = await client.write_register(rm.HR_WIDTH_MM, 1500, device_id=UNIT)  # data may change meanwhile
            assert not r.isError()
            line.go.set()
            await until(lambda: _acked(client, 1))
            assert [c[0] for c in line.calls] == ["select_recipe"]
            assert sink.counters()["refused_writes"] == 1

    run(main())


def test_a_line_that_raises_is_reported_as_no_answer() -> None:
    async def main() -> None:
        async with served(BrokenCommands()) as (_, client):
            await write_text(client, rm.HR_COIL_ID, "C1", rm.COIL_ID_REGS)
            res = await command(client, 9, rm.CMD_COIL_END)
            assert res == (rm.RESULT_NO_ANSWER, rm.ERR_NO_ANSWER, "control socket gone")

    run(main())


# --- refusals ----------------------------------------------------------------------------------------


def test_malformed_requests_get_the_modbus_exception_and_change_nothing(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands) as (sink, client):
            await sink.status(make_status(1))
            await sink.defect(make_defect(2))
            await write_text(client, rm.HR_COIL_ID, "24-118734", rm.COIL_ID_REGS)
            ir_before = await ir(client, 0, rm.RING_BASE)
            hr_before = await hr(client, rm.HR_BASE, rm.HR_SIZE)
            good_id = rm.ascii_regs("OTHER", rm.COIL_ID_REGS)
            writes = [
                (client.write_register(rm.IR_HEARTBEAT, 5, device_id=UNIT), rm.ILLEGAL_DATA_ADDRESS),
                (client.write_register(rm.IR_NEWEST_SEQ, 5, device_id=UNIT), rm.ILLEGAL_DATA_ADDRESS),
                (client.write_register(rm.HR_BASE + rm.HR_SIZE, 1, device_id=UNIT), rm.ILLEGAL_DATA_ADDRESS),
                (client.write_registers(rm.HR_COMMAND, [0, 0], device_id=UNIT), rm.ILLEGAL_DATA_ADDRESS),
                (client.write_registers(rm.HR_COIL_ID, [0xC3A9, 0x4100], device_id=UNIT), rm.ILLEGAL_DATA_VALUE),
                (client.write_register(rm.HR_WIDTH_MM, 0, device_id=UNIT), rm.ILLEGAL_DATA_VALUE),
                (client.write_register(rm.HR_WIDTH_MM, 5001, device_id=UNIT), rm.ILLEGAL_DATA_VALUE),
                (client.write_register(rm.HR_COMMAND, 7, device_id=UNIT), rm.ILLEGAL_DATA_VALUE),
                # a good coil id and a bad width in one request: neither is taken
                (
                    client.write_registers(rm.HR_COIL_ID, [*good_id, *[0] * 16, 0], device_id=UNIT),
                    rm.ILLEGAL_DATA_VALUE,
                ),
                (client.write_coil(0, True, device_id=UNIT), rm.ILLEGAL_DATA_ADDRESS),
                (client.write_coils(0, [True, False], device_id=UNIT), rm.ILLEGAL_DATA_ADDRESS),
                (client.write_coil(100, False, device_id=UNIT), rm.ILLEGAL_DATA_ADDRESS),
            ]
            for request, code in writes:
                r = await request
                assert r.isError() and r.exception_code == code, r
            reads = [
                client.read_input_registers(rm.input_size(32) - 1, count=2, device_id=UNIT),
                client.read_holding_registers(0, count=1, device_id=UNIT),
                client.read_discrete_inputs(0, count=17, device_id=UNIT),
                client.read_coils(16, count=1, device_id=UNIT),
            ]
            for request in reads:
                r = await request
                assert r.isError() and r.exception_code == rm.ILLEGAL_DATA_ADDRESS, r
            assert await ir(client, 0, rm.RING_BASE) == ir_before
            assert await hr(client, rm.HR_BASE, rm.HR_SIZE) == hr_before
            assert commands.calls == []
            c = sink.counters()
            assert (c["refused_writes"], c["refused_reads"], c["commands"]) == (len(writes), len(reads), 0)

    run(main())


def test_other_units_get_the_gateway_exception(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands, unit_id=3) as (sink, client):
            r = await client.read_input_registers(0, count=1, device_id=1)
            assert r.isError() and r.exception_code == rm.GATEWAY_TARGET_NO_RESPONSE
            r = await client.write_register(rm.HR_WIDTH_MM, 100, device_id=0)
            assert r.isError() and r.exception_code == rm.GATEWAY_TARGET_NO_RESPONSE
            r = await client.read_input_registers(0, count=1, device_id=3)
            assert r.registers == [rm.MAP_VERSION]
            assert sink.counters()["other_units"] == 2

    run(main())


def test_function_codes_without_data_here_are_illegal(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands) as (_, client):
            r = await client.read_fifo_queue(address=rm.HR_BASE, device_id=UNIT)
            assert r.isError() and r.exception_code == 0x01
            record = FileRecord(file_number=1, record_number=0, record_data=b"\x00\x01")
            r = await client.write_file_record([record], device_id=UNIT)
            assert r.isError() and r.exception_code == 0x01
            r = await client.read_device_information(device_id=UNIT)
            assert not r.isError() and getattr(r, "information", {}).get(0) == b"stripinspect"

    run(main())


def test_unit_0_answers_every_unit(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands, unit_id=0) as (_, client):
            for unit in (0, 1, 247, 255):
                r = await client.read_input_registers(0, count=1, device_id=unit)
                assert r.registers == [rm.MAP_VERSION]

    run(main())


def test_a_taken_port_is_one_line_at_start_and_stop_closes_clients(commands: RecordingCommands) -> None:
    async def main() -> None:
        async with served(commands) as (sink, _):
            assert sink.counters()["clients"] == 1
            other = ModbusSink(cfg=sink.cfg, commands=commands, reject=RejectRuleConfig())
            with pytest.raises(ModbusStartError, match=rf"cannot listen on 127.0.0.1:{sink.cfg.port}"):
                await other.start()
            await other.stop()
        assert sink.counters()["clients"] == 0
        assert sink.counters()["connections"] == 1

    run(main())


def test_constructor_checks() -> None:
    cfg, reject = ModbusConfig(), RejectRuleConfig()
    with pytest.raises(ValueError, match="cameras"):
        ModbusSink(cfg=cfg, commands=RecordingCommands(), reject=reject, cameras=("a", "a"))
    with pytest.raises(ValueError, match="classes"):
        ModbusSink(cfg=cfg, commands=RecordingCommands(), reject=reject, classes="scratch")
    with pytest.raises(TypeError, match="ModbusConfig"):
        ModbusSink(cfg=reject, commands=RecordingCommands(), reject=reject)  # type: ignore[arg-type]
