"""The daemon in coil terms (real daemon, real ZeroMQ): alerts and frames carry the coil, MD
restarts at each coil head, coil events come in stream order, CD is in strip coordinates, each
alert has a thumbnail; Level 2 commands over the control socket, and a restart resumes the coil."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq

from pipeline.acquisition.sources import SyntheticSource
from pipeline.config import RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.service.daemon import Daemon
from pipeline.transport.listen import collect_run
from tests.conftest import loopback_daemon_config
from tests.pipeline.service.test_daemon import _threshold

WIDTH, FRAME, OVERLAP = 256, 768, 384
MM = 0.5


def _daemon(bundle: Path, src: SourceConfig, ctx: zmq.Context, **overrides: Any) -> tuple[Daemon, SyntheticSource]:
    cfg = loopback_daemon_config(
        bundle=bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        mm_per_px=MM,
        mm_per_line=MM,
        min_area_px=8,
        heartbeat_s=0.2,
        queue_frames=1000,
        source=src,
        **overrides,
    )
    source = SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME)
    daemon = Daemon(
        cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source, coil_grades=("DC01",), context=ctx
    )
    return daemon, source


def test_alerts_and_frames_carry_the_coil_from_the_schedule(strip_bundle: Path, tmp_path: Path) -> None:
    step = FRAME - OVERLAP
    first = 40_000
    src = SourceConfig(
        block_lines=128,
        line_rate_hz=None,
        strip_lines=OVERLAP + 24 * step,
        first_line=first,
        defects_per_100_frames=150,
        roll_period_lines=None,
    )
    # K1 from 1.5 m into the run for 1.5 m, K2 right after it to the end.
    head1, tail1 = first + 3000, first + 6000
    schedule = tmp_path / "coils.csv"
    schedule.write_text(
        "coil_id,grade,head_m,length_m,width_mm,thickness_mm\n"
        f"K1,DC01,{head1 * MM / 1000},{(tail1 - head1) * MM / 1000},1250,0.7\n"
        f"K2,DC01,{tail1 * MM / 1000},100,,\n",
        encoding="utf-8",
    )
    ctx = zmq.Context()
    daemon, source = _daemon(
        strip_bundle,
        src,
        ctx,
        threshold=_threshold(strip_bundle),
        coil_schedule=schedule,
        side="bottom",
        cd_offset_mm=400.0,
        thumbnail_px=48,
    )
    daemon.start(acquire=False)
    messages, report = collect_run(
        endpoint=daemon.publisher.endpoint,
        topics=("alert", "frame", "coil"),
        start=daemon.start_acquisition,
        context=ctx,
        timeout_s=120,
    )
    daemon.join()
    ctx.term()
    assert report.gaps == []
    order = [(t, h.get("coil_id"), h.get("event")) for t, h in messages]
    coil_events = [(cid, ev) for t, cid, ev in order if t == "coil"]
    assert coil_events == [("K1", "start"), ("K1", "end"), ("K2", "start")]
    alerts = [h for t, h in messages if t == "alert"]
    assert {a["coil_id"] for a in alerts} >= {None, "K1", "K2"}
    for cid in ("K1", "K2"):
        first_alert = next(i for i, (t, c, _) in enumerate(order) if t == "alert" and c == cid)
        start = order.index(("coil", cid, "start"))
        assert start < first_alert
    head = {"K1": head1, "K2": tail1}
    for a in alerts:
        assert a["side"] == "bottom"
        # How far past the camera the defect was at capture: within one frame, in any coil.
        assert 0.0 <= a["capture_md_m"] - a["md_m"] <= FRAME * MM / 1000
        assert a["strip_md_m"] == pytest.approx(a["line"] * MM / 1000)
        if a["coil_id"] is None:
            assert a["line"] < head1 and a["md_m"] == pytest.approx(a["strip_md_m"])
        else:
            assert a["md_m"] == pytest.approx((a["line"] - head[a["coil_id"]]) * MM / 1000)
            assert a["md_m"] >= 0
        png = cv2.imdecode(np.frombuffer(base64.b64decode(a["thumbnail_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert png.shape == (48, 48)
    # CD in strip coordinates: the camera's offset plus the column.
    planted = {(d.line, d.col) for d in source.planted}
    for a in alerts:
        near = [c for line, c in planted if abs(line - a["line"]) < 40]
        if near:
            assert min(abs(400.0 + c * MM - a["cd_mm"]) for c in near) < 10.0
    frames = [h for t, h in messages if t == "frame"]
    assert {f["coil_id"] for f in frames} == {None, "K1", "K2"}
    for f in frames:
        if f["coil_id"] is not None:
            row0_line = f["first_line"]
            assert f["md_m"] == pytest.approx((row0_line - head[f["coil_id"]]) * MM / 1000)


def _ask(req: zmq.Socket, msg: dict[str, Any]) -> dict[str, Any]:
    req.send(json.dumps(msg).encode())
    reply = req.recv_json()
    assert isinstance(reply, dict)
    return reply


def test_level2_commands_over_the_control_socket_and_a_restart_resumes(strip_bundle: Path, tmp_path: Path) -> None:
    src = SourceConfig(block_lines=128, line_rate_hz=4000, plant_defects=False, strip_lines=None, first_line=0)
    journal = {"path": tmp_path / "journal.sqlite"}
    ctx = zmq.Context()
    daemon, _ = _daemon(strip_bundle, src, ctx, journal=journal)
    daemon.start()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 20_000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(daemon.control_endpoint)
    try:
        assert "no coil is open" in _ask(req, {"cmd": "coil_end"})["error"]
        assert "unknown grade" in _ask(req, {"cmd": "coil_start", "coil_id": "X", "grade": "S355"})["error"]
        ok = _ask(req, {"cmd": "coil_start", "coil_id": "24-118734", "grade": "DC01", "width_mm": 1250})
        assert ok["ok"] is True and ok["coil"]["head_line"] >= 0
        head = ok["coil"]["head_line"] + 1000
        missed_end = _ask(req, {"cmd": "coil_start", "coil_id": "24-118735", "grade": "DC01", "head_line": head})
        assert missed_end["ok"] is True and missed_end["ended"]["coil_id"] == "24-118734"
        status = _ask(req, {"cmd": "coil"})
        assert status["ok"] is True and [c["coil_id"] for c in status["coils"]] == ["24-118734", "24-118735"]
        beat = _ask(req, {"cmd": "status"})
        assert beat["coil"]["coil_id"] in ("24-118734", "24-118735")
    finally:
        req.close()
        daemon.stop()
        daemon.join()
    # A new process on the same journal is still in coil 24-118735.
    daemon, _ = _daemon(strip_bundle, src, ctx, journal=journal)
    try:
        assert daemon.coils.status()["coils"][-1]["coil_id"] == "24-118735"
        assert daemon.coils.locate(10**7)[0] == "24-118735"
    finally:
        daemon.close()
        ctx.term()
