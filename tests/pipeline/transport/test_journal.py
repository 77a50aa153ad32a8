"""Nothing lost: alerts journaled in SQLite before publishing, fetched back by sequence number."""

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from pipeline.acquisition.sources import SyntheticSource
from pipeline.config import JournalConfig, RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.service.daemon import Daemon
from pipeline.transport.journal import AlertJournal, JournalError
from pipeline.transport.listen import deadline, fetch_alerts, listen
from tests.conftest import loopback_daemon_config
from tests.pipeline.service.test_daemon import FRAME, OVERLAP, WIDTH, _threshold


def test_numbers_continue_across_reopening_and_pruning_keeps_the_bounds(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    j = AlertJournal(path=path, max_rows=100, max_age_s=3600)
    seqs = j.append([{"n": i} for i in range(3)])
    assert seqs == [1, 2, 3]
    j.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    j = AlertJournal(path=path, max_rows=100, max_age_s=3600)
    assert j.last_seq == 3 and [h["seq"] for h in j.after(1, 10)] == [2, 3]
    for _ in range(70):
        j.append([{"n": 0}, {"n": 1}])
    j.prune()
    assert j.last_seq == 143 and j.first_seq() == 44  # the newest 100 kept
    assert [h["seq"] for h in j.after(0, 3)] == [44, 45, 46]
    j.close()
    old = AlertJournal(path=tmp_path / "old.sqlite", max_rows=100, max_age_s=0.05)
    old.append([{"n": 1}])
    time.sleep(0.1)
    old.append([{"n": 2}])
    old.prune()
    assert [h["n"] for h in old.after(0, 10)] == [2]  # older than max_age is gone
    # Pruning never gives a number out twice, even when every row is gone.
    assert old.append([{"n": 3}]) == [3]


def test_a_broken_journal_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match="cannot open alert journal"):
        AlertJournal(path=bad, max_rows=10, max_age_s=10)
    newer = tmp_path / "newer.sqlite"
    AlertJournal(path=newer, max_rows=10, max_age_s=10).close()
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(JournalError, match="journal schema 99"):
        AlertJournal(path=newer, max_rows=10, max_age_s=10)


def _daemon(bundle: Path, journal: Path, strip_frames: int, first_line: int, rate: float | None) -> Daemon:
    step = FRAME - OVERLAP
    src = SourceConfig(
        block_lines=128,
        strip_lines=OVERLAP + strip_frames * step,
        first_line=first_line,
        defects_per_100_frames=300,
        roll_period_lines=None,
        line_rate_hz=rate,
    )
    cfg = loopback_daemon_config(
        bundle=bundle,
        frame_lines=FRAME,
        overlap_lines=OVERLAP,
        threshold=_threshold(bundle),
        min_area_px=8,
        heartbeat_s=0.1,
        queue_frames=1000,
        source=src,
        journal=JournalConfig(path=journal),
    )
    source = SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME)
    return Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source, context=zmq.Context())


def test_a_listener_restarted_mid_stream_gets_every_alert_exactly_once(strip_bundle: Path, tmp_path: Path) -> None:
    daemon = _daemon(strip_bundle, tmp_path / "alerts.sqlite", strip_frames=24, first_line=300_000, rate=2000.0)
    ctx = daemon._context
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []
    joined = threading.Event()

    def listener_a() -> None:
        def on(topic: str, h: dict[str, Any]) -> None:
            joined.set()
            if topic == "alert":
                first.append(h)

        box["a"] = listen(
            endpoint=daemon.publisher.endpoint,
            topics=("alert", "heartbeat"),
            on_message=on,
            stop=lambda: len(first) >= 4,  # killed after a few alerts, mid-stream
            context=ctx,
        )

    box: dict[str, Any] = {}
    a = threading.Thread(target=listener_a)
    daemon.start(acquire=False)
    a.start()
    assert joined.wait(10)
    daemon.start_acquisition()
    a.join(60)
    time.sleep(1.0)  # the daemon goes on alerting while nobody listens
    report_b = listen(
        endpoint=daemon.publisher.endpoint,
        topics=("alert",),
        on_message=lambda t, h: second.append(h),
        stop=deadline(120),
        context=ctx,
        control_endpoint=daemon.control_endpoint,
        since=box["a"].last_alert,
    )
    daemon.join()
    total = daemon.stats.snapshot()["counts"].get("alerts_total", 0)
    journaled = daemon.journal is not None and AlertJournal(
        path=tmp_path / "alerts.sqlite", max_rows=10**6, max_age_s=1e9
    ).after(0, 10**6)
    ctx.term()
    seqs_a = [h["seq"] for h in first]
    seqs_b = [h["seq"] for h in second]
    print(
        f"{total} alerts: {len(seqs_a)} live to A, {report_b.recovered} recovered + "
        f"{len(seqs_b) - report_b.recovered} live to B"
    )
    assert total >= 12 and report_b.recovered >= 1 and report_b.gaps == []
    assert len(set(seqs_b)) == len(seqs_b) and not set(seqs_a) & set(seqs_b)  # no duplicates
    assert sorted(seqs_a + seqs_b) == list(range(1, total + 1))  # nothing lost
    assert journaled and [h["seq"] for h in journaled] == list(range(1, total + 1))
    # What was fetched is what was published: the same headers, publish time included.
    assert {h["seq"]: h for h in journaled}[seqs_b[0]] == second[0]


def test_alert_numbers_survive_a_daemon_restart(strip_bundle: Path, tmp_path: Path) -> None:
    journal = tmp_path / "alerts.sqlite"
    counts = []
    for run, first_line in enumerate((500_000, 600_000)):
        daemon = _daemon(strip_bundle, journal, strip_frames=4, first_line=first_line, rate=None)
        daemon.run_until_done()
        counts.append(daemon.stats.snapshot()["counts"].get("alerts_total", 0))
        daemon._context.term()
        assert counts[-1] >= 1, f"run {run} raised no alert"
    j = AlertJournal(path=journal, max_rows=10**6, max_age_s=1e9)
    assert [h["seq"] for h in j.after(0, 10**6)] == list(range(1, sum(counts) + 1))


def test_replay_answers_and_refuses_over_the_control_socket(strip_bundle: Path, tmp_path: Path) -> None:
    daemon = _daemon(strip_bundle, tmp_path / "alerts.sqlite", strip_frames=4, first_line=700_000, rate=None)
    ctx = daemon._context
    daemon.run_until_done()
    # run_until_done closed the sockets; a second daemon on the same journal serves the replay.
    daemon2 = _daemon(strip_bundle, tmp_path / "alerts.sqlite", strip_frames=1, first_line=800_000, rate=None)
    daemon2.start(acquire=False)
    try:
        alerts, pruned = fetch_alerts(control_endpoint=daemon2.control_endpoint, after=0, context=ctx)
        assert len(alerts) == daemon.stats.snapshot()["counts"]["alerts_total"] and not pruned
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 5000)
        req.connect(daemon2.control_endpoint)
        req.send_json({"cmd": "replay", "after": -3})
        rep = req.recv_json()
        req.close(0)
        assert rep["ok"] is False and "after must be an integer >= 0" in rep["error"]
    finally:
        daemon2.stop()
        daemon2.join()
        ctx.term()
        daemon2._context.term()
