"""What the station keeps of the line, fed decoded messages as docs/messages.md describes them."""

from __future__ import annotations

import base64
from dataclasses import asdict
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.coil.model import Grading, PeriodicFamily, RuleOutcome
from pipeline.ui.state import LineState, alert_from_header, camera_from_heartbeat, frame_from_message

NOW = 1000.0


def alert(seq: int, **over: Any) -> dict[str, Any]:
    h = {
        "schema_version": 1,
        "topic": "alert",
        "camera_id": "cam0",
        "seq": seq,
        "frame_id": 7,
        "capture_time": 1.0,
        "publish_time": 1.1,
        "class": "unknown",
        "class_confidence": None,
        "coil_id": "C1",
        "side": "top",
        "md_m": 5.0 + seq,
        "strip_md_m": 105.0 + seq,
        "cd_mm": 300.0,
        "length_mm": 10.0,
        "width_mm": 4.0,
        "area_mm2": 30.0,
        "area_px": 120,
        "max_score": 3.0,
        "mean_score": 2.0,
        "threshold": 2.0,
        "box": [100, 300, 20, 10],
        "thumbnail_png": None,
        "journal": "j1",
    }
    return {**h, **over}


def frame(
    seq: int, *, frame_id: int = 7, score: np.ndarray | None = None, jpeg: bytes | None = None, **over: Any
) -> tuple[dict[str, Any], list[bytes]]:
    names: list[str] = []
    parts: list[bytes] = []
    h: dict[str, Any] = {}
    if score is not None:
        names.append("map")
        parts.append(score.astype("<f2").tobytes())
        h.update(map_shape=list(score.shape))
    if jpeg is not None:
        names.append("preview")
        parts.append(jpeg)
        h.update(preview_shape=[50, 100])
    header = {
        "topic": "frame",
        "camera_id": "cam0",
        "seq": seq,
        "frame_id": frame_id,
        "capture_time": 1.0,
        "publish_time": 1.2,
        "coil_id": "C1",
        "side": "top",
        "md_m": 10.0,
        "mm_per_line": 0.5,
        "valid_rows": [200, 600],
        "max_score": 4.0,
        "defects": 1,
        "threshold": 2.0,
        "parts": names,
        **h,
        **over,
    }
    return header, parts


def heartbeat(seq: int, t: float, frames: int, **over: Any) -> dict[str, Any]:
    return {
        "topic": "heartbeat",
        "camera_id": "cam0",
        "seq": seq,
        "publish_time": t,
        "state": "running",
        "side": "top",
        "coil": {"coil_id": "C1", "md_m": 42.0, "camera_line": 1},
        "camera": {"online": True, "state": "online"},
        "counts": {"frames_total": frames, "alerts_total": 3},
        "drops": {"score:queue_full": 2, "embed:queue_full": 1},
        "latency_seconds": {"end_to_end": {"p50": 0.1, "p95": 0.2, "p99": 0.31}},
        "threshold": [2.0, 1.8],
        "drift": {"drift_ratio": 1.1, "drifting": False},
        **over,
    }


def jpeg() -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((50, 100), 128, np.uint8))
    assert ok
    return buf.tobytes()


@pytest.fixture
def state() -> LineState:
    return LineState(cameras=["cam0"], recent_alerts=3, stale_s=3.0, coils_kept=2, defects_per_coil=4)


def test_an_alert_header_becomes_a_view_with_its_thumbnail() -> None:
    ok, png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    assert ok
    a = alert_from_header(alert(4, thumbnail_png=base64.b64encode(png.tobytes()).decode(), threshold=[2.5, 2.0]))
    assert a.thumbnail == png.tobytes()
    assert a.threshold == 2.0 and a.ratio == 1.5
    assert a.path == "cam0/j1/4" and a.key == ("cam0", "j1", 4)
    # Not a PNG, or not base64: the alert stays, without a thumbnail.
    assert alert_from_header(alert(4, thumbnail_png="bm90IGEgcG5n")).thumbnail is None
    assert alert_from_header(alert(4, thumbnail_png="%%%")).thumbnail is None
    # Journal ids with odd characters are quoted in paths; no journal is '-'.
    assert alert_from_header(alert(4, journal="a/b c")).path == "cam0/a%2Fb%20c/4"
    assert alert_from_header(alert(4, journal=None)).path == "cam0/-/4"
    for bad in ({"box": [1, 2, 3]}, {"side": "left"}, {"md_m": float("nan")}, {"threshold": 0}):
        with pytest.raises((ValueError, TypeError)):
            alert_from_header(alert(1, **bad))


def test_frame_parts_come_in_the_order_the_header_names() -> None:
    score = np.arange(8, dtype=np.float32).reshape(2, 4)
    h, parts = frame(1, score=score, jpeg=jpeg())
    f = frame_from_message(h, parts)
    assert f.score_map is not None and np.array_equal(f.score_map, score.astype(np.float16))
    assert f.preview == parts[1] and f.preview_shape == (50, 100)
    assert f.md_end_m == pytest.approx(10.0 + 600 * 0.5 / 1000)
    h2 = {**h, "parts": ["preview", "map"]}
    f2 = frame_from_message(h2, parts[::-1])
    assert f2.score_map is not None and np.array_equal(f2.score_map, f.score_map)
    # A daemon from before previews: map_shape and one part, no list.
    legacy = {k: v for k, v in h.items() if k != "parts"}
    assert frame_from_message(legacy, parts[:1]).score_map is not None
    with pytest.raises(ValueError, match="lists parts"):
        frame_from_message(h, parts[:1])
    with pytest.raises(ValueError, match="bytes"):
        frame_from_message({**h, "map_shape": [3, 4]}, parts)
    with pytest.raises(ValueError, match="JPEG"):
        frame_from_message({**h, "parts": ["map", "preview"]}, [parts[0], b"GIF89a"])


def test_frame_rate_comes_from_two_heartbeats() -> None:
    first = camera_from_heartbeat(heartbeat(1, 100.0, 40), None, now=NOW)
    assert first.fps is None and first.drops_total == 3 and first.latency_p99_s == 0.31
    assert first.threshold == 1.8  # the lowest band
    second = camera_from_heartbeat(heartbeat(2, 102.0, 45), first, now=NOW + 2)
    assert second.fps == pytest.approx(2.5)
    # The daemon restarted (counts from 0 again): the rate before is kept, not a negative one.
    third = camera_from_heartbeat(heartbeat(1, 103.0, 2), second, now=NOW + 3)
    assert third.fps == pytest.approx(2.5)


def test_recent_alerts_are_bounded_and_evicted_ones_forgotten(state: LineState) -> None:
    for seq in range(1, 6):
        updates = state.on_camera("cam0", "alert", alert(seq), [], now=NOW)
        assert updates[0].kind == "alert" and updates[0].data["path"] == f"cam0/j1/{seq}"
    assert [a.seq for a in state.alerts()] == [5, 4, 3]
    assert state.alert("cam0", "j1", 2) is None and state.alert("cam0", "j1", 5) is not None


def test_gaps_in_sequence_numbers_are_counted_and_restarts_are_not(state: LineState) -> None:
    for seq in (1, 2, 5, 6):
        state.on_camera("cam0", "alert", alert(seq), [], now=NOW)
    state.on_camera("cam0", "alert", alert(1, journal="j2"), [], now=NOW)  # a new journal: from 1 again
    state.on_camera("cam0", "heartbeat", heartbeat(10, 1.0, 0), [], now=NOW)
    state.on_camera("cam0", "heartbeat", heartbeat(12, 2.0, 0), [], now=NOW)
    assert state.panels(now=NOW)[0].lost == 2 + 1


def test_bad_messages_are_counted_and_change_nothing(state: LineState) -> None:
    with pytest.raises(KeyError):
        state.on_camera("cam0", "alert", {k: v for k, v in alert(1).items() if k != "md_m"}, [], now=NOW)
    with pytest.raises(ValueError, match="camera 'cam1'"):
        state.on_camera("cam0", "alert", alert(2, camera_id="cam1"), [], now=NOW)
    with pytest.raises(ValueError):
        state.on_camera("cam0", "frame", *frame(1, score=np.zeros((2, 2), np.float32), map_shape=[3, 3]), now=NOW)
    assert state.panels(now=NOW)[0].bad == 3
    assert state.alerts() == [] and state.frame("cam0") is None
    with pytest.raises(ValueError, match="unknown camera"):
        state.on_camera("cam9", "alert", alert(1), [], now=NOW)


def test_a_frame_after_its_alerts_gives_them_heat_crops(state: LineState) -> None:
    score = np.zeros((400, 512), np.float32)  # the valid rows 200..600 at full resolution
    score[95:115, 95:125] = 6.0  # the alert's box (100, 300, 20, 10) is rows 300..310 of the frame
    state.on_camera("cam0", "alert", alert(1, frame_id=7), [], now=NOW)
    state.on_camera("cam0", "alert", alert(2, frame_id=6), [], now=NOW)  # an older frame's
    assert state.heat_png("cam0", "j1", 1) is None
    updates = state.on_camera("cam0", "frame", *frame(3, frame_id=7, score=score, jpeg=jpeg()), now=NOW)
    assert updates[0].kind == "frame" and updates[0].data == {
        "camera": "cam0",
        "frame_id": 7,
        "max_score": 4.0,
        "threshold": 2.0,
        "defects": 1,
        "preview": True,
        "map": True,
    }
    png = state.heat_png("cam0", "j1", 1)
    assert png is not None and png.startswith(b"\x89PNG")
    assert state.heat_png("cam0", "j1", 2) is None
    got = state.overlay_png("cam0")
    assert got is not None and got[0] == 7
    img = cv2.imdecode(np.frombuffer(got[1], np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape == (50, 100, 4)  # the preview's size, with alpha
    assert state.overlay_png("cam0") is got  # drawn once per frame
    # The coil's reach: the end of the frame's valid rows.
    coil = state.coil("C1")
    assert coil is not None and coil.reach_m["top"] == pytest.approx(10.3)


def test_heartbeats_and_coil_events_make_the_current_coil(state: LineState) -> None:
    start = {
        "topic": "coil",
        "camera_id": "cam0",
        "seq": 1,
        "event": "start",
        "coil_id": "C2",
        "grade": "DC04",
        "width_mm": 1250,
    }
    state.on_camera("cam0", "coil", start, [], now=NOW)
    assert state.current_coil_id() == "C2"
    view = state.coil("C2")
    assert view is not None and view.grade == "DC04" and view.width_mm == 1250.0 and not view.ended
    state.on_camera("cam0", "heartbeat", heartbeat(1, 1.0, 0, coil={"coil_id": "C3", "md_m": 7.5}), [], now=NOW)
    assert state.current_coil_id() == "C3"
    c3 = state.coil("C3")
    assert c3 is not None and c3.reach_m == {"top": 7.5}
    state.on_camera("cam0", "coil", {**start, "seq": 2, "event": "end", "coil_id": "C3"}, [], now=NOW)
    c3 = state.coil("C3")
    assert c3 is not None and c3.ended
    # Only coils_kept (2) live coils are kept: the oldest went.
    state.on_camera("cam0", "alert", alert(1, coil_id="C4"), [], now=NOW)
    assert state.coil("C2") is None and state.coil("C3") is not None
    with pytest.raises(ValueError):
        state.on_camera("cam0", "coil", {**start, "seq": 3, "event": "middle"}, [], now=NOW)


def test_a_coils_defects_are_bounded_and_the_rest_counted(state: LineState) -> None:
    for seq in range(1, 7):
        state.on_camera("cam0", "alert", alert(seq, **{"class": "scratch" if seq % 2 else "unknown"}), [], now=NOW)
    coil = state.coil("C1")
    assert coil is not None and len(coil.defects) == 4 and coil.dropped_defects == 2
    assert [d.klass for d in coil.defects] == ["scratch", None, "scratch", None]
    assert coil.defects[0].sources == ("cam0/j1/1",)
    assert state.classes() == ["scratch"]


def test_coil_service_messages_grade_and_find_families(state: LineState) -> None:
    g = Grading(
        grade="DC04", disposition="hold", outcomes=(RuleOutcome("periodic", 1.0, 0.0, True, "hold"),), final=False
    )
    f = PeriodicFamily(
        side="top",
        cd_mm=480.0,
        period_m=1.759,
        phase_m=2.0,
        count=4,
        confidence=1.0,
        md_m=(2.0, 3.76, 5.52, 7.28),
        confirmed=True,
    )
    common = {"schema_version": 1, "camera_id": "coil-service", "publish_time": 1.0, "frame_id": None}
    u = state.on_coil_service("grading", {**common, "topic": "grading", "seq": 1, "coil_id": "C1", **asdict(g)})
    assert u[0].kind == "coil" and u[0].data == {"coil_id": "C1", "event": "grading", "what": "hold"}
    state.on_coil_service("periodic", {**common, "topic": "periodic", "seq": 1, "coil_id": "C1", **asdict(f)})
    state.on_coil_service("periodic", {**common, "topic": "periodic", "seq": 2, "coil_id": "C1", **asdict(f)})  # again
    state.on_coil_service(
        "coil_closed", {**common, "topic": "coil_closed", "seq": 1, "coil_id": "C1", "disposition": "hold"}
    )
    coil = state.coil("C1")
    assert coil is not None and coil.grading == g and coil.families == (f,) and coil.ended
    assert coil.closed is not None and coil.closed["disposition"] == "hold"
    with pytest.raises(KeyError):
        state.on_coil_service("grading", {**common, "coil_id": "C1"})
    assert state.coil_service_bad == 1


def test_a_camera_without_heartbeats_is_silent() -> None:
    state = LineState(cameras=["cam0", "cam1"], recent_alerts=3, stale_s=3.0)
    state.on_camera("cam0", "heartbeat", heartbeat(1, 1.0, 0), [], now=NOW)
    p0, p1 = state.panels(now=NOW + 1)
    assert not p0.silent and p1.silent and p1.view is None
    assert state.panels(now=NOW + 4)[0].silent  # three heartbeat periods without one
