"""The coil service behind a real proxy, fed by two cameras that speak the daemon's protocol
(real PUB sockets, real alert journals answering ``replay`` on real REP sockets): overlap
merge, gap fill from the journal, duplicates, uninspected stretches, closing, the report and
the service's own messages; Level 2 commands forwarded to the cameras."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from pipeline.coil.proxy import StreamProxy
from pipeline.coil.records import CoilRecords
from pipeline.coil.service import CoilService
from pipeline.config import CoilConfig
from pipeline.transport.journal import AlertJournal
from pipeline.transport.publish import Publisher

MM_LINE = 2.0
HEAD, TAIL = 1000, 51_000  # a 100 m coil


class FakeCamera:
    """The daemon's side of the protocol: alerts numbered by a real journal, then published;
    frames and coil events; a REP socket answering replay, coil and coil_start/coil_end."""

    def __init__(self, ctx: zmq.Context, tmp: Path, cid: str, side: str, cd_offset: float) -> None:
        self.cid, self.side, self.cd_offset = cid, side, cd_offset
        self.journal = AlertJournal(path=tmp / f"{cid}.sqlite", max_rows=10_000, max_age_s=1e6)
        self.pub = Publisher(context=ctx, endpoint="tcp://127.0.0.1:*", camera_id=cid, send_hwm=10_000)
        self.rep = ctx.socket(zmq.REP)
        self.rep.setsockopt(zmq.LINGER, 0)
        self.rep.bind("tcp://127.0.0.1:*")
        self.control = self.rep.getsockopt_string(zmq.LAST_ENDPOINT)
        self.requests: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.rep, zmq.POLLIN)
        while not self.stop.is_set():
            if not poller.poll(50):
                continue
            req = json.loads(self.rep.recv())
            self.requests.append(req)
            if req["cmd"] == "replay":
                alerts = self.journal.after(req["after"], 100)
                reply = {"ok": True, "alerts": alerts, "last_seq": self.journal.last_seq, "pruned": False}
                reply["journal"] = self.journal.journal_id
            elif req["cmd"] == "coil_start":
                coil = {k: req.get(k) for k in ("coil_id", "grade", "width_mm", "thickness_mm", "length_m")}
                reply = {"ok": True, "coil": {**coil, "head_line": req.get("head_line", 0), "tail_line": None}}
            else:
                reply = {"ok": False, "error": "not in this fake"}
            self.rep.send_json(reply)

    def coil_event(self, event: str, *, tail: int | None = None) -> None:
        body = {"event": event, "coil_id": "C1", "grade": "DC01", "head_line": HEAD, "tail_line": tail}
        body |= {"width_mm": 1250.0, "thickness_mm": 0.7, "length_m": 100.0, "line": HEAD if event == "start" else tail}
        self.pub.send("coil", {**body, "mm_per_line": MM_LINE, "frame_id": None, "side": self.side, "note": None})

    def frame(self, first: int, lines: int = 500) -> None:
        body = {"frame_id": first, "first_line": first, "valid_rows": [0, lines], "mm_per_line": MM_LINE}
        self.pub.send("frame", {**body, "coil_id": "C1", "side": self.side})

    def alert(self, line: int, col_mm: float, *, send: bool = True, score: float = 5.0, klass: str = "unknown") -> int:
        h = self.pub.stamp(
            "alert",
            {
                "frame_id": 0,
                "coil_id": "C1",
                "side": self.side,
                "line": line,
                "md_m": (line - HEAD) * MM_LINE / 1000,
                "cd_mm": self.cd_offset + col_mm,
                "length_mm": 8.0,
                "width_mm": 8.0,
                "area_mm2": 40.0,
                "max_score": score,
                "thumbnail_png": None,
                "journal": self.journal.journal_id,
                "class": klass,
                "class_confidence": None if klass == "unknown" else 0.8,
            },
        )
        (seq,) = self.journal.append([h])
        if send:
            self.pub.send_stamped(h)
        else:
            self.pub.seq["alert"] += 1  # published while no one listened: only the journal has it
        return seq

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.rep.close(0)
        self.pub.close()
        self.journal.close()


@pytest.fixture
def line(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ctx = zmq.Context()
    cams = {
        "cam0": FakeCamera(ctx, tmp_path, "cam0", "top", 0.0),
        "cam1": FakeCamera(ctx, tmp_path, "cam1", "top", 600.0),
    }
    proxy = StreamProxy(context=ctx, cameras=[c.pub.endpoint for c in cams.values()], endpoint="tcp://127.0.0.1:*")
    proxy.start()
    cfg = CoilConfig.model_validate(
        {
            "cameras": {
                cid: {"pub": c.pub.endpoint, "control": c.control, "side": "top", "cd_from_mm": c.cd_offset}
                | {"cd_to_mm": c.cd_offset + 650.0}
                for cid, c in cams.items()
            },
            "proxy_endpoint": proxy.endpoint,
            "control_endpoint": "tcp://127.0.0.1:*",
            "pub_endpoint": "tcp://127.0.0.1:*",
            "db": {"path": tmp_path / "records" / "coils.sqlite", "synchronous": "NORMAL"},
            "reports_dir": tmp_path / "reports",
            "camera_timeout_s": 2.0,
        }
    )
    records = CoilRecords(path=cfg.db.path, synchronous="NORMAL")
    service = CoilService(cfg=cfg, records=records, context=ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 100)
    sub.connect(service.publisher.endpoint)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(0.8)  # subscriptions travel upstream through the proxy to both cameras
    try:
        yield {"cams": cams, "service": service, "records": records, "sub": sub, "cfg": cfg, "ctx": ctx}
    finally:
        stop.set()
        thread.join(5)
        service.close()
        records.close()
        sub.close(0)
        proxy.stop()
        for c in cams.values():
            c.close()
        ctx.term()


def _until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_two_cameras_become_one_coil_record_with_its_report(line: dict[str, Any]) -> None:
    cam0, cam1 = line["cams"]["cam0"], line["cams"]["cam1"]
    records: CoilRecords = line["records"]
    for c in (cam0, cam1):
        c.coil_event("start", tail=TAIL)
    _until(lambda: records.coil("C1") is not None)
    # The same pit seen by both cameras in their 50 mm overlap: one defect.
    cam0.alert(HEAD + 5000, 620.0)
    cam1.alert(HEAD + 5001, 22.0)
    # cam1 publishes one alert nobody hears: the next live one shows the gap, the journal fills it.
    missed = cam1.alert(HEAD + 9000, 300.0, send=False)
    cam1.alert(HEAD + 12_000, 300.0, klass="pit")  # an operator taught the daemon pits
    late = cam1.journal.after(missed - 1, 1)[0]  # a duplicate of the missed one, arriving late
    cam1.pub._sock.send_multipart([b"alert", json.dumps(late).encode()])
    for first in range(HEAD, TAIL + 500, 500):
        cam0.frame(first)
        if not 20_000 <= first < 30_000:  # cam1 is down for 20 m
            cam1.frame(first)
    for c in (cam0, cam1):
        c.coil_event("end", tail=TAIL)
        c.frame(TAIL + 500)
    _until(lambda: records.coil("C1") is not None and records.coil("C1").state == "closed", timeout=20)  # type: ignore[union-attr]
    defects = records.defects("C1")
    assert len(defects) == 3
    merged = next(d for d in defects if len(d.cameras) == 2)
    assert set(merged.cameras) == {"cam0", "cam1"} and merged.md_m == pytest.approx(10.0, abs=0.01)
    assert {round(d.md_m) for d in defects} == {10, 18, 24}
    assert {round(d.md_m): d.klass for d in defects} == {10: None, 18: None, 24: "pit"}  # "unknown" is no class
    assert records.cursor(f"cam1@{cam1.journal.journal_id}") == 3 and line["service"].counts["duplicates"] >= 1
    (gap,) = records.uninspected("C1")
    assert gap.camera == "cam1" and (gap.md_from_m, gap.md_to_m) == (pytest.approx(38.0), pytest.approx(58.0))
    assert (gap.cd_from_mm, gap.cd_to_mm) == (600.0, 1250.0)
    rec = records.coil("C1")
    assert rec is not None and rec.grading is not None and rec.length_m == pytest.approx(100.0)
    report = line["cfg"].reports_dir / "C1"
    _until(lambda: (report / "report.json").is_file(), timeout=20)  # written right after the record closes
    assert {p.name for p in report.iterdir()} >= {"report.pdf", "map.png", "report.json"}
    topics = []
    sub = line["sub"]
    end = time.monotonic() + 3
    while time.monotonic() < end and "coil_closed" not in topics:
        with contextlib.suppress(zmq.Again):
            topics.append(sub.recv_multipart()[0].decode())
    assert "coil_closed" in topics


def test_level2_commands_are_forwarded_and_checked(line: dict[str, Any]) -> None:
    ctx, service = line["ctx"], line["service"]
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 10_000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(service.control_endpoint)
    try:
        req.send_json({"cmd": "coil_start", "coil_id": "C9", "grade": "X1"})
        assert "unknown grade" in req.recv_json()["error"]
        assert not any(r["cmd"] == "coil_start" for c in line["cams"].values() for r in c.requests)
        req.send_json({"cmd": "coil_start", "coil_id": "C9", "grade": "DC04", "head_line": 7000})
        reply = req.recv_json()
        assert reply["ok"] is True and set(reply["cameras"]) == {"cam0", "cam1"}
        assert line["records"].coil("C9").info.head_line == 7000
        req.send(b"not json")
        assert req.recv_json()["ok"] is False
        req.send_json({"cmd": "status"})
        status = req.recv_json()
        assert status["ok"] is True and "C9" in status["open_coils"]
    finally:
        req.close(0)


def test_a_camera_with_a_new_journal_is_not_taken_for_replays(line: dict[str, Any], tmp_path: Path) -> None:
    cam0 = line["cams"]["cam0"]
    records: CoilRecords = line["records"]
    cam0.coil_event("start", tail=TAIL)
    _until(lambda: records.coil("C1") is not None)
    for k in range(3):
        cam0.alert(HEAD + 2000 + 1000 * k, 100.0)
    _until(lambda: len(records.defects("C1")) == 3)
    # The daemon's journal is deleted and the daemon restarted: its numbers start at 1 again.
    cam0.journal.close()
    cam0.journal = AlertJournal(path=tmp_path / "cam0-new.sqlite", max_rows=10_000, max_age_s=1e6)
    cam0.pub.seq["alert"] = 0
    cam0.alert(HEAD + 9000, 100.0)
    _until(lambda: len(records.defects("C1")) == 4)
    assert records.cursor(f"cam0@{cam0.journal.journal_id}") == 1
