"""The Modbus register map on plain ints: encodings, the ring rule, holding-write checks, and the
documentation tables kept equal to the map."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.bridge import registers as rm
from pipeline.bridge.model import CommandResult
from tests.pipeline.bridge.conftest import make_defect, make_status

DOC = Path(__file__).resolve().parents[3] / "docs" / "plant_modbus.md"
EMPTY = [0] * rm.HR_SIZE


def hr(block: list[int], address: int, n: int = 1) -> list[int]:
    return block[address - rm.HR_BASE : address - rm.HR_BASE + n]


# --- scalars ----------------------------------------------------------------------------------


@given(st.integers(0, rm.U32_MAX))
def test_u32_round_trip_high_word_first(v: int) -> None:
    regs = rm.u32_regs(v)
    assert regs == [v >> 16, v & 0xFFFF]
    assert rm.regs_u32(regs) == v


@given(st.integers(rm.I32_MIN, rm.I32_MAX))
def test_i32_round_trip(v: int) -> None:
    regs = rm.i32_regs(v)
    assert all(0 <= r <= 0xFFFF for r in regs)
    assert rm.regs_i32(regs) == v


def test_counters_wrap_and_signed_values_clamp() -> None:
    assert rm.regs_u32(rm.u32_regs(2**32 + 5)) == 5
    assert rm.i32_regs(-1) == [0xFFFF, 0xFFFF]
    assert rm.regs_i32(rm.i32_regs(2**40)) == rm.I32_MAX
    assert rm.regs_i32(rm.i32_regs(-(2**40))) == rm.I32_MIN
    assert rm.u32_regs(0x12345678) == [0x1234, 0x5678]


def test_scaled_rounds_clamps_and_reads_nan_as_low() -> None:
    assert rm.scaled(310.25, 10, 0, 100_000) in (3102, 3103)
    assert rm.scaled(7000.0, 10, 0, rm.U16_MAX) == rm.U16_MAX
    assert rm.scaled(-3.0, 10, 0, rm.U16_MAX) == 0
    assert rm.scaled(math.nan, 1000, 0, rm.U32_MAX) == 0


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=32))
def test_ascii_round_trip(text: str) -> None:
    regs = rm.ascii_regs(text, 16)
    assert len(regs) == 16
    assert rm.regs_ascii(regs) == text


def test_ascii_for_the_plc_is_cut_padded_and_printable() -> None:
    assert rm.ascii_regs("AB", 2) == [0x4142, 0x0000]
    assert rm.ascii_regs("ABC", 2) == [0x4142, 0x4300]
    assert rm.regs_ascii(rm.ascii_regs("0123456789", 2)) == "0123"
    assert rm.regs_ascii(rm.ascii_regs("Stahl-ä", 8)) == "Stahl-??"  # ä is two UTF-8 bytes
    assert rm.ascii_regs(None, 1) == [0]


def test_ascii_from_the_plc_refuses_what_is_not_printable() -> None:
    with pytest.raises(ValueError, match="0xc3 at character 1"):
        rm.regs_ascii([0xC3A9, 0])
    with pytest.raises(ValueError, match="0x00 at character 2"):
        rm.regs_ascii([0x4100, 0x4200])  # a NUL inside: only padding at the end may be NUL
    with pytest.raises(ValueError, match="0x0a"):
        rm.regs_ascii([0x410A])
    assert rm.regs_ascii([0x2041, 0x2020]) == "A"


# --- the map itself ---------------------------------------------------------------------------


def _covered(regs: tuple[rm.Reg, ...]) -> list[int]:
    return [a for r in regs for a in range(r.address, r.address + r.regs)]


@pytest.mark.parametrize(
    "regs", [rm.INPUT_REGISTERS, rm.SLOT_REGISTERS, rm.HOLDING_REGISTERS, rm.DISCRETE_INPUTS, rm.COILS]
)
def test_no_two_entries_share_a_register(regs: tuple[rm.Reg, ...]) -> None:
    covered = _covered(regs)
    assert len(covered) == len(set(covered))
    assert len({r.name for r in regs}) == len(regs)


def test_the_blocks_fit_where_the_map_says() -> None:
    assert max(_covered(rm.INPUT_REGISTERS)) < rm.RING_BASE
    assert sorted(_covered(rm.SLOT_REGISTERS)) == list(range(rm.SLOT_SIZE))
    assert sorted(_covered(rm.HOLDING_REGISTERS)) == list(range(rm.HR_BASE, rm.HR_BASE + rm.HR_SIZE))
    assert max(_covered(rm.DISCRETE_INPUTS)) < rm.BITS
    # Input and holding addresses never overlap: a PLC reading with FC3 where FC4 is meant gets
    # exception 02 instead of plausible numbers.
    assert rm.input_size(200) <= rm.HR_BASE  # 200: the largest bridge.modbus.ring_size


def test_documentation_tables_are_the_map() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for regs, base in (
        (rm.INPUT_REGISTERS, 30001),
        (rm.SLOT_REGISTERS, None),
        (rm.HOLDING_REGISTERS, 40001),
        (rm.DISCRETE_INPUTS, 10001),
        (rm.COILS, 1),
    ):
        assert rm.markdown_table(regs, ref_base=base) in doc


# --- ring ---------------------------------------------------------------------------------------


def test_slot_of_seq_s_is_s_minus_1_mod_ring() -> None:
    assert rm.slot_address(1, 32) == rm.RING_BASE
    assert rm.slot_address(32, 32) == rm.RING_BASE + 31 * rm.SLOT_SIZE
    assert rm.slot_address(33, 32) == rm.RING_BASE
    assert rm.slot_address(40, 32) == rm.RING_BASE + 7 * rm.SLOT_SIZE
    assert rm.slot_address(200, 200) + rm.SLOT_SIZE == rm.input_size(200)
    with pytest.raises(ValueError):
        rm.slot_address(0, 32)


def test_slot_round_trip() -> None:
    d = make_defect(
        41,
        md_m=1234.5674,
        cd_mm=-12.34,
        reject_in_m=-0.25,
        defect_class="scratch",
        side="bottom",
        class_confidence=0.87,
    )
    s = rm.decode_slot(rm.encode_slot(d, camera=3, klass=2, age_ms=48.6))
    assert s == rm.Slot(
        seq=41,
        camera=3,
        side=2,
        md_mm=1234567,
        cd_mm=-12.3,
        length_mm=14.0,
        width_mm=6.5,
        area_mm2=71.0,
        score=3.25,
        threshold=1.5,
        klass=2,
        decision=1,
        reject_in_mm=-250,
        age_ms=49,
        class_confidence=0.87,
    )


def test_slot_values_out_of_range_clamp() -> None:
    d = make_defect(2, length_mm=9000.0, width_mm=-1.0, area_mm2=1e12, score=-0.5)
    s = rm.decode_slot(rm.encode_slot(d, camera=0, klass=0, age_ms=1e9))
    assert (s.length_mm, s.width_mm, s.area_mm2, s.score) == (6553.5, 0.0, rm.U32_MAX / 10, 0.0)
    assert (s.age_ms, s.class_confidence) == (rm.U16_MAX, None)
    assert s.decision == 0
    with pytest.raises(ValueError, match="24 registers"):
        rm.decode_slot([0] * 23)


@pytest.mark.parametrize(
    ("last", "newest", "ring", "reads", "missed"),
    [
        (0, 0, 32, [], 0),
        (5, 5, 32, [], 0),
        (0, 3, 32, [1, 2, 3], 0),
        (0, 40, 32, list(range(9, 41)), 8),
        (32, 40, 32, list(range(33, 41)), 0),
        (10, 100, 4, [97, 98, 99, 100], 86),
        (7, 0, 32, [], 0),  # the bridge restarted, nothing new yet
        (7, 3, 32, [1, 2, 3], 0),  # its numbering started again
        (900, 40, 32, list(range(9, 41)), 8),
    ],
)
def test_ring_reads(last: int, newest: int, ring: int, reads: list[int], missed: int) -> None:
    assert rm.ring_reads(last, newest, ring) == (reads, missed)


def test_ring_header_oldest() -> None:
    assert rm.ring_registers(0, 32) == [(rm.IR_NEWEST_SEQ, [0, 0]), (rm.IR_OLDEST_SEQ, [0, 0])]
    assert rm.ring_registers(5, 32)[1] == (rm.IR_OLDEST_SEQ, [0, 1])
    assert rm.ring_registers(40, 32)[1] == (rm.IR_OLDEST_SEQ, [0, 9])


# --- status, reject, bits -----------------------------------------------------------------------


def test_status_registers() -> None:
    img = [0] * rm.input_size(4)
    s = make_status(7, state="drift", drops={"mqtt": 3, "opcua": 2})
    rm.apply(img, rm.status_registers(s, heartbeat=70_001, newest_seq=9))
    assert img[rm.IR_HEARTBEAT] == 70_001 % 65536
    assert img[rm.IR_LINE_STATE] == 3
    assert (img[rm.IR_CAMERAS], img[rm.IR_CAMERAS_ONLINE]) == (1, 1)
    assert rm.regs_u32(img[rm.IR_DEFECTS : rm.IR_DEFECTS + 2]) == 9  # newest beats a lagging status
    assert rm.regs_u32(img[rm.IR_FRAMES : rm.IR_FRAMES + 2]) == 107
    assert rm.regs_u32(img[rm.IR_BRIDGE_DROPS : rm.IR_BRIDGE_DROPS + 2]) == 5
    assert rm.regs_ascii(img[rm.IR_COIL_ID : rm.IR_COIL_ID + rm.COIL_ID_REGS]) == "24-118734"
    assert rm.regs_ascii(img[rm.IR_RECIPE : rm.IR_RECIPE + rm.RECIPE_REGS]) == "DC04"
    rm.apply(img, rm.status_registers(replace(s, state="bogus", coil_id=None), heartbeat=1, newest_seq=0))
    assert img[rm.IR_LINE_STATE] == 0
    assert rm.regs_ascii(img[rm.IR_COIL_ID : rm.IR_COIL_ID + rm.COIL_ID_REGS]) == ""


def test_reject_registers() -> None:
    img = [0] * rm.input_size(4)
    rm.apply(img, rm.reject_registers(3, make_defect(5, md_m=100.25, reject_in_m=3.2), age_ms=48.6))
    assert rm.regs_u32(img[rm.IR_REJECT_COUNT : rm.IR_REJECT_COUNT + 2]) == 3
    assert rm.regs_u32(img[rm.IR_REJECT_SEQ : rm.IR_REJECT_SEQ + 2]) == 5
    assert rm.regs_i32(img[rm.IR_REJECT_IN_MM : rm.IR_REJECT_IN_MM + 2]) == 3200
    assert rm.regs_i32(img[rm.IR_REJECT_MD_MM : rm.IR_REJECT_MD_MM + 2]) == 100_250
    assert img[rm.IR_REJECT_AGE_MS] == 49


def test_discrete_inputs() -> None:
    running = rm.STATE_CODES["running"]
    assert rm.bits_register(rm.discrete_inputs(reject=True, state_code=running, busy=False)) == 0b0011
    assert rm.bits_register(rm.discrete_inputs(reject=False, state_code=1, busy=True)) == 0b1000
    for state in ("unknown", "drift", "camera_offline", "stopped"):
        on = rm.discrete_inputs(reject=False, state_code=rm.STATE_CODES[state], busy=False)
        assert on == [rm.DI_ALARM]


def test_check_read() -> None:
    rm.check_read("ir", 0, 125, ring_size=32)
    rm.check_read("ir", rm.input_size(32) - 1, 1, ring_size=32)
    rm.check_read("hr", rm.HR_BASE, rm.HR_SIZE, ring_size=32)
    rm.check_read("bits", 0, 16, ring_size=32)
    for space, address, count in (
        ("ir", rm.input_size(32) - 1, 2),
        ("hr", 0, 1),
        ("hr", rm.HR_BASE + rm.HR_SIZE - 1, 2),
        ("bits", 15, 2),
    ):
        with pytest.raises(rm.RefusedError) as e:
            rm.check_read(space, address, count, ring_size=32)
        assert e.value.code == rm.ILLEGAL_DATA_ADDRESS


# --- holding registers: what the PLC may write ---------------------------------------------------


def test_holding_write_of_every_field() -> None:
    block = rm.apply_holding_write(EMPTY, rm.HR_COIL_ID, rm.ascii_regs("24-118734", rm.COIL_ID_REGS))
    block = rm.apply_holding_write(block, rm.HR_GRADE, rm.ascii_regs("DC04", rm.GRADE_REGS))
    block = rm.apply_holding_write(block, rm.HR_RECIPE, rm.ascii_regs("DC01", rm.RECIPE_REGS))
    block = rm.apply_holding_write(block, rm.HR_WIDTH_MM, [1250, 800, 3000, 17, 1])
    f = rm.decode_holding(block)
    assert f == rm.PlcFields("24-118734", "DC04", "DC01", 1250, 800, 3000, 17, 1)
    assert EMPTY == [0] * rm.HR_SIZE  # the input block is never changed in place


@pytest.mark.parametrize(
    ("address", "values", "code", "match"),
    [
        (rm.HR_BASE - 1, [1], rm.ILLEGAL_DATA_ADDRESS, "only 5000..5036"),
        (rm.HR_COMMAND, [1, 2], rm.ILLEGAL_DATA_ADDRESS, "5036..5037"),
        (rm.IR_HEARTBEAT, [1], rm.ILLEGAL_DATA_ADDRESS, "writable"),
        (rm.HR_WIDTH_MM, [0], rm.ILLEGAL_DATA_VALUE, "width_mm: 0 outside 1..5000"),
        (rm.HR_WIDTH_MM, [5001], rm.ILLEGAL_DATA_VALUE, "width_mm: 5001"),
        (rm.HR_THICKNESS_UM, [30001], rm.ILLEGAL_DATA_VALUE, "thickness_um"),
        (rm.HR_LENGTH_M, [0], rm.ILLEGAL_DATA_VALUE, "length_m"),
        (rm.HR_COMMAND, [4], rm.ILLEGAL_DATA_VALUE, "command: 4 outside 0..3"),
        (rm.HR_COIL_ID, [0xC3A9], rm.ILLEGAL_DATA_VALUE, "coil_id: byte 0xc3"),
        (rm.HR_GRADE + 1, [0x4142], rm.ILLEGAL_DATA_VALUE, "grade: byte 0x00"),  # NULs before text
        (rm.HR_RECIPE, [0x0941], rm.ILLEGAL_DATA_VALUE, "recipe: byte 0x09"),
        (rm.HR_COIL_ID, [*rm.ascii_regs("C1", 16), *rm.ascii_regs("DC04", 8), 0x41FF], rm.ILLEGAL_DATA_VALUE, "recipe"),
        (rm.HR_WIDTH_MM, [70_000], rm.ILLEGAL_DATA_VALUE, "not a 16-bit value"),
    ],
)
def test_holding_write_refusals(address: int, values: list[int], code: int, match: str) -> None:
    with pytest.raises(rm.RefusedError, match=match) as e:
        rm.apply_holding_write(EMPTY, address, values)
    assert e.value.code == code


def test_a_write_is_checked_whole_and_a_partial_text_write_merges() -> None:
    block = rm.apply_holding_write(EMPTY, rm.HR_COIL_ID, rm.ascii_regs("ABCDEFGH", 4))
    block = rm.apply_holding_write(block, rm.HR_COIL_ID + 4, rm.ascii_regs("IJ", 1))
    assert rm.decode_holding(block).coil_id == "ABCDEFGHIJ"
    with pytest.raises(rm.RefusedError):  # a good coil id with a bad width: neither is taken
        rm.apply_holding_write(block, rm.HR_COIL_ID, [*rm.ascii_regs("X", 16), *[0] * 16, 0])
    assert rm.decode_holding(block).coil_id == "ABCDEFGHIJ"
    zero_width_untouched = rm.apply_holding_write(EMPTY, rm.HR_COMMAND_SEQ, [5])
    assert hr(zero_width_untouched, rm.HR_WIDTH_MM) == [0]  # never written: no range check on it


def _fields(**over: object) -> rm.PlcFields:
    base = rm.PlcFields("24-118734", "DC04", "DC01", 1250, 800, 3000, 1, rm.CMD_COIL_START)
    return replace(base, **over)  # type: ignore[arg-type]


def test_plan_command() -> None:
    assert rm.plan_command(_fields()) == rm.CommandCall(
        "coil_start", coil_id="24-118734", grade="DC04", width_mm=1250.0, thickness_mm=0.8, length_m=3000.0
    )
    assert rm.plan_command(_fields(width_mm=0, thickness_um=0, length_m=0)) == rm.CommandCall(
        "coil_start", coil_id="24-118734", grade="DC04"
    )
    assert rm.plan_command(_fields(command=rm.CMD_COIL_END)) == rm.CommandCall("coil_end", coil_id="24-118734")
    assert rm.plan_command(_fields(command=rm.CMD_SELECT_RECIPE)) == rm.CommandCall("select_recipe", recipe="DC01")
    assert rm.plan_command(_fields(coil_id="")) == rm.ERR_NO_COIL_ID
    assert rm.plan_command(_fields(command=rm.CMD_COIL_END, coil_id="")) == rm.ERR_NO_COIL_ID
    assert rm.plan_command(_fields(grade="")) == rm.ERR_NO_GRADE
    assert rm.plan_command(_fields(command=rm.CMD_SELECT_RECIPE, recipe="")) == rm.ERR_NO_RECIPE
    with pytest.raises(ValueError):
        rm.plan_command(_fields(command=rm.CMD_NONE))


def test_acks() -> None:
    img = [0] * rm.input_size(1)
    rm.apply(img, rm.result_ack(70_000, CommandResult(ok=False, error="unknown grade 'X99'")))
    assert img[rm.IR_CMD_ACK_SEQ : rm.IR_CMD_ERROR + 1] == [70_000 % 65536, rm.RESULT_REFUSED, rm.ERR_LINE_REFUSED]
    text = rm.regs_ascii(img[rm.IR_CMD_ERROR_TEXT : rm.IR_CMD_ERROR_TEXT + rm.ERROR_TEXT_REGS])
    assert text == "unknown grade 'X99'"
    rm.apply(img, rm.ack_registers(3, result=rm.RESULT_REFUSED, error=rm.ERR_NO_GRADE))
    assert rm.regs_ascii(img[rm.IR_CMD_ERROR_TEXT : rm.IR_CMD_ERROR_TEXT + rm.ERROR_TEXT_REGS]) == "grade empty"
    rm.apply(img, rm.result_ack(4, CommandResult(ok=True)))
    assert img[rm.IR_CMD_ACK_SEQ : rm.IR_CMD_ERROR + 1] == [4, rm.RESULT_OK, rm.ERR_NONE]
    assert rm.regs_ascii(img[rm.IR_CMD_ERROR_TEXT : rm.IR_CMD_ERROR_TEXT + rm.ERROR_TEXT_REGS]) == ""
