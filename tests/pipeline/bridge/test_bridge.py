"""The bridge core: daemon alerts to every protocol once, in order, across restarts, gaps, a
daemon journal begun again and a protocol too slow for its queue (real ZeroMQ, real journals)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

from pipeline.bridge.core import Bridge, camera_status, line_status, to_defect
from pipeline.bridge.journal import BridgeJournal
from pipeline.bridge.model import LineStatus, NotDeliveredError, PlantCoil, PlantDefect
from pipeline.config import BridgeCameraConfig, RejectRuleConfig
from tests.pipeline.bridge.conftest import make_defect
from tests.pipeline.bridge.line import FakeLine


class RecordingSink:
    """A protocol that records what it is given; ``delay_s`` makes it slow; while ``down`` is set
    it cannot take defects (a broker away)."""

    def __init__(self, name: str, delay_s: float = 0.0) -> None:
        self.name, self.delay_s = name, delay_s
        self.down = threading.Event()
        self.refused = 0
        self.defects: list[PlantDefect] = []
        self.statuses: list[LineStatus] = []
        self.coils: list[PlantCoil] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def defect(self, d: PlantDefect) -> None:
        if self.down.is_set():
            self.refused += 1
            raise NotDeliveredError("broker away")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.defects.append(d)

    async def status(self, s: LineStatus) -> None:
        self.statuses.append(s)

    async def coil(self, c: PlantCoil) -> None:
        self.coils.append(c)

    async def stop(self) -> None:
        self.stopped = True

    def counters(self) -> dict[str, int]:
        return {"recorded": len(self.defects)}


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture
def line(tmp_path: Path, ctx: zmq.Context) -> Iterator[FakeLine]:
    fl = FakeLine(tmp=tmp_path, context=ctx)
    yield fl
    fl.close()


@contextmanager
def running(bridge: Bridge) -> Iterator[Bridge]:
    """The bridge on its own asyncio loop in a thread; stopped (drained) on exit."""
    box: dict[str, Any] = {}

    def main() -> None:
        async def go() -> None:
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            await bridge.run(box["stop"])

        try:
            asyncio.run(go())
        except BaseException as err:
            box["error"] = err

    t = threading.Thread(target=main, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not (box.get("loop") and bridge.ready.is_set()) and "error" not in box:
        assert time.monotonic() < deadline, "bridge did not start"
        time.sleep(0.01)
    try:
        yield bridge
    finally:
        if "loop" in box:
            box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(20)
        assert not t.is_alive()
        assert "error" not in box, box.get("error")


def make_bridge(line: FakeLine, journal: BridgeJournal, sinks: list[Any], ctx: zmq.Context, **kw: Any) -> Bridge:
    args: dict[str, Any] = {
        "cameras": {"cam0": BridgeCameraConfig(**line.endpoints)},
        "coil_service": None,
        "sinks": sinks,
        "journal": journal,
        "reject": RejectRuleConfig(min_area_mm2=30.0, distance_m=4.0),
        "queue_size": 100,
        "replay_timeout_s": 2.0,
        "context": ctx,
        "heartbeat_s": 0.2,
        **kw,
    }
    return Bridge(**args)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def subscribed(line: FakeLine, bridge: Bridge) -> None:
    """Heartbeats until the bridge's subscription is live (PUB drops what a subscriber that has
    not joined yet would have got: those alerts come from the journal instead)."""

    def joined() -> bool:
        line.heartbeat()
        time.sleep(0.02)
        return bridge.status().cameras[0].state == "running"

    wait_for(joined, what="the bridge's subscription")


# --- pure ---------------------------------------------------------------------------------


def test_to_defect_decides_reject_and_the_distance_left() -> None:
    h = {
        "seq": 7,
        "journal": "j",
        "coil_id": "C9",
        "side": "bottom",
        "md_m": 10.0,
        "strip_md_m": 110.0,
        "capture_md_m": 10.75,
        "cd_mm": 300.0,
        "length_mm": 5.0,
        "width_mm": 2.0,
        "area_mm2": 40.0,
        "max_score": 3.0,
        "threshold": 1.5,
        "capture_time": 1.0,
        "publish_time": 1.1,
    }
    rule = RejectRuleConfig(min_area_mm2=30.0, min_score_ratio=1.5, distance_m=4.0)
    d = to_defect(h, 3, camera_id="cam2", reject=rule)
    assert (d.bridge_seq, d.camera_id, d.seq, d.side, d.coil_id) == (3, "cam2", 7, "bottom", "C9")
    assert d.decision == "reject"
    assert d.reject_in_m == pytest.approx(4.0 - 0.75)
    assert d.defect_class == "unknown"
    assert to_defect({**h, "area_mm2": 20.0}, 4, camera_id="cam2", reject=rule).decision == "accept"
    assert to_defect({**h, "max_score": 2.0}, 5, camera_id="cam2", reject=rule).decision == "accept"


def test_line_state_is_the_worst_camera_and_silence_is_unknown() -> None:
    now = 1000.0
    ok = camera_status("a", {"state": "running", "publish_time": now, "camera": {"online": True}}, now=now, stale_s=3)
    off = camera_status("b", {"state": "camera_offline", "publish_time": now}, now=now, stale_s=3)
    old = camera_status("c", {"state": "running", "publish_time": now - 10}, now=now, stale_s=3)
    assert (ok.state, ok.camera_online, off.state, old.state) == ("running", True, "camera_offline", "unknown")
    assert camera_status("d", None, now=now, stale_s=3).state == "unknown"
    assert line_status([ok, off], heartbeat=1, defects=0, drops={}, now=now).state == "camera_offline"
    assert line_status([ok, old, off], heartbeat=1, defects=0, drops={}, now=now).state == "unknown"
    assert line_status([ok], heartbeat=1, defects=0, drops={}, now=now).state == "running"


def test_journal_numbers_once_and_restarts_a_camera_on_a_new_journal(tmp_path: Path) -> None:
    j = BridgeJournal(path=tmp_path / "b.sqlite", keep=1000)
    build = lambda s: make_defect(s)  # noqa: E731
    assert j.add(camera_id="c", journal="A", seq=1, build=build) is not None
    assert j.add(camera_id="c", journal="A", seq=2, build=build) is not None
    assert j.add(camera_id="c", journal="A", seq=2, build=build) is None  # taken already
    assert j.add(camera_id="c", journal="B", seq=1, build=build) is not None  # the daemon's journal begun again
    j.delivered("opcua", 2)
    j.close()
    j = BridgeJournal(path=tmp_path / "b.sqlite", keep=1000)
    assert (j.last_seq, j.camera_cursor("c"), j.sink_cursor("opcua"), j.sink_cursor("mqtt")) == (3, ("B", 1), 2, None)
    assert [d.bridge_seq for d in j.after(1)] == [2, 3]
    j.close()


def test_a_daemon_without_a_journal_is_not_taken_for_duplicates(tmp_path: Path) -> None:
    # Without a journal a daemon numbers its alerts from 1 again at every restart.
    j = BridgeJournal(path=tmp_path / "b.sqlite", keep=1000)
    taken = [j.add(camera_id="c", journal=None, seq=s, build=make_defect) for s in (1, 2, 3, 1, 2)]
    assert all(d is not None for d in taken) and j.last_seq == 5
    j.close()


def test_a_message_whose_header_is_not_an_object_is_refused() -> None:
    from pipeline.transport.publish import decode

    for header in (b"[1, 2]", b"5", b"null", b"[" * 100_000):
        with pytest.raises(ValueError):
            decode([b"alert", header])


# --- with a line --------------------------------------------------------------------------


def test_every_alert_reaches_every_protocol_once_in_order(tmp_path: Path, line: FakeLine, ctx: zmq.Context) -> None:
    journal = BridgeJournal(path=tmp_path / "bridge.sqlite", keep=1000)
    a, b = RecordingSink("a"), RecordingSink("b")
    with running(make_bridge(line, journal, [a, b], ctx)) as bridge:
        subscribed(line, bridge)
        sent = [line.alert(area_mm2=10.0 + i) for i in range(30)]
        wait_for(lambda: len(a.defects) == 30 and len(b.defects) == 30, what="30 defects")
        line.coil("start")
        line.coil("start")  # a second camera's report of the same head
        line.coil("end")
        wait_for(lambda: len(a.coils) == 2, what="coil messages")
        wait_for(lambda: any(s.state == "running" for s in a.statuses), what="a status")
    assert a.started and a.stopped
    for sink in (a, b):
        assert [d.bridge_seq for d in sink.defects] == list(range(1, 31))
        assert [d.seq for d in sink.defects] == [h["seq"] for h in sent]
    assert [d.decision for d in a.defects] == ["accept"] * 20 + ["reject"] * 10  # area >= 30 mm2
    assert [(c.kind, c.coil_id) for c in a.coils] == [("start", "C1"), ("end", "C1")]
    beats = [s.heartbeat for s in a.statuses]
    assert beats == sorted(beats) and len(set(beats)) == len(beats)
    assert a.statuses[-1].recipe == "DC04" and a.statuses[-1].cameras[0].drops == 2
    journal.close()


def test_a_restart_resumes_without_loss_or_duplicates(tmp_path: Path, line: FakeLine, ctx: zmq.Context) -> None:
    path = tmp_path / "bridge.sqlite"
    first = RecordingSink("p")
    journal = BridgeJournal(path=path, keep=1000)
    with running(make_bridge(line, journal, [first], ctx)) as bridge:
        subscribed(line, bridge)
        for _ in range(10):
            line.alert()
        wait_for(lambda: len(first.defects) == 10, what="10 defects")
    journal.close()
    for _ in range(7):
        line.alert()  # published while the bridge is down: only the daemon's journal has them
    second = RecordingSink("p")
    journal = BridgeJournal(path=path, keep=1000)
    with running(make_bridge(line, journal, [second], ctx)) as bridge:
        subscribed(line, bridge)  # its first message makes the follower fetch what it missed
        for _ in range(3):
            line.alert()
        wait_for(lambda: len(second.defects) == 10, what="7 missed + 3 live")
        time.sleep(0.3)
    assert [d.bridge_seq for d in second.defects] == list(range(11, 21))
    assert [d.seq for d in first.defects + second.defects] == list(range(1, 21))
    journal.close()


def test_a_gap_on_the_wire_and_a_new_daemon_journal_are_filled(
    tmp_path: Path, line: FakeLine, ctx: zmq.Context
) -> None:
    journal = BridgeJournal(path=tmp_path / "bridge.sqlite", keep=1000)
    sink = RecordingSink("p")
    with running(make_bridge(line, journal, [sink], ctx)) as bridge:
        subscribed(line, bridge)
        line.alert()
        line.alert(publish=False)  # lost between daemon and bridge
        line.alert(publish=False)
        line.alert()
        wait_for(lambda: len(sink.defects) == 4, what="the gap filled")
        line.restart_journal()
        line.alert(publish=False)
        line.alert()
        wait_for(lambda: len(sink.defects) == 6, what="the new journal's alerts")
        cam = bridge.counters()["followers"]["cam0"]
    assert [d.seq for d in sink.defects] == [1, 2, 3, 4, 1, 2]
    assert len({d.journal for d in sink.defects}) == 2
    assert cam["replayed"] == 3 and cam["lost"] == 0
    journal.close()


def test_a_slow_protocol_drops_and_catches_up_without_stalling_the_others(
    tmp_path: Path, line: FakeLine, ctx: zmq.Context
) -> None:
    journal = BridgeJournal(path=tmp_path / "bridge.sqlite", keep=1000)
    fast, slow = RecordingSink("fast"), RecordingSink("slow", delay_s=0.05)
    with running(make_bridge(line, journal, [fast, slow], ctx, queue_size=3)) as bridge:
        subscribed(line, bridge)
        t0 = time.monotonic()
        for _ in range(40):
            line.alert()
        wait_for(lambda: len(fast.defects) == 40, what="the fast protocol")
        fast_s = time.monotonic() - t0
        slow_then = len(slow.defects)
        wait_for(lambda: len(slow.defects) == 40, what="the slow protocol catching up")
        counts = bridge.counters()["protocols"]
    # The fast one did not wait for the slow one, which needs 40 x 50 ms.
    assert slow_then < 40 and fast_s < 40 * 0.05
    assert counts["slow"]["dropped"] > 0 and counts["slow"]["caught_up"] > 0
    assert counts["slow"]["dropped"] > counts["fast"]["dropped"]
    assert [d.bridge_seq for d in slow.defects] == list(range(1, 41))
    journal.close()


def test_a_protocol_new_to_the_bridge_starts_at_the_journal_end(
    tmp_path: Path, line: FakeLine, ctx: zmq.Context
) -> None:
    path = tmp_path / "bridge.sqlite"
    journal = BridgeJournal(path=path, keep=1000)
    old = RecordingSink("old")
    with running(make_bridge(line, journal, [old], ctx)) as bridge:
        subscribed(line, bridge)
        for _ in range(5):
            line.alert()
        wait_for(lambda: len(old.defects) == 5)
    journal.close()
    journal = BridgeJournal(path=path, keep=1000)
    new = RecordingSink("new")
    with running(make_bridge(line, journal, [new], ctx)) as bridge:
        subscribed(line, bridge)
        line.alert()
        wait_for(lambda: len(new.defects) == 1)
    assert new.defects[0].bridge_seq == 6
    journal.close()


def test_a_protocol_that_cannot_take_defects_gets_them_all_once_it_can(
    tmp_path: Path, line: FakeLine, ctx: zmq.Context
) -> None:
    journal = BridgeJournal(path=tmp_path / "bridge.sqlite", keep=1000)
    ok, away = RecordingSink("ok"), RecordingSink("away")
    with running(make_bridge(line, journal, [ok, away], ctx, queue_size=4)) as bridge:
        subscribed(line, bridge)
        line.alert()
        wait_for(lambda: len(away.defects) == 1)
        away.down.set()
        for _ in range(15):
            line.alert()
        wait_for(lambda: len(ok.defects) == 16, what="the protocol that is up")
        wait_for(lambda: away.refused >= 2, what="refusals")
        assert len(away.defects) == 1
        away.down.clear()
        wait_for(lambda: len(away.defects) == 16, what="the protocol back")
        time.sleep(0.6)
        counts = bridge.counters()["protocols"]["away"]
    assert [d.bridge_seq for d in away.defects] == list(range(1, 17))
    assert counts["retries"] == away.refused and counts["errors"] == 0
    assert journal.sink_cursor("away") == 16
    journal.close()
