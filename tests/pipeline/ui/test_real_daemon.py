"""The station against a real daemon (not the fake line): its frames bring a preview and a
score map the station can show, its alerts a class, and the station's feedback call reaches the
daemon's model (the daemon's side is tested in tests/pipeline/service/test_feedback.py)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import zmq

from pipeline.config import BridgeCameraConfig
from pipeline.transport.feedback import label_defect
from pipeline.ui.hub import Hub
from pipeline.ui.line import Line
from pipeline.ui.state import LineState
from tests.pipeline.service.test_daemon import _threshold
from tests.pipeline.service.test_feedback import _daemon


def test_the_station_shows_a_real_daemons_frames_and_alerts(strip_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(strip_bundle, tmp_path / "bundle"))
    ctx = zmq.Context()
    daemon = _daemon(bundle, ctx, _threshold(bundle), publish_maps=True)
    daemon.start(acquire=False)
    state = LineState(cameras=["cam0"], recent_alerts=50, stale_s=5.0)
    line = Line(
        cameras={"cam0": BridgeCameraConfig(pub=daemon.publisher.endpoint, control=daemon.control_endpoint)},
        coil_service=None,
        state=state,
        hub=Hub(queue_size=64),
        context=ctx,
    )
    line.start()
    try:
        time.sleep(0.5)  # the station's subscription is live before the strip starts
        daemon.start_acquisition()
        end = time.monotonic() + 60
        while (state.frame("cam0") is None or len(state.alerts()) < 2) and time.monotonic() < end:
            time.sleep(0.1)
        frame = state.frame("cam0")
        assert frame is not None and frame.preview is not None and frame.score_map is not None
        img = cv2.imdecode(np.frombuffer(frame.preview, np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape[1] == 128 and frame.preview_shape == img.shape[:2]
        assert frame.score_map.shape[1] == 256
        assert state.overlay_png("cam0") is not None  # the heat map over the preview
        first = state.alerts()[-1]
        assert first.klass == "unknown" and first.class_confidence is None
        reply = label_defect(ctx, daemon.control_endpoint, journal=first.journal, seq=first.seq, label="pit", user="op")
        assert reply["ok"], reply
        n = len(state.alerts())
        while len(state.alerts()) < n + 4 and time.monotonic() < end:
            time.sleep(0.1)
        later = state.alerts()[: len(state.alerts()) - n]  # newest first
        assert len(later) >= 4
        # One example: a later defect is a pit (with a confidence) or unknown (without one).
        assert all((a.klass == "pit") == (a.class_confidence is not None) for a in later)
        assert {a.klass for a in later} <= {"pit", "unknown"}
    finally:
        line.stop()
        daemon.stop()
        daemon.join()
        ctx.term()
