"""End to end over real ZeroMQ on 127.0.0.1 (random ports): synthetic camera -> daemon -> listener."""

import threading
from pathlib import Path

import numpy as np
import pytest
import zmq

from calibration.thresholds import threshold_above_normal
from pipeline.acquisition.sources import SyntheticSource
from pipeline.acquisition.synthetic import SyntheticStrip
from pipeline.config import DaemonConfig, RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.framescore import FrameScorer
from pipeline.service.daemon import Daemon
from pipeline.transport.listen import collect_run

WIDTH, FRAME, OVERLAP = 256, 768, 384
MM_PX, MM_LINE = 0.5, 0.5


def _threshold(bundle: Path) -> float:
    """Above every pixel of a stretch of normal strip the daemon has not seen (calibration will
    do this properly; here it keeps the test independent of that issue)."""
    fs = FrameScorer(scorer=open_backend(bundle, runtime=RuntimeConfig(), scoring=ScoringConfig()), tile=None, margin=0)
    strip = SyntheticStrip(width=WIDTH, seed=3)
    frames = (strip.render(20_000 + k * FRAME, FRAME)[0][:, :, None] for k in range(8))
    return threshold_above_normal(fs, frames, factor=1.1)


def _run(
    bundle: Path,
    threshold: float,
    source_cfg: SourceConfig,
    mm_per_line: float = MM_LINE,
    track_edges: bool = False,
    in_flight: int = 1,
) -> tuple[list[dict], object, SyntheticSource, dict]:
    cfg = DaemonConfig(
        bundle=bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        mm_per_px=MM_PX,
        mm_per_line=mm_per_line,
        threshold=threshold,
        min_area_px=8,
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        heartbeat_s=0.2,
        track_edges=track_edges,
        queue_frames=1000,
        source=source_cfg,
        frames_in_flight=in_flight,
    )
    source = SyntheticSource(cfg=source_cfg, width=WIDTH, seed=3, frame_lines=FRAME)
    ctx = zmq.Context()
    daemon = Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source, context=ctx)
    daemon.start(acquire=False)
    messages, report = collect_run(
        endpoint=daemon.publisher.endpoint,
        topics=("alert",),
        start=daemon.start_acquisition,
        context=ctx,
        timeout_s=120,
    )
    alerts = [h for _, h in messages]
    daemon.join()
    stats = daemon.stats.snapshot()
    ctx.term()
    return alerts, report, source, stats


@pytest.mark.parametrize("in_flight", [1, 2], ids=["one-frame-at-a-time", "embed-overlaps-knn"])
def test_alerts_match_planted_defects(strip_bundle: Path, in_flight: int) -> None:
    threshold = _threshold(strip_bundle)
    step = FRAME - OVERLAP
    src = SourceConfig(
        block_lines=100,
        line_rate_hz=None,
        strip_lines=OVERLAP + 24 * step,
        first_line=40_000,
        defects_per_100_frames=150,
        roll_period_lines=None,
    )
    alerts, report, source, stats = _run(strip_bundle, threshold, src, in_flight=in_flight)
    assert report.gaps == []
    assert report.received["alert"] == len(alerts) == stats["counts"].get("alerts_total", 0)
    assert stats["drops"] == {}
    # Defects whose centre lies in rows some frame is responsible for.
    last_line = 40_000 + OVERLAP + 24 * step - OVERLAP // 2
    planted = [d for d in source.planted if d.line < last_line - 40]
    assert len(planted) >= 15
    found, matched, missed = 0, set(), []
    for d in planted:
        md, cd = d.line * MM_LINE / 1000, d.col * MM_PX
        hits = [
            i
            for i, a in enumerate(alerts)
            if abs(a["md_m"] - md) <= OVERLAP * MM_LINE / 1000 and abs(a["cd_mm"] - cd) <= 5.0
        ]
        found += bool(hits)
        matched.update(hits)
        if not hits:
            missed.append(
                (
                    d.kind,
                    d.line,
                    d.col,
                    [(round(a["md_m"] * 2000), round(a["cd_mm"] * 2)) for a in alerts if abs(a["md_m"] - md) < 0.5],
                )
            )
    recall = found / len(planted)
    false_alerts = len(alerts) - len(matched)
    assert recall >= 0.95, f"recall {recall:.2f} of {len(planted)} planted; missed {missed}"
    assert false_alerts <= 1, f"{false_alerts} alerts match no planted defect"
    for a in alerts:
        assert a["schema_version"] == 1 and a["camera_id"] == "cam0"
        assert a["area_mm2"] > 0 and a["max_score"] > threshold == pytest.approx(a["threshold"])


def test_defect_free_strip_raises_no_alert(strip_bundle: Path) -> None:
    # 100 m of strip: 52 frames of 384 new lines at 5 mm per line (a coarse line pitch keeps the
    # test short; the pixels are the same strip). Bar: at most 1 false alert per 100 m.
    threshold = _threshold(strip_bundle)
    frames = 52
    src = SourceConfig(
        block_lines=256,
        line_rate_hz=None,
        plant_defects=False,
        strip_lines=OVERLAP + frames * (FRAME - OVERLAP),
        first_line=90_000,
    )
    alerts, report, _, stats = _run(strip_bundle, threshold, src, mm_per_line=5.0)
    metres = frames * (FRAME - OVERLAP) * 5.0 / 1000
    assert metres >= 99.8
    assert stats["counts"]["frames_scored_total"] == frames
    assert report.gaps == [] and len(alerts) <= 1, f"{len(alerts)} false alerts on {metres:.1f} m"
    assert np.isfinite(stats["latency_seconds"]["end_to_end"]["p99"])


def test_control_socket_status_reload_stop_and_drops(strip_bundle: Path, tmp_path: Path) -> None:
    # A camera far faster than scoring with a one-frame queue: frames must be dropped and
    # counted, never block acquisition.
    src = SourceConfig(block_lines=512, line_rate_hz=None, plant_defects=False, strip_lines=None, first_line=0)
    cfg = DaemonConfig(
        bundle=strip_bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        threshold=1e9,
        queue_frames=1,
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        source=src,
    )
    ctx = zmq.Context()
    daemon = Daemon(
        cfg=cfg,
        runtime=RuntimeConfig(),
        scoring=ScoringConfig(),
        source=SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME),
        context=ctx,
    )
    daemon.start()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 20_000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(daemon.control_endpoint)
    try:
        deadline = 40
        while deadline and not daemon.stats.snapshot()["drops"]:
            threading.Event().wait(0.5)
            deadline -= 1
        req.send_json({"cmd": "status"})
        status = req.recv_json()
        assert status["ok"] and status["state"] == "running"
        assert status["drops"].get("score:queue_full", 0) > 0
        broken = tmp_path / "broken"
        broken.mkdir()
        req.send_json({"cmd": "reload", "bundle": str(broken)})
        reply = req.recv_json()
        assert reply["ok"] is False and "not a bundle" in reply["error"]
        req.send_json({"cmd": "reload", "bundle": str(strip_bundle)})
        assert req.recv_json()["ok"] is True
        req.send_json({"cmd": "reload", "threshold": -1})
        assert req.recv_json()["ok"] is False
        req.send_json({"cmd": "reload", "threshold": 5e8})
        assert req.recv_json() == {"ok": True, "threshold": 5e8}
        deadline = 40
        while deadline and daemon.threshold != 5e8:
            threading.Event().wait(0.25)
            deadline -= 1
        assert daemon.threshold == 5e8  # taken up between frames
        req.send(b"not json")
        assert req.recv_json()["ok"] is False
        req.send_json({"cmd": "stop"})
        assert req.recv_json()["ok"] is True
    finally:
        req.close(0)
    daemon.join()
    assert daemon.failed is None
    assert daemon.stats.snapshot()["counts"]["frames_scored_total"] >= 1
    ctx.term()


def test_systemd_notify_reaches_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from pipeline.process import notify

    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert notify("READY=1")
    assert server.recv(64) == b"READY=1"
    server.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False


def test_frame_messages_carry_the_score_map_when_enabled(strip_bundle: Path) -> None:
    from pipeline.transport.publish import decode

    src = SourceConfig(
        block_lines=128,
        line_rate_hz=None,
        plant_defects=False,
        strip_lines=OVERLAP + 3 * (FRAME - OVERLAP),
        first_line=300_000,
    )
    cfg = DaemonConfig(
        bundle=strip_bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        threshold=1e9,
        publish_maps=True,
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        heartbeat_s=0.2,
        source=src,
    )
    ctx = zmq.Context()
    daemon = Daemon(
        cfg=cfg,
        runtime=RuntimeConfig(),
        scoring=ScoringConfig(),
        source=SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME),
        context=ctx,
    )
    daemon.start(acquire=False)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 30_000)
    sub.connect(daemon.publisher.endpoint)
    while decode(sub.recv_multipart())[0] != "heartbeat":
        pass
    daemon.start_acquisition()
    frames = []
    while len(frames) < 3:
        topic, header, parts = decode(sub.recv_multipart())
        if topic == "frame":
            frames.append((header, parts))
    sub.close(0)
    daemon.stop()
    daemon.join()
    ctx.term()
    for header, parts in frames:
        rows = header["valid_rows"][1] - header["valid_rows"][0]
        assert header["map_shape"] == [rows, WIDTH]
        amap = np.frombuffer(parts[0], dtype="<f2").reshape(rows, WIDTH)
        assert float(amap.max()) == pytest.approx(header["max_score"], rel=1e-3)
    assert [h["seq"] for h, _ in frames] == [1, 2, 3]


def test_no_threshold_anywhere_is_a_start_up_error(strip_bundle: Path) -> None:
    from pipeline.errors import StripinspectError

    src = SourceConfig(strip_lines=10)
    cfg = DaemonConfig(
        bundle=strip_bundle, pub_endpoint="tcp://127.0.0.1:*", control_endpoint="tcp://127.0.0.1:*", source=src
    )
    with pytest.raises(StripinspectError, match="no pixel threshold"):
        Daemon(
            cfg=cfg,
            runtime=RuntimeConfig(),
            scoring=ScoringConfig(),
            source=SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=1024),
        )


def test_cd_is_measured_from_the_tracked_strip_edge(strip_bundle: Path) -> None:
    threshold = _threshold(strip_bundle)
    step = FRAME - OVERLAP
    src = SourceConfig(
        block_lines=128,
        line_rate_hz=None,
        strip_lines=OVERLAP + 12 * step,
        first_line=140_000,
        defects_per_100_frames=150,
        roll_period_lines=None,
    )
    alerts, report, source, _ = _run(strip_bundle, threshold, src, track_edges=True)
    strip = SyntheticStrip(width=WIDTH, seed=3)
    checked = total = 0
    for d in source.planted:
        if d.line >= 140_000 + OVERLAP + 12 * step - OVERLAP // 2 - 40:
            continue
        if d.kind == "edge_crack":
            continue
        left = float(strip.edges(np.array([d.line], dtype=np.float64))[0][0])
        md, cd = d.line * MM_LINE / 1000, (d.col - left) * MM_PX
        # 2.5 mm: tighter than the ~5 mm between the image edge and the strip edge, so CD
        # measured from the image edge would fail here.
        hits = [a for a in alerts if abs(a["md_m"] - md) <= OVERLAP * MM_LINE / 1000 and abs(a["cd_mm"] - cd) <= 2.5]
        checked += bool(hits)
        total += 1
    assert total >= 5 and checked >= 0.9 * total and report.gaps == []


def test_recipe_switch_between_frames_without_drops(strip_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from pipeline.config import RecipeConfig
    from pipeline.inference.bundle import read_manifest, write_manifest

    # Grade B sets no threshold: it must take its own bundle's, not keep grade A's.
    bundle_b = tmp_path / "grade_b"
    shutil.copytree(strip_bundle, bundle_b)
    write_manifest(bundle_b, read_manifest(bundle_b).model_copy(update={"thresholds": {"pixel": 5e8}}))
    src = SourceConfig(block_lines=256, line_rate_hz=6000, plant_defects=False, strip_lines=None, first_line=0)
    cfg = DaemonConfig(
        bundle=strip_bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        queue_frames=256,
        source=src,
        recipes={
            "grade_a": RecipeConfig(bundle=strip_bundle, threshold=1e9),
            "grade_b": RecipeConfig(bundle=bundle_b, threshold=None),
        },
        recipe="grade_a",
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
    )
    ctx = zmq.Context()
    daemon = Daemon(
        cfg=cfg,
        runtime=RuntimeConfig(),
        scoring=ScoringConfig(),
        source=SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME),
        context=ctx,
    )
    assert daemon.threshold == 1e9 and daemon.cfg.recipe == "grade_a"
    daemon.start()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 20_000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(daemon.control_endpoint)
    try:
        req.send_json({"cmd": "recipe", "name": "grade_c"})
        assert req.recv_json()["ok"] is False
        req.send_json({"cmd": "recipe", "name": "grade_b"})
        assert req.recv_json() == {"ok": True, "recipe": "grade_b"}
        for _ in range(80):
            if daemon.cfg.recipe == "grade_b":
                break
            threading.Event().wait(0.25)
        req.send_json({"cmd": "status"})
        status = req.recv_json()
        assert status["recipe"] == "grade_b" and daemon.threshold == 5e8
        req.send_json({"cmd": "stop"})
        req.recv_json()
    finally:
        req.close(0)
    daemon.join()
    ctx.term()
    s = daemon.stats.snapshot()
    assert s["drops"] == {} and s["counts"]["frames_scored_total"] == s["counts"]["frames_total"]
