"""The control socket under bad requests, bad bundles and slow loads (real daemon, real ZeroMQ)."""

import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from pipeline.acquisition.sources import SyntheticSource
from pipeline.config import RecipeConfig, RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.service import slot as slot_module
from pipeline.service.daemon import Daemon
from pipeline.service.run import signals_to
from tests.conftest import loopback_daemon_config
from tests.pipeline.service.test_faults import _NotifySocket, notify_socket  # noqa: F401 (a fixture)

WIDTH, FRAME, OVERLAP = 256, 768, 384


def _daemon(bundle: Path, ctx: zmq.Context, **overrides: Any) -> Daemon:
    """An endless paced strip (about 10 frames/s, light on two cores)."""
    src = SourceConfig(block_lines=128, line_rate_hz=4000, plant_defects=False, strip_lines=None, first_line=0)
    cfg = loopback_daemon_config(bundle=bundle, frame_lines=FRAME, overlap_lines=OVERLAP, source=src, **overrides)
    source = SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME)
    return Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source, context=ctx)


def _client(ctx: zmq.Context, daemon: Daemon) -> zmq.Socket:
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 20_000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(daemon.control_endpoint)
    return req


def _ask(req: zmq.Socket, msg: Any) -> dict[str, Any]:
    req.send(json.dumps(msg).encode())
    reply = req.recv_json()
    assert isinstance(reply, dict)
    return reply


def _scored(daemon: Daemon) -> int:
    return int(daemon.stats.snapshot()["counts"].get("frames_scored_total", 0))


def _wait_scored(daemon: Daemon, n: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while _scored(daemon) < n and time.monotonic() < end:
        time.sleep(0.05)
    assert _scored(daemon) >= n, f"only {_scored(daemon)} frames scored"


def _still_scoring(daemon: Daemon, req: zmq.Socket) -> None:
    status = _ask(req, {"cmd": "status"})
    assert status["ok"] is True and status["state"] == "running"
    _wait_scored(daemon, _scored(daemon) + 2)
    assert daemon.failed is None and all(t.is_alive() for t in daemon._threads)


def test_bad_requests_are_answered_and_the_daemon_keeps_running(
    strip_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = zmq.Context()
    daemon = _daemon(strip_bundle, ctx)
    daemon.start()
    req = _client(ctx, daemon)
    try:
        _wait_scored(daemon, 1)
        for bad in (
            {"cmd": "reload", "bundle": 5},
            {"cmd": "reload", "bundle": ["/tmp/b"]},
            {"cmd": "reload", "bundle": {"path": "b"}},
            {"cmd": "reload", "threshold": "high"},
            {"cmd": "recipe", "name": [1]},
            {"cmd": "replay", "after": "x"},
            {"cmd": ["status"]},
            [1, 2],
        ):
            reply = _ask(req, bad)
            assert reply["ok"] is False and reply["error"], bad
            assert not reply["error"].startswith("internal error"), reply  # refused, not a crash
        assert "bundle must be a path" in _ask(req, {"cmd": "reload", "bundle": 5})["error"]

        def bug(value: object) -> dict[str, Any]:
            raise KeyError("a bug in a handler")

        monkeypatch.setattr(daemon.slot, "set_threshold", bug)
        with caplog.at_level(logging.ERROR, logger="stripinspect"):
            for _ in range(3):
                reply = _ask(req, {"cmd": "reload", "threshold": 5.0})
                assert reply["ok"] is False and reply["error"].startswith("internal error: KeyError")
        logged = [r for r in caplog.records if "control request" in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None  # logged once (rate-limited), with the trace
        _still_scoring(daemon, req)
    finally:
        req.close(0)
        daemon.stop()
        daemon.join()
        ctx.term()
    assert daemon.failed is None


def test_reload_and_recipe_refuse_a_bundle_fitted_on_other_channels(strip_bundle: Path, tmp_path: Path) -> None:
    rgb = tmp_path / "rgb_bundle"
    shutil.copytree(strip_bundle, rgb)
    manifest = json.loads((rgb / "manifest.json").read_text())
    manifest["input"]["channels"] = 3
    (rgb / "manifest.json").write_text(json.dumps(manifest))
    ctx = zmq.Context()
    daemon = _daemon(
        strip_bundle,
        ctx,
        recipes={
            "grey": RecipeConfig(bundle=strip_bundle, threshold=1e9),
            "rgb": RecipeConfig(bundle=rgb, threshold=1e9),
        },
        recipe="grey",
    )
    running = daemon.frame_scorer
    daemon.start()
    req = _client(ctx, daemon)
    try:
        _wait_scored(daemon, 1)
        reply = _ask(req, {"cmd": "reload", "bundle": str(rgb)})
        assert (
            reply["ok"] is False
            and "camera delivers 1 channel(s)" in reply["error"]
            and "fitted on 3" in reply["error"]
        )
        reply = _ask(req, {"cmd": "recipe", "name": "rgb"})
        assert reply["ok"] is False and "fitted on 3" in reply["error"]
        _still_scoring(daemon, req)
        assert daemon.frame_scorer is running and daemon.cfg.recipe == "grey"
    finally:
        req.close(0)
        daemon.stop()
        daemon.join()
        ctx.term()
    assert not any(k.startswith("embed") for k in daemon.stats.snapshot()["drops"])


def test_a_slow_reload_keeps_the_watchdog_fed(
    strip_bundle: Path,
    notify_socket: _NotifySocket,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = zmq.Context()
    daemon = _daemon(strip_bundle, ctx, heartbeat_s=0.1, stage_stuck_s=0.5)
    real = slot_module.open_frame_scorer

    def slow(*args: Any, **kwargs: Any) -> Any:  # hashing a large bundle, a slow ONNX session
        time.sleep(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(slot_module, "open_frame_scorer", slow)
    daemon.start()
    req = _client(ctx, daemon)
    try:
        _wait_scored(daemon, 1)
        t0 = time.monotonic()
        reply = _ask(req, {"cmd": "reload"})
        t1 = time.monotonic()
        _still_scoring(daemon, req)
    finally:
        req.close(0)
        daemon.stop()
        daemon.join()
        ctx.term()
    fed = notify_socket.watchdogs(t0 + 0.8, t1)  # past the stuck bound, still loading
    print(f"reload took {t1 - t0:.1f} s; WATCHDOG=1 {fed} times after the stuck bound")
    assert reply == {"ok": True, "bundle": str(strip_bundle)} and t1 - t0 >= 2.0
    assert fed >= 5  # about every 0.1 s
    assert daemon.failed is None


def test_sighup_only_asks_and_the_control_thread_reloads(strip_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert threading.current_thread() is threading.main_thread()
    ctx = zmq.Context()
    daemon = _daemon(strip_bundle, ctx)
    real = slot_module.open_frame_scorer
    loaded_on: list[str] = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        loaded_on.append(threading.current_thread().name)
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(slot_module, "open_frame_scorer", slow)
    running = daemon.frame_scorer
    daemon.start()
    try:
        _wait_scored(daemon, 1)
        with signals_to(daemon):
            t0 = time.monotonic()
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)  # the handler runs on the main thread at the next bytecode
            in_handler = time.monotonic() - t0
            end = time.monotonic() + 30
            while daemon.frame_scorer is running and time.monotonic() < end:
                time.sleep(0.05)
    finally:
        daemon.stop()
        daemon.join()
        ctx.term()
    assert in_handler < 1.0, f"the signal handler took {in_handler:.1f} s"
    assert loaded_on and loaded_on[0] != "MainThread"
    assert daemon.frame_scorer is not running  # reloaded and swapped in between frames
    assert daemon.failed is None


def test_a_load_that_raises_is_refused_and_the_running_model_stays(
    strip_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = zmq.Context()
    daemon = _daemon(strip_bundle, ctx)
    running = daemon.frame_scorer
    daemon.start()
    req = _client(ctx, daemon)
    try:
        _wait_scored(daemon, 1)
        for err in (RuntimeError("onnxruntime: cannot create session"), ValueError("warm-up: bad shape")):

            def broken(*args: Any, _err: Exception = err, **kwargs: Any) -> Any:
                raise _err

            monkeypatch.setattr(slot_module, "open_frame_scorer", broken)
            reply = _ask(req, {"cmd": "reload"})
            assert reply["ok"] is False and reply["error"] == f"{type(err).__name__}: {err}"
        _still_scoring(daemon, req)
        assert daemon.frame_scorer is running
    finally:
        req.close(0)
        daemon.stop()
        daemon.join()
        ctx.term()
    assert daemon.failed is None
