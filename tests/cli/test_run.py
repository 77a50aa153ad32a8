import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_drains_and_exits_zero(tmp_path: Path, strip_bundle: Path) -> None:
    port = _free_port()
    cfg = {
        "synthetic": {"width": 256, "seed": 3},
        "daemon": {
            "bundle": str(strip_bundle),
            "frame_lines": 512,
            "overlap_lines": 128,
            "threshold": 1e9,
            "pub_endpoint": "tcp://127.0.0.1:*",
            "control_endpoint": "tcp://127.0.0.1:*",
            "queue_frames": 256,
            "metrics_port": port,
            "source": {"kind": "synthetic", "block_lines": 128, "line_rate_hz": 4000},
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    metrics = ""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stripinspect", "run", "--config", str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        assert proc.stderr is not None
        line = ""
        while "running:" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        assert "running:" in line
        time.sleep(3.0)  # a few frames at 4,000 lines/s
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    stats = json.loads(out)
    # Every frame acquired before SIGTERM was scored (the queue is deep enough for the backlog):
    # nothing in flight was lost.
    assert stats["drops"] == {}
    assert stats["counts"]["frames_scored_total"] == stats["counts"]["frames_total"] >= 2
    # Not a terminal, not --quiet: a status line about once a second, one line each.
    status = [line for line in err.splitlines() if " frames/s, " in line]
    assert status and status[-1].startswith("stopped (camera online) | ") and "latency p50" in status[-1]
    # Prometheus metrics were served while running, with the project's prefix and units.
    assert "stripinspect_frames_total" in metrics and "stripinspect_stage_latency_seconds_bucket{" in metrics


def test_bad_bundle_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"daemon": {"bundle": str(tmp_path / "none"), "metrics_port": None}}))
    out = subprocess.run(
        [sys.executable, "-m", "stripinspect", "run", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error:") and "not a bundle" in out.stderr


def test_missing_calibration_exits_nonzero_with_one_line(tmp_path: Path, strip_bundle: Path) -> None:
    path = tmp_path / "c.yaml"
    cfg = {"daemon": {"bundle": str(strip_bundle), "flatfield": str(tmp_path / "flatfield.npz"), "metrics_port": None}}
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "stripinspect", "run", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "flatfield.npz" in last


@pytest.mark.parametrize("key", ["pub_endpoint", "control_endpoint", "metrics_port"])
def test_an_endpoint_in_use_is_one_line_exit_2_and_no_thread_left(
    tmp_path: Path, strip_bundle: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.transport.security import create_keys
    from stripinspect.cli import main

    keys = tmp_path / "keys"
    create_keys(keys, ["plc"])  # CURVE on: its ZAP thread must be stopped too
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        daemon: dict[str, object] = {
            "bundle": str(strip_bundle),
            "frame_lines": 512,
            "overlap_lines": 128,
            "threshold": 1e9,
            "pub_endpoint": "tcp://127.0.0.1:*",
            "control_endpoint": "tcp://127.0.0.1:*",
            "metrics_port": None,
            "curve_keys": str(keys),
            "journal": {"path": str(tmp_path / "alerts.sqlite")},
            "source": {"kind": "synthetic", "block_lines": 128},
        }
        daemon[key] = port if key == "metrics_port" else f"tcp://127.0.0.1:{port}"
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"synthetic": {"width": 256, "seed": 3}, "daemon": daemon}))
        before = set(threading.enumerate())
        code = main(["run", "--config", str(path)])
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert f"daemon.{key}" in err[0] and f"127.0.0.1:{port}" in err[0] and "in use" in err[0]
    assert left == []
