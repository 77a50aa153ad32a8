"""The run workflow: status line, alert lines, --quiet, --log-json (the daemon itself is real)."""

import io
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config
from pipeline.service.run import Console, run


def _snap(frames: int, lines: int, alerts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "state": "running",
        "camera": {"online": True, "state": "online", "width": 1000},
        "counts": {"frames_scored_total": frames, "lines_total": lines, "alerts_total": len(alerts)},
        "drops": {"score:queue_full": 2},
        "latency_seconds": {"end_to_end": {"p50": 0.045, "p95": 0.09, "p99": 0.12}},
        "recent_alerts": alerts,
    }


def _alert(seq: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "md_m": 12.3456,
        "cd_mm": 450.0,
        "length_mm": 3.5,
        "width_mm": 1.0,
        "area_mm2": 2.8,
        "max_score": 4.2,
    }


def test_console_prints_one_status_line_and_one_line_per_alert() -> None:
    out = io.StringIO()
    console = Console(stream=out, tty=False, log_json=False)
    console.update(_snap(0, 0, []), now=100.0)
    console.update(_snap(10, 4000, [_alert(1), _alert(2)]), now=101.0)
    console.update(_snap(20, 8000, [_alert(1), _alert(2)]), now=102.0)  # no alert printed twice
    lines = out.getvalue().splitlines()
    assert lines[1] == "alert 1: MD 12.346 m, CD 450.0 mm, 3.5 x 1.0 mm (2.8 mm2), score 4.20"
    assert [line.startswith("alert ") for line in lines] == [False, True, True, False, False]
    assert lines[-1] == (
        "running (camera online) | 10.0 frames/s, 4.00 Mpx/s | alerts 2 | drops 2 | latency p50 45 ms p99 120 ms"
    )


def test_console_on_a_terminal_redraws_the_status_line_in_place() -> None:
    out = io.StringIO()
    console = Console(stream=out, tty=True, log_json=False)
    console.update(_snap(0, 0, []), now=0.0)
    console.update(_snap(1, 400, [_alert(7)]), now=1.0)
    console.close()
    text = out.getvalue()
    assert text.count("\n") == 2  # the alert line, and the final newline after the status line
    assert "\r\x1b[Kalert 7:" in text and text.count("\r\x1b[Krunning") == 2


@pytest.mark.parametrize("mode", ["log_json", "quiet"])
def test_run_drains_a_finite_strip_and_prints_the_summary(strip_bundle: Path, tmp_path: Path, mode: str) -> None:
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
                "metrics_port": None,
                "queue_frames": 64,
                "journal": {"path": str(tmp_path / "alerts.sqlite")},
                # 8 frames at 3,000 lines/s: about a second of strip, then the source ends.
                "source": {"kind": "synthetic", "block_lines": 128, "line_rate_hz": 3000, "strip_lines": 128 + 8 * 384},
            },
        }
    )
    err, out = io.StringIO(), io.StringIO()
    code = run(cfg, quiet=mode == "quiet", log_json=mode == "log_json", err=err, out=out)
    assert code == 0
    summary = json.loads(out.getvalue())
    assert summary["counts"]["frames_scored_total"] == 8 and summary["drops"] == {}
    lines = err.getvalue().splitlines()
    if mode == "quiet":
        assert lines == []  # nothing went wrong: no warnings, no errors
        return
    records = [json.loads(line) for line in lines]  # every line one JSON object
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("running: PUB tcp://127.0.0.1:") for r in records)
    status = [r for r in records if r.get("event") == "status"]
    assert status and {"frames_per_s", "mpx_per_s", "alerts", "drops", "e2e_p50_ms", "e2e_p99_ms"} <= set(status[-1])


def test_console_rates_are_taken_over_a_few_seconds() -> None:
    # A line at 1.5 frames/s delivers 1 or 2 frames in any one second; the status line must not
    # flicker between the two.
    console = Console(stream=io.StringIO(), tty=False, log_json=False)
    frames = 0
    rates = []
    for second in range(12):
        rates.append(console.status(_snap(frames, frames * 640, []), now=100.0 + second)["frames_per_s"])
        frames += 1 if second % 2 else 2
    assert rates[0] == 0.0
    assert all(1.3 <= r <= 1.7 for r in rates[5:]), rates
    assert console.status(_snap(frames, frames * 640, []), now=112.0)["mpx_per_s"] == pytest.approx(
        1.5 * 640 * 1000 / 1e6, rel=0.15
    )
