"""Coil tracking in the daemon: coils placed by strip line, bad sequences refused or recovered,
events in strip order, state resumed after a restart, the schedule file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.coil.tracking import CoilError, CoilTracker, read_schedule

GRADES = ("DC01", "DC04")


def tracker(**kw: object) -> CoilTracker:
    return CoilTracker(mm_per_line=0.5, grades=GRADES, **kw)  # type: ignore[arg-type]


def test_md_restarts_at_each_coil_head() -> None:
    t = tracker()
    assert t.locate(100) == (None, 0.05)
    t.start(coil_id="A1", grade="DC01", head_line=1000, width_mm=1250.0)
    t.end(tail_line=3000)
    t.start(coil_id="A2", grade="DC04", head_line=3000)
    assert t.locate(999) == (None, pytest.approx(0.4995))
    assert t.locate(1000) == ("A1", 0.0)
    assert t.locate(2999) == ("A1", pytest.approx(0.9995))
    assert t.locate(3000) == ("A2", 0.0)
    assert t.locate(10_000) == ("A2", pytest.approx(3.5))


def test_command_without_line_takes_the_camera_position() -> None:
    t = tracker()
    t.camera_line = 5120
    assert t.start(coil_id="B", grade="DC01")["coil"]["head_line"] == 5120
    t.camera_line = 9000
    assert t.end(coil_id="B")["coil"]["tail_line"] == 9000


@pytest.mark.parametrize(
    ("setup", "call", "message"),
    [
        ([], lambda t: t.end(), "no coil is open"),
        ([], lambda t: t.start(coil_id="X", grade="S355"), "unknown grade 'S355'"),
        ([], lambda t: t.start(coil_id="", grade="DC01"), "coil_id must be"),
        ([], lambda t: t.start(coil_id="X", grade="DC01", head_line=-5), "head_line must be"),
        ([], lambda t: t.start(coil_id="X", grade="DC01", width_mm="wide"), "width_mm must be"),
        ([("C", 100)], lambda t: t.end(coil_id="D", tail_line=200), "'D' is not the open coil"),
        ([("C", 100)], lambda t: t.end(tail_line=50), "not after the coil's head_line"),
        ([("C", 100)], lambda t: t.start(coil_id="D", grade="DC01", head_line=100), "not after the head"),
        ([("C", 100)], lambda t: t.start(coil_id="C", grade="DC04", head_line=300), "open with another grade"),
    ],
)
def test_bad_sequences_are_refused_with_one_line(setup, call, message) -> None:  # type: ignore[no-untyped-def]
    t = tracker()
    for cid, head in setup:
        t.start(coil_id=cid, grade="DC01", head_line=head)
    before = t.status()
    with pytest.raises(CoilError, match=message):
        call(t)
    assert t.status() == before  # nothing changed, nothing lost


def test_a_start_while_a_coil_is_open_ends_it_at_the_new_head() -> None:
    t = tracker()
    t.start(coil_id="C1", grade="DC01", head_line=100)
    reply = t.start(coil_id="C2", grade="DC01", head_line=900)
    assert reply["ended"]["coil_id"] == "C1" and reply["ended"]["tail_line"] == 900
    assert "had no coil_end" in reply["warning"]
    assert t.locate(899)[0] == "C1" and t.locate(900)[0] == "C2"
    events = t.events_through(1000)
    assert [(e.event, e.coil.coil_id, e.line) for e in events] == [
        ("start", "C1", 100),
        ("end", "C1", 900),
        ("start", "C2", 900),
    ]
    assert events[1].note is not None and "ended by the start of coil 'C2'" in events[1].note


def test_an_ended_coil_cannot_start_again_but_a_retried_start_is_harmless() -> None:
    t = tracker()
    t.start(coil_id="C1", grade="DC01", head_line=100)
    assert t.start(coil_id="C1", grade="DC01", head_line=100)["repeated"] is True
    t.end(tail_line=500)
    with pytest.raises(CoilError, match="has ended"):
        t.start(coil_id="C1", grade="DC01", head_line=800)
    with pytest.raises(CoilError, match="inside the last coil"):
        t.start(coil_id="C2", grade="DC01", head_line=400)


def test_events_are_sent_once_as_the_lines_pass() -> None:
    t = tracker()
    t.start(coil_id="C1", grade="DC01", head_line=1000)
    assert t.events_through(999) == []
    (start,) = t.events_through(1500)
    assert start.event == "start" and start.body(mm_per_line=0.5)["strip_md_m"] == 0.5
    assert t.events_through(1600) == []
    t.end(tail_line=1700)
    assert [e.event for e in t.events_through(1699)] == []
    assert [e.event for e in t.events_through(1700)] == ["end"]


def test_state_is_resumed_after_a_restart() -> None:
    saved: list[str] = []
    t = tracker(save=saved.append)
    t.start(coil_id="C1", grade="DC01", head_line=100, thickness_mm=0.8)
    t.events_through(200)
    again = tracker(saved=saved[-1])
    assert again.locate(150) == ("C1", 0.025)
    assert again.events_through(300) == []  # its start was already sent before the restart
    again.end(tail_line=400)
    assert again.coil("C1") is not None and again.coil("C1").thickness_mm == 0.8  # type: ignore[union-attr]
    with pytest.raises(CoilError, match="unreadable"):
        tracker(saved=json.dumps([{"info": {}}]))


def test_schedule_file_places_coils_and_refuses_commands(tmp_path: Path) -> None:
    f = tmp_path / "coils.csv"
    f.write_text(
        "coil_id,grade,head_m,length_m,width_mm,thickness_mm\nK1,DC01,10,150,1250,0.7\nK2,DC04,160,150,,\n",
        encoding="utf-8",
    )
    schedule = read_schedule(f, mm_per_line=0.5)
    assert [(c.coil_id, c.head_line, c.tail_line, c.width_mm) for c in schedule] == [
        ("K1", 20_000, 320_000, 1250.0),
        ("K2", 320_000, 620_000, None),
    ]
    t = tracker(schedule=schedule)
    assert t.locate(320_000 + 2000) == ("K2", 1.0)
    with pytest.raises(CoilError, match="coil_schedule"):
        t.start(coil_id="X", grade="DC01")
    assert [(e.event, e.coil.coil_id) for e in t.events_through(320_000)] == [
        ("start", "K1"),
        ("end", "K1"),
        ("start", "K2"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no coils"),
        ("coil_id,grade\nK1,DC01\n", "lacks columns"),
        ("coil_id,grade,head_m,length_m\nK1,DC01,ten,5\n", "line 2"),
        ("coil_id,grade,head_m,length_m\nK1,DC01,0,-5\n", "length_m > 0"),
    ],
)
def test_bad_schedule_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "coils.csv"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(CoilError, match=message):
        read_schedule(f, mm_per_line=0.5)


def test_schedule_with_an_unknown_grade_or_overlap_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "coils.csv"
    f.write_text("coil_id,grade,head_m,length_m\nK1,X99,0,10\n", encoding="utf-8")
    with pytest.raises(CoilError, match="unknown grade"):
        tracker(schedule=read_schedule(f, mm_per_line=0.5))
    f.write_text("coil_id,grade,head_m,length_m\nK1,DC01,0,10\nK2,DC01,5,10\n", encoding="utf-8")
    with pytest.raises(CoilError, match="before the previous coil ends"):
        tracker(schedule=read_schedule(f, mm_per_line=0.5))
