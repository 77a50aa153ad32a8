"""A real GigE Vision stream: Aravis's camera simulator on 127.0.0.1, read through Aravis.

Needs Debian's aravis-tools and gir1.2-aravis-0.8 and PyGObject (installed by .ci/run);
skipped with the reason where they are absent.
"""

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.acquisition.genicam import CameraError, GenicamSource, _aravis
from pipeline.config import DaemonConfig, GenicamConfig, RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.service.daemon import Daemon

SIMULATOR = shutil.which("arv-fake-gv-camera-0.8")
try:
    _aravis()
    HAVE_ARAVIS = True
except CameraError:
    HAVE_ARAVIS = False

pytestmark = pytest.mark.skipif(
    SIMULATOR is None or not HAVE_ARAVIS, reason="Aravis simulator or PyGObject/Aravis typelib not installed"
)


@pytest.fixture
def fake_camera() -> Iterator[None]:
    proc = subprocess.Popen([str(SIMULATOR), "-i", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(5)


def _camera_cfg() -> GenicamConfig:
    return GenicamConfig(region=(0, 0, 256, 128), frame_rate_hz=100.0, timeout_s=2.0)


def test_blocks_arrive_through_the_protocol(fake_camera: None) -> None:
    src = GenicamSource(cfg=_camera_cfg())
    try:
        blocks = []
        deadline = time.monotonic() + 20
        while len(blocks) < 6 and time.monotonic() < deadline:
            b = src.read(timeout=1.0)
            if b is not None:
                blocks.append(b)
    finally:
        src.close()
    assert len(blocks) == 6, f"only {len(blocks)} buffers in 20 s"
    assert src.width == 256 and src.model
    for b in blocks:
        assert b.pixels.shape == (128, 256) and b.pixels.dtype == np.uint8
        assert b.pixels.std() > 0  # the simulator's test pattern, not an empty buffer
    firsts = [b.first_line for b in blocks]
    assert all(f % 128 == 0 for f in firsts) and firsts == sorted(firsts)


def test_daemon_scores_camera_frames(fake_camera: None, strip_bundle: Path) -> None:
    src_cfg = SourceConfig(kind="genicam", genicam=_camera_cfg())
    cfg = DaemonConfig(
        bundle=strip_bundle,
        frame_lines=512,
        overlap_lines=128,
        threshold=1e9,
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        source=src_cfg,
    )
    daemon = Daemon(
        cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=GenicamSource(cfg=src_cfg.genicam)
    )
    daemon.start()
    deadline = time.monotonic() + 30
    while daemon.stats.snapshot()["counts"].get("frames_scored_total", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    daemon.stop()
    daemon.join()
    assert daemon.failed is None
    assert daemon.stats.snapshot()["counts"]["frames_scored_total"] >= 2


def test_no_camera_is_one_clear_error() -> None:
    with pytest.raises(CameraError, match="camera no-such-camera"):
        GenicamSource(cfg=GenicamConfig(device_id="no-such-camera"))


def test_camera_killed_and_restarted_resumes_without_a_daemon_restart(strip_bundle: Path) -> None:
    def simulator() -> subprocess.Popen:
        p = subprocess.Popen([str(SIMULATOR), "-i", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        return p

    proc = simulator()
    src_cfg = SourceConfig(
        kind="genicam", genicam=GenicamConfig(region=(0, 0, 256, 128), frame_rate_hz=100.0, timeout_s=0.5)
    )
    cfg = DaemonConfig(
        bundle=strip_bundle,
        frame_lines=512,
        overlap_lines=128,
        threshold=1e9,
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        heartbeat_s=0.2,
        camera_stall_s=1.0,
        camera_reconnect_s=2.0,
        camera_backoff_max_s=2.0,
        source=src_cfg,
    )
    source = GenicamSource(cfg=src_cfg.genicam)
    daemon = Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source)

    def scored() -> int:
        return daemon.stats.snapshot()["counts"].get("frames_scored_total", 0)

    def wait(cond: object, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if cond():  # type: ignore[operator]
                return True
            time.sleep(0.1)
        return False

    daemon.start()
    try:
        assert wait(lambda: scored() >= 2, 30)
        proc.terminate()
        proc.wait(5)
        assert wait(lambda: not daemon.camera_online, 10), "camera_offline never reported"
        time.sleep(3.0)  # reopen attempts fail while the camera is away, backing off
        before = scored()
        proc = simulator()
        assert wait(lambda: daemon.camera_online and scored() >= before + 2, 60), "frames did not resume"
    finally:
        daemon.stop()
        daemon.join()
        proc.terminate()
        proc.wait(5)
    counts = daemon.stats.snapshot()["counts"]
    print(f"camera offline {counts.get('camera_offline_total')} time(s), reopened {counts.get('camera_reopens_total')}")
    assert daemon.failed is None and counts["camera_offline_total"] >= 1 and counts["camera_reopens_total"] >= 1
    assert daemon.camera_status()["online"] is True and daemon.camera_status()["reopens"] >= 1
