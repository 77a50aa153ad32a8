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
        src = SourceConfig(block_lines=128, line_rate_hz=None, plant_defects=False, strip_lines=None, first_line=0)
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
    src = SourceConfig(
        block_lines=128, line_rate_hz=None, plant_defects=False, strip_lines=OVERLAP + 20 * step, first_line=0
    )
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
    src = SourceConfig(
        block_lines=128,
        line_rate_hz=None,
        plant_defects=False,
        strip_lines=OVERLAP + 10 * (FRAME - OVERLAP),
        first_line=0,
    )
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
    src = SourceConfig(block_lines=128, line_rate_hz=None, plant_defects=False, strip_lines=768, first_line=0)
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


class _NotifySocket:
    """systemd's end of $NOTIFY_SOCKET, emulated: an AF_UNIX datagram socket in tmp_path that
    records (monotonic time, message) of everything the daemon sends."""

    def __init__(self, path: Path) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._recv)
        self._thread.start()

    def _recv(self) -> None:
        while not self._done.is_set():
            try:
                self.got.append((time.monotonic(), self.sock.recv(256).decode()))
            except TimeoutError:
                continue

    def watchdogs(self, since: float, until: float | None = None) -> int:
        end = until if until is not None else float("inf")
        return sum(1 for t, m in self.got if m == "WATCHDOG=1" and since <= t < end)

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    server = _NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2: fed every 0.1 s
    yield server
    server.close()


def test_a_reconnecting_camera_keeps_the_watchdog_fed(strip_bundle: Path, notify_socket: _NotifySocket) -> None:
    # A line stop: no lines at all and every reopen fails, for longer than the stuck bound. The
    # daemon is healthy (reconnecting), so systemd must not kill it.
    camera = FlakyCamera(stall_after_blocks=0, failures=10**9)
    cfg = loopback_daemon_config(
        bundle=strip_bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        heartbeat_s=0.1,
        camera_stall_s=0.2,
        camera_reconnect_s=0.3,
        camera_backoff_max_s=0.8,
        stage_stuck_s=0.5,
    )
    ctx = zmq.Context()
    daemon = Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=camera, context=ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(daemon.publisher.endpoint)
    daemon.start()
    try:
        time.sleep(1.0)  # offline by now, reopening with backoff
        t0 = time.monotonic()
        time.sleep(2.0)  # four stuck bounds without a single line
        t1 = time.monotonic()
        cameras = []
        while sub.poll(100) and len(cameras) < 50:
            cameras.append(decode(sub.recv_multipart())[1]["camera"])
        status = daemon.snapshot()
    finally:
        daemon.stop()
        daemon.join()
        sub.close(0)
        ctx.term()
    fed = notify_socket.watchdogs(t0, t1)
    print(f"WATCHDOG=1 {fed} times in {t1 - t0:.1f} s of line stop; reopen attempts {len(camera.reopen_times)}")
    assert daemon.failed is None and daemon.stats.snapshot()["counts"].get("frames_total", 0) == 0
    assert len(camera.reopen_times) >= 3  # it really was reconnecting all along
    assert fed >= 10  # about every 0.1 s
    assert status["state"] == "camera_offline" and status["camera"]["state"] == "reconnecting"
    assert cameras and all(c["state"] == "reconnecting" for c in cameras[-3:])


class _HangingCamera(FlakyCamera):
    """Delivers strip, then its read blocks until released (a driver call that never returns)."""

    def __init__(self) -> None:
        super().__init__(stall_after_blocks=10**9, failures=0)
        self.release = threading.Event()
        self.hang = threading.Event()

    def read(self, timeout: float) -> LineBlock | None:
        if self.hang.is_set():
            self.release.wait()
        return super().read(timeout)


@pytest.mark.parametrize("stuck", ["acquire", "embed"])
def test_a_stuck_stage_stops_the_watchdog(strip_bundle: Path, notify_socket: _NotifySocket, stuck: str) -> None:
    camera = _HangingCamera()
    cfg = loopback_daemon_config(
        bundle=strip_bundle, frame_lines=FRAME, overlap_lines=OVERLAP, heartbeat_s=0.1, stage_stuck_s=0.5
    )
    ctx = zmq.Context()
    daemon = Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=camera, context=ctx)
    release = camera.release
    # Only the stage under test hangs: with embed stuck the camera keeps delivering (frames are
    # dropped at the full queue), so acquire, score and publish all stay alive and beating.
    hang = camera.hang if stuck == "acquire" else threading.Event()
    if stuck == "embed":
        real = daemon.frame_scorer.features

        def features(pixels: Any) -> Any:  # an ONNX call that never returns, once stuck
            if hang.is_set():
                release.wait()
            return real(pixels)

        daemon.frame_scorer.features = features  # type: ignore[method-assign]
    daemon.start()
    try:
        end = time.monotonic() + 60
        while daemon.stats.snapshot()["counts"].get("frames_scored_total", 0) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        h0 = time.monotonic()
        time.sleep(1.0)
        healthy = (h0, time.monotonic())
        hang.set()
        time.sleep(1.0)  # past the stuck bound (0.5 s) plus a frame in flight
        t0 = time.monotonic()
        lines = daemon.stats.snapshot()["counts"].get("lines_total", 0)
        time.sleep(1.5)
        t1 = time.monotonic()
        delivering = daemon.stats.snapshot()["counts"].get("lines_total", 0) > lines
        problems = daemon._health.problems()
    finally:
        release.set()
        daemon.stop()
        daemon.join()
        ctx.term()
    before, after = notify_socket.watchdogs(*healthy), notify_socket.watchdogs(t0, t1)
    print(f"stuck {stuck}: WATCHDOG=1 {before} times in the healthy second, {after} in 1.5 s while stuck")
    assert before >= 5 and after == 0
    assert set(problems) == ({"embed"} if stuck == "embed" else {"acquire", "camera"})  # nothing else
    assert delivering == (stuck == "embed")  # a stuck embed leaves the camera delivering
    assert daemon.failed is None
