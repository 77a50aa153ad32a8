"""Faults survived: a camera that stalls and vanishes, a subscriber that never reads."""

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from pipeline.acquisition.genicam import CameraError
from pipeline.acquisition.sources import SyntheticSource
from pipeline.config import RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.service.daemon import Daemon
from pipeline.transport.messages import LineBlock
from pipeline.transport.publish import decode
from tests.conftest import loopback_daemon_config

WIDTH, FRAME, OVERLAP = 256, 768, 384


class FlakyCamera:
    """Delivers strip, then nothing (pulled cable); reopening fails ``failures`` times first."""

    def __init__(self, *, stall_after_blocks: int, failures: int) -> None:
        src = SourceConfig(block_lines=128, strip_lines=None, first_line=0)
        self._inner = SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME)
        self.width, self.channels = WIDTH, 1
        self._left = stall_after_blocks
        self._failures = failures
        self.reopen_times: list[float] = []
        self.online = True

    def read(self, timeout: float) -> LineBlock | None:
        if not self.online or self._left <= 0:
            time.sleep(min(timeout, 0.05))
            return None
        self._left -= 1
        return self._inner.read(timeout)

    def reopen(self) -> None:
        self.reopen_times.append(time.monotonic())
        if len(self.reopen_times) <= self._failures:
            raise CameraError("camera cam0 not found")
        self.online, self._left = True, 10**9

    def close(self) -> None:
        pass


def test_a_stalled_camera_is_reported_offline_and_reopened_with_backoff(strip_bundle: Path) -> None:
    camera = FlakyCamera(stall_after_blocks=18, failures=2)
    cfg = loopback_daemon_config(
        bundle=strip_bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        heartbeat_s=0.1,
        camera_stall_s=0.3,
        camera_reconnect_s=0.5,
        camera_backoff_max_s=2.0,
    )
    ctx = zmq.Context()
    daemon = Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=camera, context=ctx)
    states: list[str] = []
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(daemon.publisher.endpoint)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if sub.poll(100):
                states.append(decode(sub.recv_multipart())[1]["state"])

    w = threading.Thread(target=watch)
    w.start()
    daemon.start()
    end = time.monotonic() + 60
    while time.monotonic() < end and daemon.stats.snapshot()["counts"].get("frames_scored_total", 0) < 8:
        time.sleep(0.1)
    daemon.stop()
    daemon.join()
    done.set()
    w.join()
    sub.close(0)
    ctx.term()
    counts = daemon.stats.snapshot()["counts"]
    gaps = [b - a for a, b in zip(camera.reopen_times, camera.reopen_times[1:], strict=False)]
    print(f"states seen {sorted(set(states))}, reopen attempts {len(camera.reopen_times)}, gaps {gaps}")
    assert daemon.failed is None
    assert "camera_offline" in states and states.index("camera_offline") < len(states) - 1
    assert "running" in states[states.index("camera_offline") :]  # back to running after the reopen
    assert len(camera.reopen_times) == 3 and counts["camera_reopens_total"] == 1
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9  # backing off: 1 s, then 2 s
    assert counts["frames_scored_total"] >= 8  # frames resumed without a restart


def test_a_subscriber_that_never_reads_does_not_block_the_pipeline(strip_bundle: Path) -> None:
    step = FRAME - OVERLAP
    src = SourceConfig(block_lines=128, strip_lines=OVERLAP + 20 * step, first_line=0)
    cfg = loopback_daemon_config(
        bundle=strip_bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        heartbeat_s=0.01,
        send_hwm=4,
        publish_maps=True,  # 200 kB per frame message: a stuck reader fills its pipe fast
        queue_frames=1000,
    )
    ctx = zmq.Context()
    source = SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME)
    daemon = Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source, context=ctx)
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 2)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.connect(daemon.publisher.endpoint)
    time.sleep(0.3)
    t0 = time.monotonic()
    daemon.run_until_done()
    wall = time.monotonic() - t0
    got: list[dict[str, Any]] = []
    while stuck.poll(100):
        got.append(decode(stuck.recv_multipart())[1])
    stuck.close(0)
    ctx.term()
    s = daemon.stats.snapshot()
    frames = [h["seq"] for h in got if h["topic"] == "frame"]
    print(f"20 frames scored in {wall:.1f} s; the stuck subscriber holds {len(frames)} frame messages {frames}")
    assert daemon.failed is None and s["counts"]["frames_scored_total"] == 20 and s["drops"] == {}
    # The stuck subscriber lost messages (its pipe was full) and can see that from the numbers.
    assert len(frames) < 20 and frames == sorted(frames)


class _BrokenCamera(FlakyCamera):
    def read(self, timeout: float) -> LineBlock | None:
        if self._left <= 0:
            raise RuntimeError("driver bug")  # not a camera error: a bug in a stage
        return super().read(timeout)


def test_a_crashed_stage_stops_the_whole_daemon_and_marks_it_failed(strip_bundle: Path) -> None:
    cfg = loopback_daemon_config(
        bundle=strip_bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
    )
    ctx = zmq.Context()
    camera = _BrokenCamera(stall_after_blocks=12, failures=0)
    daemon = Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=camera, context=ctx)
    t0 = time.monotonic()
    daemon.run_until_done()  # returns: no half-alive process with a dead acquisition thread
    ctx.term()
    assert isinstance(daemon.failed, RuntimeError) and time.monotonic() - t0 < 30
    assert not any(t.is_alive() for t in daemon._threads)


def test_a_crash_in_the_embed_stage_also_fails_the_daemon(strip_bundle: Path) -> None:
    src = SourceConfig(block_lines=128, strip_lines=OVERLAP + 10 * (FRAME - OVERLAP), first_line=0)
    cfg = loopback_daemon_config(
        bundle=strip_bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        queue_frames=1000,
    )
    ctx = zmq.Context()
    daemon = Daemon(
        cfg=cfg,
        runtime=RuntimeConfig(),
        scoring=ScoringConfig(),
        source=SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME),
        context=ctx,
    )

    def boom(pixels: Any) -> Any:
        raise MemoryError("out of memory in onnxruntime")

    daemon.frame_scorer.features = boom  # type: ignore[method-assign]
    daemon.run_until_done()
    ctx.term()
    assert isinstance(daemon.failed, MemoryError)
    assert not any(t.is_alive() for t in daemon._threads)


def test_a_bundle_fitted_on_other_channels_is_refused_at_start(strip_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from pipeline.errors import StripinspectError

    b = tmp_path / "rgb_bundle"
    shutil.copytree(strip_bundle, b)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["input"]["channels"] = 3
    (b / "manifest.json").write_text(json.dumps(manifest))
    src = SourceConfig(block_lines=128, strip_lines=768, first_line=0)
    cfg = loopback_daemon_config(bundle=b)
    with pytest.raises(StripinspectError, match=r"camera delivers 1 channel\(s\), bundle .* was fitted on 3"):
        Daemon(
            cfg=cfg,
            runtime=RuntimeConfig(),
            scoring=ScoringConfig(),
            source=SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME),
        )


def test_non_finite_features_are_a_bad_frame_not_a_crash(strip_bundle: Path) -> None:
    import numpy as np

    from pipeline.inference.backends import open_backend

    scorer = open_backend(strip_bundle, runtime=RuntimeConfig(), scoring=ScoringConfig())
    feats = np.ones((4, 5, scorer.index.dim), np.float32)
    feats[1, 2, 3] = np.nan  # faiss would abort the process on NaN distances
    with pytest.raises(ValueError, match="not finite"):
        scorer.search_patches(feats)
