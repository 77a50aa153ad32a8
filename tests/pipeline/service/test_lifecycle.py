"""Start, liveness and shutdown at their edges: wiring that fails, stages stuck at shutdown, a
console that raises, a stage that hangs before its first beat, a camera not (yet, any more) read."""

import io
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from pipeline.acquisition.sources import SyntheticSource
from pipeline.config import Config, RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.service import daemon as daemon_module
from pipeline.service import run as run_module
from pipeline.service import slot as slot_module
from pipeline.service.daemon import Daemon
from pipeline.transport.security import create_keys
from tests.conftest import loopback_daemon_config
from tests.pipeline.service.test_faults import _NotifySocket, notify_socket  # noqa: F401 (a fixture)

WIDTH, FRAME, OVERLAP = 256, 768, 384


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _source(*, strip_lines: int | None, line_rate_hz: float | None = 4000) -> SyntheticSource:
    src = SourceConfig(
        block_lines=128, line_rate_hz=line_rate_hz, plant_defects=False, strip_lines=strip_lines, first_line=0
    )
    return SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME)


def _daemon(bundle: Path, ctx: zmq.Context, source: SyntheticSource | None = None, **overrides: Any) -> Daemon:
    cfg = loopback_daemon_config(bundle=bundle, frame_lines=FRAME, overlap_lines=OVERLAP, **overrides)
    source = source if source is not None else _source(strip_lines=None)
    return Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source, context=ctx)


def _scored(daemon: Daemon) -> int:
    return int(daemon.stats.snapshot()["counts"].get("frames_scored_total", 0))


def _wait_scored(daemon: Daemon, n: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while _scored(daemon) < n and time.monotonic() < end:
        time.sleep(0.05)
    assert _scored(daemon) >= n


def _thread(daemon: Daemon, name: str) -> threading.Thread:
    return next(t for t in daemon._threads if t.name == f"stripinspect-{name}")


class _ClosingSource(SyntheticSource):
    def __init__(self) -> None:
        src = SourceConfig(block_lines=128, line_rate_hz=4000, plant_defects=False, strip_lines=None, first_line=0)
        super().__init__(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        super().close()


def test_a_failure_while_wiring_closes_everything_opened(
    strip_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    create_keys(keys, ["plc"])
    pub, control = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"

    def broken(**kwargs: Any) -> Any:
        raise ValueError("wiring failed")

    monkeypatch.setattr(daemon_module, "HealthLoop", broken)  # the last thing _wire builds
    before = set(threading.enumerate())
    ctx = zmq.Context()
    source = _ClosingSource()
    with pytest.raises(ValueError, match="wiring failed"):
        _daemon(strip_bundle, ctx, source, curve_keys=keys, pub_endpoint=pub, control_endpoint=control)
    time.sleep(0.2)  # the ZAP thread ends on its own once told
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert source.closed and left == []
    for endpoint in (pub, control):  # free to bind again
        s = ctx.socket(zmq.REP)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(endpoint)
        s.close(0)
    ctx.term()


def test_join_gives_control_its_own_time_and_closes_no_socket_a_running_thread_uses(
    strip_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = zmq.Context()
    daemon = _daemon(strip_bundle, ctx)
    hang, release = threading.Event(), threading.Event()
    real_features = daemon.frame_scorer.features

    def features(pixels: Any) -> Any:  # an ONNX call that does not return until released
        if hang.is_set():
            release.wait()
        return real_features(pixels)

    daemon.frame_scorer.features = features  # type: ignore[method-assign]
    real_open = slot_module.open_frame_scorer

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(3.0)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(slot_module, "open_frame_scorer", slow)
    daemon.start()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 20_000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(daemon.control_endpoint)
    try:
        _wait_scored(daemon, 1)
        hang.set()
        req.send_json({"cmd": "reload"})  # a slow load in progress on the control thread
        time.sleep(0.5)
        daemon.stop()
        with caplog.at_level(logging.ERROR, logger="stripinspect"):
            daemon.join(timeout=1.0)  # embed is stuck: score and publish wait for it
        control_alive = _thread(daemon, "control").is_alive()
        reply = req.recv_json()
        pub_open = not daemon.publisher._sock.closed
    finally:
        release.set()
        req.close(0)
    for t in [*daemon._threads, *threading.enumerate()]:
        if t.name.startswith("stripinspect-"):
            t.join(30)
    daemon.close()  # what was left open for a running thread
    ctx.term()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not control_alive and daemon.failed is None
    assert isinstance(reply, dict) and reply["ok"] is False and "stopping" in reply["error"]
    assert pub_open and any("PUB socket" in e and "stripinspect-publish" in e for e in errors), errors
    assert daemon.publisher._sock.closed


def test_run_stops_the_daemon_when_the_console_raises(
    strip_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class BrokenConsole(run_module.Console):
        def update(self, snap: dict[str, Any], now: float) -> None:
            raise RuntimeError("console broke")

    monkeypatch.setattr(run_module, "Console", BrokenConsole)
    port = _free_port()
    cfg = Config.model_validate(
        {
            "synthetic": {"width": 256, "seed": 3},
            "daemon": {
                "bundle": str(strip_bundle),
                "frame_lines": 512,
                "overlap_lines": 128,
                "threshold": 1e9,
                "pub_endpoint": "tcp://127.0.0.1:*",
                "control_endpoint": "tcp://127.0.0.1:*",
                "metrics_port": port,
                "metrics_addr": "127.0.0.1",
                "journal": {"path": str(tmp_path / "alerts.sqlite")},
                "source": {"kind": "synthetic", "block_lines": 128, "line_rate_hz": 3000},  # endless
            },
        }
    )
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="console broke"):
        run_module.run(cfg, quiet=False, log_json=True, err=io.StringIO(), out=io.StringIO())
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert [n for n in left if n.startswith("stripinspect-")] == []
    with socket.socket() as s:  # the metrics server is gone too
        s.bind(("127.0.0.1", port))


def test_a_stage_that_hangs_before_its_first_beat_is_stuck(
    strip_bundle: Path,
    notify_socket: _NotifySocket,  # noqa: F811
) -> None:
    ctx = zmq.Context()
    daemon = _daemon(strip_bundle, ctx, heartbeat_s=0.1, stage_stuck_s=0.5)
    release = threading.Event()
    i = next(k for k, (name, _) in enumerate(daemon._stages) if name == "embed")
    real = daemon._stages[i][1]

    def embed() -> None:  # hangs before its loop ever beats (an import, a first ONNX call)
        release.wait()
        real()

    daemon._stages[i] = ("embed", embed)
    daemon.start()
    try:
        t0 = time.monotonic()
        time.sleep(1.5)
        problems = daemon._health.problems()
        stuck = (t0 + 1.0, t0 + 1.4)  # past the bound (and a datagram recorded late), before the release
        release.set()
        _wait_scored(daemon, 2)
        time.sleep(0.5)
        t1 = time.monotonic()
        time.sleep(0.5)
        healthy = (t1, time.monotonic())
    finally:
        release.set()
        daemon.stop()
        daemon.join()
        ctx.term()
    assert set(problems) == {"embed"}
    assert notify_socket.watchdogs(*stuck) == 0
    assert notify_socket.watchdogs(*healthy) >= 3  # fed again once it runs
    assert daemon.failed is None


def test_the_camera_is_not_watched_before_acquisition_starts(
    strip_bundle: Path,
    notify_socket: _NotifySocket,  # noqa: F811
) -> None:
    ctx = zmq.Context()
    daemon = _daemon(strip_bundle, ctx, heartbeat_s=0.1, stage_stuck_s=0.5)
    daemon.start(acquire=False)
    try:
        t0 = time.monotonic()
        time.sleep(1.5)  # three stuck bounds, waiting for the line to start
        waiting = (t0 + 0.8, time.monotonic())
        daemon.start_acquisition()
        _wait_scored(daemon, 1)
    finally:
        daemon.stop()
        daemon.join()
        ctx.term()
    assert notify_socket.watchdogs(*waiting) >= 5
    assert daemon.failed is None


def test_the_camera_is_not_watched_once_the_acquire_stage_has_finished(strip_bundle: Path) -> None:
    # After the source ends, acquire still hands on its END marker (waiting for room in the
    # queue) while the camera is read no more: its progress stops, and that is not a fault.
    ctx = zmq.Context()
    source = _source(strip_lines=OVERLAP + 4 * (FRAME - OVERLAP), line_rate_hz=None)
    daemon = _daemon(strip_bundle, ctx, source, stage_stuck_s=0.3)
    daemon.start()
    try:
        acquire = _thread(daemon, "acquire")
        acquire.join(60)
        assert not acquire.is_alive()
        time.sleep(0.5)  # past the stuck bound since the last read
        problems = daemon._health.problems()
        daemon.wait(60)
    finally:
        daemon.stop()
        daemon.join()
        ctx.term()
    assert "camera" not in problems, problems
    assert daemon.failed is None and _scored(daemon) == 4
