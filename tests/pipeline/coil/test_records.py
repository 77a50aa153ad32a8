"""Coil records in real SQLite files under tmp_path: coils, merged defects, cursors, thumbnails,
retention, and a writer killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.coil.model import CoilDefect, CoilInfo, Grading, PeriodicFamily, RuleOutcome, Uninspected
from pipeline.coil.records import CoilRecords, RecordsError, coil_dir_name
from pipeline.transport.journal import AlertJournal
from tests.conftest import REPO

NOW = time.time()
DAY = 86_400.0


def _records(tmp_path: Path, **kwargs: object) -> CoilRecords:
    return CoilRecords(path=tmp_path / "records" / "coils.sqlite", **kwargs)  # type: ignore[arg-type]


def _open(r: CoilRecords, coil_id: str = "C1", *, grade: str = "DC01", started: float = NOW) -> None:
    r.open_coil(CoilInfo(coil_id=coil_id, grade=grade, head_line=1000, width_mm=1250.0), started_utc=started)


def _d(
    *,
    coil: str = "C1",
    side: str = "top",
    md_m: float = 5.0,
    cd_mm: float = 500.0,
    length_mm: float = 10.0,
    width_mm: float = 10.0,
    area: float = 40.0,
    score: float = 1.0,
) -> CoilDefect:
    return CoilDefect(
        coil_id=coil,
        side=side,
        md_m=md_m,
        cd_mm=cd_mm,
        length_mm=length_mm,
        width_mm=width_mm,
        area_mm2=area,
        score=score,
        cameras=(),
        sources=(),
    )


def _add(r: CoilRecords, d: CoilDefect, camera: str, seq: int, png: bytes | None = None) -> CoilDefect | None:
    return r.add_defect(d, camera=camera, seq=seq, merge_mm=10.0, thumbnail_png=png)


def _png(value: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((8, 8), value, np.uint8))
    assert ok
    return buf.tobytes()


def _rows(r: CoilRecords, table: str, coil_id: str) -> int:
    with sqlite3.connect(r.path) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table} WHERE coil_id = ?", (coil_id,)).fetchone()[0])


def test_open_and_close_are_idempotent_and_a_closed_coil_cannot_reopen(tmp_path: Path) -> None:
    r = _records(tmp_path)
    _open(r, "C1", started=NOW - 10)
    _open(r, "C1", grade="S355", started=NOW)  # a second start (another camera, a replay): nothing changes
    _open(r, "C2", started=NOW - 5)
    c1 = r.coil("C1")
    assert c1 is not None and c1.state == "open" and c1.info.grade == "DC01" and c1.started_utc == NOW - 10
    assert c1.ended_utc is None and c1.length_m is None and c1.info.tail_line is None and c1.defect_count == 0
    assert [c.info.coil_id for c in r.coils()] == ["C2", "C1"]  # newest first
    assert [c.info.coil_id for c in r.coils(limit=1)] == ["C2"]
    r.close_coil("C1", tail_line=900_000, length_m=812.5, ended_utc=NOW)
    r.close_coil("C1", tail_line=1, length_m=1.0, ended_utc=NOW + 99)  # again: nothing changes
    c1 = r.coil("C1")
    assert c1 is not None and c1.state == "closed" and c1.ended_utc == NOW and c1.length_m == 812.5
    assert c1.info.tail_line == 900_000 and c1.info.head_line == 1000 and c1.info.width_mm == 1250.0
    assert [c.info.coil_id for c in r.coils(open_only=True)] == ["C2"]
    with pytest.raises(RecordsError, match="coil 'C1' is closed; a closed coil cannot be opened again"):
        _open(r, "C1")
    with pytest.raises(RecordsError, match="coil 'nope' is not known"):
        r.close_coil("nope", tail_line=1, length_m=1.0, ended_utc=NOW)
    with pytest.raises(RecordsError, match="tail_line 5 is before head_line 1000"):
        r.close_coil("C2", tail_line=5, length_m=1.0, ended_utc=NOW)
    # Alerts for a closed or unknown coil are refused, and the cursor stays where it was.
    with pytest.raises(RecordsError, match="coil 'C1' is closed; its defects cannot be stored"):
        _add(r, _d(coil="C1"), "cam0", 1)
    with pytest.raises(RecordsError, match="coil 'C9' is not known"):
        _add(r, _d(coil="C9"), "cam0", 1)
    assert r.cursor("cam0") == 0 and r.coil("C9") is None
    r.close()
    with pytest.raises(RecordsError, match="are closed"):
        r.coils()


def test_two_cameras_in_their_overlap_are_one_defect_with_the_larger_area(tmp_path: Path) -> None:
    r = _records(tmp_path)
    _open(r)
    first = _add(r, _d(cd_mm=500.0, area=40.0, score=2.0), "cam0", 1)  # CD box [495, 505]
    merged = _add(r, _d(cd_mm=513.0, area=60.0, score=1.5), "cam1", 7)  # CD box [508, 518]: 3 mm away
    assert first is not None and merged is not None
    assert merged.defect_id == first.defect_id
    assert merged.cameras == ("cam0", "cam1") and merged.sources == ("cam0:1", "cam1:7")
    assert merged.area_mm2 == 60.0 and merged.score == 2.0  # two views of one defect: the larger, not the sum
    assert merged.cd_mm == pytest.approx(506.5) and merged.width_mm == pytest.approx(23.0)
    assert merged.md_m == pytest.approx(5.0) and merged.length_mm == pytest.approx(10.0)
    assert r.defects("C1") == [merged]
    assert r.cursor("cam0") == 1 and r.cursor("cam1") == 7
    c = r.coil("C1")
    assert c is not None and c.defect_count == 1


def test_a_frame_border_split_of_one_camera_adds_the_areas(tmp_path: Path) -> None:
    r = _records(tmp_path)
    _open(r)
    _add(r, _d(md_m=5.000, length_mm=20.0, area=30.0), "cam0", 1)  # MD box [4990, 5010] mm
    merged = _add(r, _d(md_m=5.025, length_mm=20.0, area=25.0), "cam0", 2)  # [5015, 5035]: 5 mm on
    assert merged is not None
    assert merged.area_mm2 == 55.0 and merged.cameras == ("cam0",)
    assert merged.md_m == pytest.approx(5.0125) and merged.length_mm == pytest.approx(45.0)
    assert len(r.defects("C1")) == 1


def test_no_merge_beyond_merge_mm_across_sides_or_across_coils(tmp_path: Path) -> None:
    r = _records(tmp_path)
    _open(r, "C1")
    _open(r, "C2")
    _add(r, _d(cd_mm=500.0), "cam0", 1)  # CD [495, 505]
    _add(r, _d(cd_mm=521.0), "cam1", 1)  # CD [516, 526]: 11 mm away
    _add(r, _d(cd_mm=500.0, side="bottom"), "cam2", 1)  # same place, other side
    _add(r, _d(cd_mm=500.0, coil="C2"), "cam0", 2)  # same place, other coil
    _add(r, _d(md_m=5.021, cd_mm=500.0), "cam0", 3)  # MD [5016, 5026] mm: 11 mm past the first
    assert len(r.defects("C1")) == 4 and len(r.defects("C2")) == 1
    assert all(len(d.cameras) == 1 for d in r.defects("C1"))
    # Exactly merge_mm apart still merges.
    _add(r, _d(cd_mm=300.0), "cam0", 4)  # CD [295, 305]
    merged = _add(r, _d(cd_mm=320.0), "cam1", 2)  # CD [315, 325]: 10 mm
    assert merged is not None and merged.cameras == ("cam0", "cam1") and len(r.defects("C1")) == 5
    _add(r, _d(md_m=8.0, cd_mm=800.0), "cam0", 5)  # MD [7995, 8005] mm
    merged = _add(r, _d(md_m=8.25, length_mm=470.0, cd_mm=800.0), "cam1", 3)  # MD [8015, 8485]: 10 mm
    assert merged is not None and merged.cameras == ("cam0", "cam1") and len(r.defects("C1")) == 6


def test_a_chain_of_three_becomes_one_and_the_grown_box_reaches_further(tmp_path: Path) -> None:
    r = _records(tmp_path)
    _open(r)
    a = _add(r, _d(cd_mm=100.0, area=10.0), "cam0", 1)  # CD [95, 105]
    c = _add(r, _d(cd_mm=140.0, area=20.0), "cam0", 2)  # CD [135, 145]: 30 mm from a, apart
    assert a is not None and c is not None and len(r.defects("C1")) == 2
    b = _add(r, _d(cd_mm=120.0, area=30.0, score=5.0), "cam0", 3)  # CD [115, 125]: 10 mm from each
    assert b is not None and r.defects("C1") == [b]
    assert b.defect_id == a.defect_id and b.sources == ("cam0:1", "cam0:2", "cam0:3")
    assert b.area_mm2 == 60.0 and b.score == 5.0 and b.width_mm == pytest.approx(50.0)

    # d is out of reach of both e and the new view n, but within reach of their union: n reaches e
    # along MD and CD, the union spans e's CD and n's MD, and d sits next to that corner.
    _add(r, _d(md_m=20.005, cd_mm=5.0, area=1.0), "cam0", 4)  # e: MD [20000, 20010], CD [0, 10]
    _add(r, _d(md_m=20.035, cd_mm=-10.0, area=2.0), "cam0", 5)  # d: MD [20030, 20040], CD [-15, -5]
    assert len(r.defects("C1")) == 3
    n = _add(r, _d(md_m=20.020, cd_mm=20.0, area=4.0), "cam1", 1)  # n: MD [20015, 20025], CD [15, 25]
    assert n is not None and len(r.defects("C1")) == 2
    assert n.sources == ("cam0:4", "cam0:5", "cam1:1") and n.cameras == ("cam0", "cam1")
    assert n.area_mm2 == 4.0  # e + d (one camera's pieces) = 3, against n from the other camera: the larger
    assert n.md_m * 1000 - n.length_mm / 2 == pytest.approx(20000.0)
    assert n.md_m * 1000 + n.length_mm / 2 == pytest.approx(20040.0)


def test_replayed_alerts_are_ignored_by_the_cursor_across_reopening(tmp_path: Path) -> None:
    r = _records(tmp_path)
    _open(r)
    for seq in (1, 2, 3):
        assert _add(r, _d(md_m=float(seq)), "cam0", seq) is not None
    assert _add(r, _d(md_m=50.0), "cam0", 2) is None  # a replay after a gap: already stored
    assert len(r.defects("C1")) == 3 and r.cursor("cam0") == 3 and r.cursor("cam1") == 0
    r.advance_cursor("cam0", 10)  # alerts the service skipped
    r.advance_cursor("cam0", 4)  # never back
    assert r.cursor("cam0") == 10
    r.close()
    r = _records(tmp_path)
    assert r.cursor("cam0") == 10
    assert _add(r, _d(md_m=60.0), "cam0", 7) is None
    assert _add(r, _d(md_m=60.0), "cam0", 11) is not None
    assert len(r.defects("C1")) == 4


def test_thumbnails_are_files_of_the_best_view_and_go_with_their_coil(tmp_path: Path) -> None:
    r = _records(tmp_path, max_coils=1)
    coil = "HR 2024/0815"
    _open(r, coil)
    folder = coil_dir_name(coil)
    assert "/" not in folder and " " not in folder and folder.startswith("HR_2024_0815-")
    assert coil_dir_name("HR 2024_0815") != folder  # the same slug, another coil: another folder
    first = _add(r, _d(coil=coil, score=1.0), "cam0", 1, _png(10))
    assert first is not None and first.thumbnail == f"{folder}/{first.defect_id}.png"
    assert (r.thumbs_root / first.thumbnail).read_bytes() == _png(10)
    better = _add(r, _d(coil=coil, cd_mm=505.0, score=3.0), "cam1", 1, _png(20))
    assert better is not None and better.thumbnail not in (None, first.thumbnail)
    assert (r.thumbs_root / str(better.thumbnail)).read_bytes() == _png(20)
    assert not (r.thumbs_root / first.thumbnail).exists()  # the replaced view's file is gone
    worse = _add(r, _d(coil=coil, cd_mm=502.0, score=2.0), "cam0", 2, _png(30))
    assert worse is not None and worse.thumbnail == better.thumbnail
    assert sorted(p.name for p in (r.thumbs_root / folder).iterdir()) == [Path(str(better.thumbnail)).name]
    plain = _add(r, _d(coil=coil, md_m=9.0), "cam0", 3)
    assert plain is not None and plain.thumbnail is None
    with pytest.raises(RecordsError, match="thumbnail_png of cam0:4 is not a PNG"):
        _add(r, _d(coil=coil, md_m=12.0), "cam0", 4, b"GIF89a")
    r.close_coil(coil, tail_line=5000, length_m=100.0, ended_utc=NOW - 2)
    assert (r.thumbs_root / folder).is_dir()  # the newest closed coil is kept
    _open(r, "C2")
    r.close_coil("C2", tail_line=5000, length_m=100.0, ended_utc=NOW - 1)  # max_coils=1: the older goes
    assert r.coil(coil) is None and not (r.thumbs_root / folder).exists()
    # A folder left by a crash between a prune's commit and its removal goes at the next prune.
    stray = r.thumbs_root / coil_dir_name("gone")
    stray.mkdir()
    (stray / "3.png").write_bytes(_png(1))
    mine = r.thumbs_root / "notes"  # not a name the records give: left alone
    mine.mkdir()
    assert r.prune(now=NOW) == 0
    assert not stray.exists() and mine.is_dir()


def test_a_failed_write_leaves_neither_row_nor_file_nor_cursor(tmp_path: Path) -> None:
    r = _records(tmp_path)
    _open(r)
    # A real SQLite failure after the thumbnail is written and before the commit.
    with sqlite3.connect(r.path) as db:
        db.execute("CREATE TRIGGER fail BEFORE UPDATE OF thumbnail ON defects BEGIN SELECT RAISE(ABORT, 'no'); END")
    with pytest.raises(RecordsError, match=r"cannot store defect cam0:1 in .*coils.sqlite: no$"):
        _add(r, _d(), "cam0", 1, _png(7))
    assert r.cursor("cam0") == 0 and r.defects("C1") == []
    assert list((r.thumbs_root / coil_dir_name("C1")).iterdir()) == []
    with sqlite3.connect(r.path) as db:
        db.execute("DROP TRIGGER fail")
    stored = _add(r, _d(), "cam0", 1, _png(7))  # the retry stores it
    assert stored is not None and (r.thumbs_root / str(stored.thumbnail)).read_bytes() == _png(7)


def test_retention_by_age_keeps_open_coils_and_takes_everything_of_the_old(tmp_path: Path) -> None:
    r = _records(tmp_path, max_age_days=30.0)
    for coil, started in (("old", NOW - 60 * DAY), ("recent", NOW - 2 * DAY), ("running", NOW - 90 * DAY)):
        _open(r, coil, started=started)
        _add(r, _d(coil=coil), f"cam-{coil}", 1, _png(5))
        r.add_uninspected(
            Uninspected(
                coil_id=coil,
                side="top",
                camera="cam0",
                md_from_m=0.0,
                md_to_m=3.0,
                cd_from_mm=0.0,
                cd_to_mm=600.0,
                reason="camera offline",
            )
        )
        r.set_results(coil, families=(), grading=Grading(grade="DC01", disposition="prime", outcomes=(), final=True))
    r.prune(now=NOW)  # nothing closed yet, nothing goes
    assert len(r.coils()) == 3
    r.close_coil("recent", tail_line=2000, length_m=10.0, ended_utc=NOW - 1 * DAY)
    # Closing prunes at the clock: a coil that ended 31 days ago goes at once.
    r.close_coil("old", tail_line=2000, length_m=10.0, ended_utc=NOW - 31 * DAY)
    assert sorted(c.info.coil_id for c in r.coils()) == ["recent", "running"]
    for table in ("coils", "defects", "uninspected", "results"):
        assert _rows(r, table, "old") == 0
        assert _rows(r, table, "running") == 1
    assert not (r.thumbs_root / coil_dir_name("old")).exists()
    assert (r.thumbs_root / coil_dir_name("running")).is_dir()
    assert r.prune(now=NOW + 29 * DAY) == 0
    assert r.prune(now=NOW + 32 * DAY) == 1  # "recent" ended a day ago
    assert [c.info.coil_id for c in r.coils()] == ["running"]


def test_retention_by_count_keeps_the_newest_closed_and_every_open_coil(tmp_path: Path) -> None:
    r = _records(tmp_path, max_coils=2)
    _open(r, "open-oldest", started=NOW - 100)
    for i in range(5):
        _open(r, f"c{i}", started=NOW - 50 + i)
        _add(r, _d(coil=f"c{i}"), "cam0", i + 1, _png(i))
        r.close_coil(f"c{i}", tail_line=9000, length_m=50.0, ended_utc=NOW - 40 + i)
    assert sorted(c.info.coil_id for c in r.coils()) == ["c3", "c4", "open-oldest"]
    folders = sorted(p.name for p in r.thumbs_root.iterdir())
    assert folders == sorted(coil_dir_name(c) for c in ("c3", "c4"))


def test_results_and_uninspected_stretches_round_trip(tmp_path: Path) -> None:
    r = _records(tmp_path)
    _open(r)
    family = PeriodicFamily(
        side="top",
        cd_mm=300.0,
        period_m=1.57,
        phase_m=2.0,
        count=5,
        confidence=0.9,
        md_m=(2.0, 3.57, 5.14, 6.71, 8.28),
        confirmed=True,
        roll="work roll top",
    )
    outcome = RuleOutcome(rule="periodic", measured=1.0, limit=0.0, broken=True, disposition="hold")
    grading = Grading(grade="DC01", disposition="hold", outcomes=(outcome,), final=False)
    r.set_results("C1", families=[family], grading=grading)
    c = r.coil("C1")
    assert c is not None and c.families == (family,) and c.grading == grading
    final = Grading(grade="DC01", disposition="prime", outcomes=(), final=True)
    r.set_results("C1", families=[], grading=final)  # replaces
    c = r.coil("C1")
    assert c is not None and c.families == () and c.grading == final
    with pytest.raises(RecordsError, match="coil 'C7' is not known"):
        r.set_results("C7", families=[], grading=final)
    s1 = Uninspected(
        coil_id="C1", side="top", camera="cam1", md_from_m=5.0, md_to_m=9.0, cd_from_mm=600, cd_to_mm=1250, reason="x"
    )
    s0 = Uninspected(
        coil_id="C1", side="top", camera="cam0", md_from_m=1.0, md_to_m=2.0, cd_from_mm=0, cd_to_mm=650, reason="y"
    )
    r.add_uninspected(s1)
    r.add_uninspected(s0)
    assert r.uninspected("C1") == [s0, s1]
    with pytest.raises(RecordsError, match="ends before it starts"):
        r.add_uninspected(
            Uninspected(
                coil_id="C1", side="top", camera="c", md_from_m=9.0, md_to_m=2.0, cd_from_mm=0, cd_to_mm=1, reason="z"
            )
        )


def test_bad_arguments_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(RecordsError, match="synchronous must be NORMAL or FULL, got 'OFF'"):
        _records(tmp_path, synchronous="OFF")
    with pytest.raises(RecordsError, match="max_coils must be an integer >= 1"):
        _records(tmp_path, max_coils=0)
    r = _records(tmp_path, synchronous="NORMAL")
    _open(r)
    with pytest.raises(RecordsError, match="side must be one of"):
        _add(r, _d(side="left"), "cam0", 1)
    with pytest.raises(RecordsError, match="width_mm must be >= 0.0"):
        _add(r, _d(width_mm=-1.0), "cam0", 1)
    with pytest.raises(RecordsError, match="md_m must be a finite number"):
        _add(r, _d(md_m=float("nan")), "cam0", 1)
    with pytest.raises(RecordsError, match="seq must be an integer >= 1"):
        _add(r, _d(), "cam0", 0)
    foreign = CoilDefect(**{**_d().__dict__, "cameras": ("cam5",)})
    with pytest.raises(RecordsError, match="the records set them from camera and seq"):
        _add(r, foreign, "cam0", 1)
    assert r.cursor("cam0") == 0 and r.defects("C1") == []


def test_a_schema_mismatch_or_a_foreign_file_is_one_clear_error(tmp_path: Path) -> None:
    r = _records(tmp_path)
    r.close()
    with sqlite3.connect(r.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(RecordsError, match=r"coil records schema 99, this version reads 1$"):
        _records(tmp_path)
    journal = tmp_path / "journal.sqlite"
    AlertJournal(path=journal, max_rows=10, max_age_s=10).close()
    with pytest.raises(RecordsError, match="is not a coil records database"):
        CoilRecords(path=journal)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RecordsError, match="cannot open coil records"):
        CoilRecords(path=junk)


_WRITER = """
import sys
from pathlib import Path
from pipeline.coil.model import CoilDefect, CoilInfo
from pipeline.coil.records import CoilRecords

r = CoilRecords(path=Path(sys.argv[1]))
r.open_coil(CoilInfo(coil_id="K 1", grade="DC01", head_line=0), started_utc=1.7e9)
png = b"\\x89PNG\\r\\n\\x1a\\n" + bytes(range(256)) * 64
seq = r.cursor("cam0")
while True:
    seq += 1
    d = CoilDefect(coil_id="K 1", side="top", md_m=seq * 0.5, cd_mm=100.0, length_mm=10.0, width_mm=10.0,
                   area_mm2=50.0, score=1.0, cameras=(), sources=())
    r.add_defect(d, camera="cam0", seq=seq, merge_mm=10.0, thumbnail_png=png if seq % 3 == 0 else None)
    print(seq, flush=True)
"""


def test_a_writer_killed_with_sigkill_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "records" / "coils.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    printed: list[int] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while len(printed) < 400 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(int(line))
        assert len(printed) >= 400, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        printed += [int(line) for line in proc.stdout.read().split()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    r = CoilRecords(path=path)
    cursor = r.cursor("cam0")
    # Committed and printed, or committed with the kill between the commit and the print.
    assert printed == list(range(1, len(printed) + 1))
    assert cursor in (printed[-1], printed[-1] + 1)
    defects = r.defects("K 1")
    assert len(defects) == cursor  # one row per committed alert: nothing lost, nothing twice
    assert sorted(int(s.split(":")[1]) for d in defects for s in d.sources) == list(range(1, cursor + 1))
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
    for d in defects:
        seq = int(d.sources[0].split(":")[1])
        assert (d.thumbnail is not None) == (seq % 3 == 0)
        if d.thumbnail is not None:
            assert (r.thumbs_root / d.thumbnail).read_bytes() == png  # no row names a half-written file
    # A restart resumes at cursor + 1.
    nxt = r.add_defect(_d(coil="K 1", md_m=1e5), camera="cam0", seq=cursor + 1, merge_mm=10.0, thumbnail_png=None)
    assert nxt is not None and r.cursor("cam0") == cursor + 1


def test_two_threads_write_at_once(tmp_path: Path) -> None:
    r = _records(tmp_path, synchronous="NORMAL")
    _open(r)
    n = 150
    errors: list[BaseException] = []

    def camera(name: str, cd_mm: float, area: float) -> None:
        try:
            for i in range(1, n + 1):
                # Both cameras see every defect in their overlap; whichever comes first, they merge.
                _add(r, _d(md_m=float(i), cd_mm=cd_mm, area=area, score=area), name, i, _png(i % 256))
        except BaseException as err:  # reported to the main thread below
            errors.append(err)

    threads = [threading.Thread(target=camera, args=a) for a in (("cam0", 500.0, 30.0), ("cam1", 503.0, 40.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    defects = r.defects("C1")
    assert len(defects) == n
    assert all(d.cameras == ("cam0", "cam1") and d.area_mm2 == 40.0 for d in defects)
    assert sorted(s for d in defects for s in d.sources) == sorted(
        f"cam{c}:{i}" for c in (0, 1) for i in range(1, n + 1)
    )
    assert r.cursor("cam0") == n and r.cursor("cam1") == n
    # The higher-scoring view's thumbnail is kept, and the other's file is gone.
    assert all((r.thumbs_root / str(d.thumbnail)).read_bytes() == _png(int(d.md_m) % 256) for d in defects)
    assert len(list((r.thumbs_root / coil_dir_name("C1")).iterdir())) == n
    r.close()
    with sqlite3.connect(r.path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
