"""Operator feedback in a running daemon: false alarms join the bank from the next frame, labels
classify, the overlay survives a restart and can be undone, over-threshold clicks are refused
(real daemon, real ZeroMQ, real faiss; the station's own client, transport.feedback)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq

from pipeline.acquisition.sources import SyntheticSource
from pipeline.acquisition.synthetic import PlantedDefect, SyntheticStrip
from pipeline.config import FeedbackConfig, RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.framescore import FrameScorer
from pipeline.inference.overlay import overlay_dir, region_rows
from pipeline.service.daemon import Daemon
from pipeline.transport.feedback import label_defect, list_overlay, mark_false_alarm, undo_overlay
from pipeline.transport.listen import listen
from tests.conftest import loopback_daemon_config
from tests.pipeline.service.test_daemon import FRAME, OVERLAP, WIDTH, _threshold


@pytest.fixture
def bundle(strip_bundle: Path, tmp_path: Path) -> Path:
    """A copy: the overlay is written beside the bundle, and the session's bundle is shared."""
    return Path(shutil.copytree(strip_bundle, tmp_path / "bundle"))


def _daemon(bundle: Path, ctx: zmq.Context, threshold: float, *, publish_maps: bool = False, **feedback: Any) -> Daemon:
    src = SourceConfig(block_lines=128, line_rate_hz=6000, defects_per_100_frames=150.0, roll_period_lines=None)
    cfg = loopback_daemon_config(
        bundle=bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        threshold=threshold,
        min_area_px=8,
        heartbeat_s=0.2,
        preview_px=128,
        publish_maps=publish_maps,
        source=src,
        feedback=FeedbackConfig(**feedback),
    )
    source = SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME)
    return Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source, context=ctx)


class Collector:
    """Alerts and frames from a daemon's PUB on a thread, until closed."""

    def __init__(self, daemon: Daemon, ctx: zmq.Context) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self._stop = threading.Event()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"frame")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.publisher.endpoint)
        self._frames_sock = sock

        def run() -> None:
            listen(
                endpoint=daemon.publisher.endpoint,
                topics=("alert",),
                on_message=lambda _t, h: self.alerts.append(h),
                stop=self._stop.is_set,
                context=ctx,
                until_state=None,
            )

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()

    def frame_parts(self, timeout_ms: int = 10_000) -> tuple[dict[str, Any], list[bytes]]:
        import json

        assert self._frames_sock.poll(timeout_ms), "no frame message"
        parts = self._frames_sock.recv_multipart()
        return json.loads(parts[1]), parts[2:]

    def wait(self, n: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while len(self.alerts) < n and time.monotonic() < end:
            time.sleep(0.05)
        assert len(self.alerts) >= n, f"only {len(self.alerts)} alerts"

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self._frames_sock.close(0)


def test_feedback_through_the_control_socket(bundle: Path) -> None:
    ctx = zmq.Context()
    threshold = _threshold(bundle)
    daemon = _daemon(bundle, ctx, threshold, max_score_ratio=1000.0)
    daemon.start()
    got = Collector(daemon, ctx)
    control = daemon.control_endpoint
    try:
        got.wait(3)
        header, parts = got.frame_parts()
        assert header["parts"] == ["preview"]
        preview = cv2.imdecode(np.frombuffer(parts[0], np.uint8), cv2.IMREAD_UNCHANGED)
        assert preview.shape[1] == 128 and list(preview.shape[:2]) == header.get(
            "preview_shape", list(preview.shape[:2])
        )

        a, b = got.alerts[0], got.alerts[1]
        assert a["class"] == "unknown" and a["class_confidence"] is None  # nothing labelled yet
        fa = mark_false_alarm(ctx, control, journal=a["journal"], seq=a["seq"], user="anna")
        assert fa["ok"], fa
        assert fa["entry"]["kind"] == "normal" and fa["entry"]["user"] == "anna" and fa["entry"]["rows"] > 0
        assert fa["apply_s"] < 2.0
        lab = label_defect(ctx, control, journal=b["journal"], seq=b["seq"], label="scratch", user="ben")
        assert lab["ok"] and lab["entry"]["class"] == "scratch"
        bad = label_defect(ctx, control, journal=b["journal"], seq=b["seq"], label="unknown", user="ben")
        assert not bad["ok"] and "reserved" in bad["error"]
        gone = mark_false_alarm(ctx, control, journal=a["journal"], seq=10**9, user="anna")
        assert not gone["ok"] and "not among the last" in gone["error"]
        nobody = mark_false_alarm(ctx, control, journal=a["journal"], seq=a["seq"], user="")
        assert not nobody["ok"]

        ov = list_overlay(ctx, control)
        assert ov["ok"] and ov["version"] == 2 and ov["classes"] == {"scratch": 1}
        assert ov["rows"] == fa["entry"]["rows"] and len(ov["entries"]) == 2
        n = len(got.alerts)
        got.wait(n + 3)
        # Later alerts are classified against the example (the planted kinds differ: any answer,
        # but every alert says one).
        assert all("class" in h for h in got.alerts[n:])
        undo = undo_overlay(ctx, control, entry=fa["entry"]["id"], user="carl")
        assert undo["ok"] and undo["removed"]["removed_by"] == "carl"
        assert list_overlay(ctx, control)["rows"] == 0
        again = undo_overlay(ctx, control, entry=fa["entry"]["id"], user="carl")
        assert not again["ok"]
    finally:
        got.close()
        daemon.stop()
        daemon.join()
    files = sorted(p.name for p in overlay_dir(bundle).iterdir())
    assert "overlay.json" in files and any("_normal_" in f and f.endswith(".npy") for f in files)

    # A restarted daemon opens the same overlay: the history and the class are there.
    daemon = _daemon(bundle, ctx, threshold)
    daemon.start(acquire=False)
    try:
        ov = list_overlay(ctx, daemon.control_endpoint)
        assert ov["version"] == 3 and ov["classes"] == {"scratch": 1} and ov["rows"] == 0
        assert [e["user"] for e in ov["entries"]] == ["anna", "ben"]
    finally:
        daemon.stop()
        daemon.join()
    ctx.term()


def test_a_click_on_a_real_defect_is_refused(bundle: Path) -> None:
    ctx = zmq.Context()
    # Ratio 1: every alert scores above its threshold, so every false alarm is refused.
    daemon = _daemon(bundle, ctx, _threshold(bundle), max_score_ratio=1.0)
    daemon.start()
    got = Collector(daemon, ctx)
    try:
        got.wait(1)
        a = got.alerts[0]
        r = mark_false_alarm(ctx, daemon.control_endpoint, journal=a["journal"], seq=a["seq"], user="anna")
        assert not r["ok"] and "refused" in r["error"] and "threshold" in r["error"]
        assert list_overlay(ctx, daemon.control_endpoint)["entries"] == []
    finally:
        got.close()
        daemon.stop()
        daemon.join()
    ctx.term()
    assert not (overlay_dir(bundle) / "overlay.json").exists()


def test_added_rows_bring_the_same_pattern_to_normal(strip_bundle: Path) -> None:
    scorer = open_backend(strip_bundle, runtime=RuntimeConfig(), scoring=ScoringConfig())
    fs = FrameScorer(scorer=scorer, tile=None, margin=0)  # type: ignore[arg-type]
    strip = SyntheticStrip(width=WIDTH, seed=3)
    mark = PlantedDefect(kind="scale", line=30_000 + 200, col=120, size=36, seed=5)
    img, mask = strip.render(30_000, 512, [mark])
    feats = fs.features(img[:, :, None])
    before = fs.score(img[:, :, None]).anomaly_map
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1)
    rows, _ = region_rows(feats, box, stride=scorer.stride, margin_px=16)  # type: ignore[attr-defined]
    scorer.set_extra(rows)  # type: ignore[attr-defined]
    after = fs.score(img[:, :, None]).anomaly_map
    assert after[mask].max() < 0.5 * before[mask].max()
    # The same mark elsewhere on the strip, on other grain, is brought down too.
    other = PlantedDefect(kind="scale", line=90_000 + 200, col=120, size=36, seed=5)
    img2, mask2 = strip.render(90_000, 512, [other])
    scorer.set_extra(np.zeros((0, rows.shape[1]), np.float32))
    plain = fs.score(img2[:, :, None]).anomaly_map[mask2].max()
    scorer.set_extra(rows)
    taught = fs.score(img2[:, :, None]).anomaly_map[mask2].max()
    assert taught < 0.7 * plain
