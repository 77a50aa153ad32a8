"""The coil records: coils, their defects on the coil map, uninspected stretches and results, in
SQLite (WAL), with defect thumbnails as PNG files beside the database.

Every camera's alerts come here through the coil service. An alert is stored at most once: each
camera has a cursor, the last alert sequence number stored, advanced in the same transaction
that stores the alert, so after a gap or a restart the service asks the daemon for everything
after the cursor and replays it with neither loss nor duplicates (the zguide's Clone pattern,
as ``transport/journal.py`` serves it).

One physical defect is often seen twice: by two neighbouring cameras in their overlap, or cut
in two by a frame border of one camera. Defects of one coil and side whose boxes come within
``merge_mm`` of each other, along MD and across CD, are stored as one (``merge``). After a
merge no two stored boxes of a coil side are within reach of each other.

Thumbnails live in ``thumbs/<coil folder>/<defect_id>.png`` (``<defect_id>-<n>.png`` when a
merge brings a better view of an existing defect: a file that a committed row names is never
overwritten). A file is written, by rename, before the commit that names it; a crash in
between leaves a file no row names, removed with its coil's folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.coil.model import CoilDefect, CoilInfo, Grading, PeriodicFamily, RuleOutcome, Uninspected
from pipeline.errors import StripinspectError
from pipeline.transport.journal import open_wal

_SCHEMA = 1
SIDES = ("top", "bottom")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_DAY_S = 86_400.0
# Slack on the SQL pre-filter only, so that SQL's float arithmetic never drops a candidate that
# the exact test in ``within_reach`` would accept.
_SQL_SLACK_MM = 1e-6
_COIL_DIR = re.compile(r"^[A-Za-z0-9_-]{0,40}-[0-9a-f]{12}$")

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS coils (
    coil_id TEXT PRIMARY KEY,
    grade TEXT NOT NULL,
    head_line INTEGER NOT NULL,
    tail_line INTEGER,
    width_mm REAL,
    thickness_mm REAL,
    nominal_length_m REAL,
    state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    started_utc REAL NOT NULL,
    ended_utc REAL,
    length_m REAL,
    thumbs_dir TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS coils_by_start ON coils (started_utc);
CREATE INDEX IF NOT EXISTS coils_by_end ON coils (state, ended_utc);
CREATE TABLE IF NOT EXISTS defects (
    defect_id INTEGER PRIMARY KEY AUTOINCREMENT,
    coil_id TEXT NOT NULL REFERENCES coils (coil_id) ON DELETE CASCADE,
    side TEXT NOT NULL CHECK (side IN ('top', 'bottom')),
    md_m REAL NOT NULL,
    cd_mm REAL NOT NULL,
    length_mm REAL NOT NULL,
    width_mm REAL NOT NULL,
    area_mm2 REAL NOT NULL,
    score REAL NOT NULL,
    cameras TEXT NOT NULL,
    sources TEXT NOT NULL,
    klass TEXT,
    thumbnail TEXT,
    thumb_score REAL,
    md_hi_mm REAL GENERATED ALWAYS AS (md_m * 1000.0 + length_mm / 2.0) VIRTUAL
);
CREATE INDEX IF NOT EXISTS defects_by_place ON defects (coil_id, side, md_hi_mm);
CREATE TABLE IF NOT EXISTS uninspected (
    coil_id TEXT NOT NULL REFERENCES coils (coil_id) ON DELETE CASCADE,
    side TEXT NOT NULL CHECK (side IN ('top', 'bottom')),
    camera TEXT NOT NULL,
    md_from_m REAL NOT NULL,
    md_to_m REAL NOT NULL,
    cd_from_mm REAL NOT NULL,
    cd_to_mm REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS uninspected_by_coil ON uninspected (coil_id, side, md_from_m);
CREATE TABLE IF NOT EXISTS results (
    coil_id TEXT PRIMARY KEY REFERENCES coils (coil_id) ON DELETE CASCADE,
    families TEXT NOT NULL,
    grading TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (camera TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""

_DEFECT_SELECT = (
    "SELECT defect_id, coil_id, side, md_m, cd_mm, length_mm, width_mm, area_mm2, score, cameras, sources, klass,"
    " thumbnail, thumb_score FROM defects"
)


class RecordsError(StripinspectError):
    """The coil records cannot be opened, read or written, or were asked something impossible; one line."""


@dataclass(frozen=True)
class CoilRecord:
    """A coil as the records hold it. ``info.tail_line`` is set at close; ``ended_utc`` and
    ``length_m`` (measured, where ``info.length_m`` is Level 2's nominal length) are None while
    the coil is open; ``families`` and ``grading`` are the last results set (empty / None
    before); ``defect_count``: defects on its map, both sides, after merging."""

    info: CoilInfo
    state: str
    started_utc: float
    ended_utc: float | None
    length_m: float | None
    families: tuple[PeriodicFamily, ...]
    grading: Grading | None
    defect_count: int


# --- pure core: boxes and merging -------------------------------------------------------------


def _box(d: CoilDefect) -> tuple[float, float, float, float]:
    """(md_lo, md_hi, cd_lo, cd_hi) in mm."""
    md = d.md_m * 1000.0
    return (md - d.length_mm / 2.0, md + d.length_mm / 2.0, d.cd_mm - d.width_mm / 2.0, d.cd_mm + d.width_mm / 2.0)


def _gap(lo_a: float, hi_a: float, lo_b: float, hi_b: float) -> float:
    return max(0.0, max(lo_a, lo_b) - min(hi_a, hi_b))


def within_reach(a: CoilDefect, b: CoilDefect, merge_mm: float) -> bool:
    """Whether ``a`` and ``b`` are one defect: same coil and side, boxes no more than
    ``merge_mm`` apart along MD and across CD (touching or overlapping boxes are 0 apart)."""
    if a.coil_id != b.coil_id or a.side != b.side:
        return False
    ba, bb = _box(a), _box(b)
    return _gap(ba[0], ba[1], bb[0], bb[1]) <= merge_mm and _gap(ba[2], ba[3], bb[2], bb[3]) <= merge_mm


def merge(a: CoilDefect, b: CoilDefect) -> CoilDefect:
    """One defect from two views or pieces of it: the union box, the higher score, cameras and
    sources united, and ``a``'s defect_id (the caller keeps the older one).

    Area: two pieces seen by one camera (a frame border cut the defect) are different pixels, so
    their areas add; two views by different cameras (their overlap) see the same pixels twice,
    so the larger view counts. A view already merged from several cameras adds to a piece of
    one of them. The area is the defect's pixels, not its box (the box of a thin diagonal
    scratch is mostly clean strip). The class is the higher-scoring view's where it has one;
    the thumbnail is left to the caller, which knows the score of the view each was cut from.
    """
    ba, bb = _box(a), _box(b)
    md_lo, md_hi = min(ba[0], bb[0]), max(ba[1], bb[1])
    cd_lo, cd_hi = min(ba[2], bb[2]), max(ba[3], bb[3])
    same_camera = bool(set(a.cameras) & set(b.cameras))
    hi, lo = (a, b) if a.score >= b.score else (b, a)
    return CoilDefect(
        coil_id=a.coil_id,
        side=a.side,
        md_m=(md_lo + md_hi) / 2.0 / 1000.0,
        cd_mm=(cd_lo + cd_hi) / 2.0,
        length_mm=md_hi - md_lo,
        width_mm=cd_hi - cd_lo,
        area_mm2=a.area_mm2 + b.area_mm2 if same_camera else max(a.area_mm2, b.area_mm2),
        score=hi.score,
        cameras=tuple(sorted(set(a.cameras) | set(b.cameras))),
        sources=tuple(dict.fromkeys(a.sources + b.sources)),
        klass=hi.klass if hi.klass is not None else lo.klass,
        thumbnail=a.thumbnail,
        defect_id=a.defect_id,
    )


def coil_dir_name(coil_id: str) -> str:
    """A folder name for a coil's thumbnails: readable (a slug of the ID) and unique (a hash of
    the whole ID), since coil IDs may hold '/', spaces or anything else Level 2 sends."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", coil_id)[:40]
    return f"{slug}-{hashlib.sha256(coil_id.encode('utf-8')).hexdigest()[:12]}"


# --- argument checks ---------------------------------------------------------------------------


def _finite(name: str, value: float, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecordsError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise RecordsError(f"{name} must be >= {low}, got {value!r}")
    return float(value)


def _name(what: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordsError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _count(name: str, value: int, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RecordsError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _side(value: str) -> str:
    if value not in SIDES:
        raise RecordsError(f"side must be one of {SIDES}, got {value!r}")
    return value


# --- the shell: SQLite and files -------------------------------------------------------------


class CoilRecords:
    """Thread-safe (one lock; the service writes from its alert and control threads). Every
    public write is one transaction."""

    def __init__(
        self, *, path: Path, synchronous: str = "FULL", max_age_days: float = 365.0, max_coils: int = 20_000
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise RecordsError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        if not isinstance(max_age_days, int | float) or not max_age_days > 0 or not math.isfinite(max_age_days):
            raise RecordsError(f"max_age_days must be a positive number, got {max_age_days!r}")
        _count("max_coils", max_coils, low=1)
        self.path = Path(path)
        self.thumbs_root = self.path.parent / "thumbs"
        self.max_age_days = float(max_age_days)
        self.max_coils = max_coils
        # FULL also fsyncs each thumbnail before the commit that names it: a power cut then
        # leaves no row pointing at an empty file. NORMAL survives a crash of this process only.
        self._fsync = synchronous == "FULL"
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._db = open_wal(self.path, synchronous=synchronous)
        except (OSError, sqlite3.Error) as err:
            raise RecordsError(f"cannot open coil records {self.path}: {err}") from None
        try:
            # Deleting a coil deletes its defects, stretches and results with it.
            self._db.execute("PRAGMA foreign_keys=ON")
            with self._write("create the tables"):
                self._create_or_check()
        except (sqlite3.Error, RecordsError) as err:
            self._db.close()
            if isinstance(err, RecordsError):
                raise
            raise RecordsError(f"cannot open coil records {self.path}: {err}") from None

    def _create_or_check(self) -> None:
        if self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
            for statement in _TABLES.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", [("kind", "coil records"), ("schema", str(_SCHEMA))])
            return
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            meta = {}
        if meta.get("kind") != "coil records":
            raise RecordsError(f"{self.path} is not a coil records database")
        if meta.get("schema") != str(_SCHEMA):
            raise RecordsError(f"{self.path}: coil records schema {meta.get('schema')}, this version reads {_SCHEMA}")

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        """One transaction; the caller holds the lock. BEGIN IMMEDIATE takes the write lock at
        once, so a read inside never sees a state another writer is about to change."""
        if self._closed:
            raise RecordsError(f"cannot {what}: coil records {self.path} are closed")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield
            self._db.execute("COMMIT")
        except BaseException as err:
            try:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            except sqlite3.Error as rollback_err:
                raise RecordsError(f"cannot {what} in {self.path}: {err}; rollback: {rollback_err}") from None
            if isinstance(err, sqlite3.Error):
                raise RecordsError(f"cannot {what} in {self.path}: {err}") from None
            raise

    def _read(self, what: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one query; the caller holds the lock."""
        if self._closed:
            raise RecordsError(f"cannot read {what}: coil records {self.path} are closed")
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as err:
            raise RecordsError(f"cannot read {what} from {self.path}: {err}") from None

    # --- coils ---------------------------------------------------------------------------------

    def open_coil(self, info: CoilInfo, *, started_utc: float) -> None:
        """Start a coil. A second start of a coil that is open (another camera's, a replay) does
        nothing, whatever it says; starting a coil that was closed is an error."""
        if not isinstance(info, CoilInfo):
            raise RecordsError(f"open_coil needs a CoilInfo, got {type(info).__name__}")
        _name("coil_id", info.coil_id)
        _name("grade", info.grade)
        _count("head_line", info.head_line, low=0)
        if info.tail_line is not None:
            raise RecordsError(f"coil {info.coil_id!r}: tail_line is set by close_coil, got {info.tail_line!r}")
        for key in ("width_mm", "thickness_mm", "length_m"):
            value = getattr(info, key)
            if value is not None and _finite(key, value) <= 0:
                raise RecordsError(f"coil {info.coil_id!r}: {key} must be positive, got {value!r}")
        started = _finite("started_utc", started_utc)
        with self._lock, self._write(f"open coil {info.coil_id!r}"):
            row = self._db.execute("SELECT state FROM coils WHERE coil_id = ?", (info.coil_id,)).fetchone()
            if row is not None:
                if row[0] == "closed":
                    raise RecordsError(f"coil {info.coil_id!r} is closed; a closed coil cannot be opened again")
                return
            self._db.execute(
                "INSERT INTO coils (coil_id, grade, head_line, tail_line, width_mm, thickness_mm, nominal_length_m,"
                " state, started_utc, ended_utc, length_m, thumbs_dir) VALUES (?, ?, ?, NULL, ?, ?, ?, 'open', ?,"
                " NULL, NULL, ?)",
                (
                    info.coil_id,
                    info.grade,
                    info.head_line,
                    info.width_mm,
                    info.thickness_mm,
                    info.length_m,
                    started,
                    coil_dir_name(info.coil_id),
                ),
            )

    def close_coil(self, coil_id: str, *, tail_line: int, length_m: float, ended_utc: float) -> None:
        """End a coil (closing a closed coil again does nothing), then prune old coils."""
        _name("coil_id", coil_id)
        _count("tail_line", tail_line, low=0)
        length = _finite("length_m", length_m, low=0.0)
        ended = _finite("ended_utc", ended_utc)
        with self._lock:
            with self._write(f"close coil {coil_id!r}"):
                row = self._db.execute("SELECT state, head_line FROM coils WHERE coil_id = ?", (coil_id,)).fetchone()
                if row is None:
                    raise RecordsError(f"coil {coil_id!r} is not known; it cannot be closed")
                if row[0] == "open":
                    if tail_line < row[1]:
                        raise RecordsError(f"coil {coil_id!r}: tail_line {tail_line} is before head_line {row[1]}")
                    self._db.execute(
                        "UPDATE coils SET state = 'closed', tail_line = ?, length_m = ?, ended_utc = ?"
                        " WHERE coil_id = ?",
                        (tail_line, length, ended, coil_id),
                    )
            # Also on a repeated close: a retry after a failed folder removal finishes it.
            self._prune(time.time())

    def coil(self, coil_id: str) -> CoilRecord | None:
        with self._lock:
            rows = self._read("a coil", _COIL_QUERY + " WHERE c.coil_id = ?", (coil_id,))
        return _coil_record(rows[0]) if rows else None

    def coils(self, *, limit: int = 100, open_only: bool = False) -> list[CoilRecord]:
        """Newest first (by start)."""
        _count("limit", limit, low=1)
        where = " WHERE c.state = 'open'" if open_only else ""
        with self._lock:
            rows = self._read("coils", _COIL_QUERY + where + " ORDER BY c.started_utc DESC LIMIT ?", (limit,))
        return [_coil_record(r) for r in rows]

    # --- defects -------------------------------------------------------------------------------

    def add_defect(
        self,
        defect: CoilDefect,
        *,
        camera: str,
        seq: int,
        merge_mm: float,
        thumbnail_png: bytes | None,
        stream: str | None = None,
    ) -> CoilDefect | None:
        """Store one alert's defect, ``seq`` being the alert's number from ``camera``'s daemon.

        An alert at or below the camera's cursor was stored before (a replay): None, nothing
        stored. Otherwise, in one transaction, the cursor moves to ``seq`` and the defect is
        inserted, or merged (``merge``) with every stored defect within ``merge_mm`` of it (and
        of what the merge grows to). Returns the defect as stored, with its defect_id (the
        oldest of those merged). The records set ``cameras``, ``sources`` and ``thumbnail``:
        the defect passed may hold nothing else there. The coil must be open. ``stream`` names
        the cursor when it is not the camera's own (one per alert journal of the camera).
        """
        key = camera if stream is None else stream
        view = self._check_view(defect, camera=camera, seq=seq)
        merge_mm = _finite("merge_mm", merge_mm, low=0.0)
        if thumbnail_png is not None and (
            not isinstance(thumbnail_png, bytes) or not thumbnail_png.startswith(_PNG_MAGIC)
        ):
            raise RecordsError(f"thumbnail_png of {camera}:{seq} is not a PNG")
        with self._lock:
            written: list[Path] = []
            try:
                with self._write(f"store defect {camera}:{seq}"):
                    if seq <= self._cursor(key):
                        return None
                    folder = self._open_folder(view.coil_id)
                    self._set_cursor(key, seq)
                    found = self._within_reach(view, merge_mm)
                    if not found:
                        stored = self._insert(view, folder, thumbnail_png, written)
                        obsolete: list[str] = []
                    else:
                        stored, obsolete = self._merge_into(found, view, folder, thumbnail_png, written)
            except BaseException:
                # Rolled back: no row names the file written for it.
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            for rel in obsolete:
                try:
                    (self.thumbs_root / rel).unlink(missing_ok=True)
                except OSError as err:
                    raise RecordsError(
                        f"stored defect {stored.defect_id}, but cannot remove its replaced thumbnail {rel}: {err}"
                    ) from None
        return stored

    def _check_view(self, defect: CoilDefect, *, camera: str, seq: int) -> CoilDefect:
        if not isinstance(defect, CoilDefect):
            raise RecordsError(f"add_defect needs a CoilDefect, got {type(defect).__name__}")
        _name("camera", camera)
        _count("seq", seq, low=1)
        _name("coil_id", defect.coil_id)
        _side(defect.side)
        for key in ("md_m", "cd_mm", "score"):
            _finite(key, getattr(defect, key))
        for key in ("length_mm", "width_mm", "area_mm2"):
            _finite(key, getattr(defect, key), low=0.0)
        if defect.klass is not None and not isinstance(defect.klass, str):
            raise RecordsError(f"klass must be a string or None, got {defect.klass!r}")
        source = f"{camera}:{seq}"
        if defect.cameras not in ((), (camera,)) or defect.sources not in ((), (source,)):
            raise RecordsError(
                f"defect of {source} names cameras {defect.cameras} and sources {defect.sources}; "
                "the records set them from camera and seq"
            )
        if defect.thumbnail is not None or defect.defect_id != 0:
            raise RecordsError(f"defect of {source} already has a thumbnail or defect_id; the records set them")
        return dataclasses.replace(defect, cameras=(camera,), sources=(source,))

    def _open_folder(self, coil_id: str) -> str:
        row = self._db.execute("SELECT state, thumbs_dir FROM coils WHERE coil_id = ?", (coil_id,)).fetchone()
        if row is None:
            raise RecordsError(f"coil {coil_id!r} is not known; its defects cannot be stored")
        if row[0] != "open":
            raise RecordsError(f"coil {coil_id!r} is closed; its defects cannot be stored")
        return str(row[1])

    def _within_reach(self, view: CoilDefect, merge_mm: float) -> list[tuple[CoilDefect, float | None]]:
        """Stored defects within reach of ``view``, then of the union with them, until nothing
        more comes in reach; oldest first, each with the score of its thumbnail's view."""
        found: dict[int, tuple[CoilDefect, float | None]] = {}
        grown = view
        reach = merge_mm + _SQL_SLACK_MM
        while True:
            md_lo, md_hi, cd_lo, cd_hi = _box(grown)
            rows = self._db.execute(
                _DEFECT_SELECT + " WHERE coil_id = ? AND side = ? AND md_hi_mm >= ?"
                " AND md_m * 1000.0 - length_mm / 2.0 <= ? AND cd_mm + width_mm / 2.0 >= ?"
                " AND cd_mm - width_mm / 2.0 <= ?",
                (view.coil_id, view.side, md_lo - reach, md_hi + reach, cd_lo - reach, cd_hi + reach),
            ).fetchall()
            new = [
                (d, r[13])
                for r in rows
                if (d := _defect(r)).defect_id not in found and within_reach(d, grown, merge_mm)
            ]
            if not new:
                return [found[k] for k in sorted(found)]
            for d, thumb_score in new:
                found[d.defect_id] = (d, thumb_score)
                grown = merge(grown, d)

    def _insert(self, view: CoilDefect, folder: str, png: bytes | None, written: list[Path]) -> CoilDefect:
        cur = self._db.execute(
            "INSERT INTO defects (coil_id, side, md_m, cd_mm, length_mm, width_mm, area_mm2, score, cameras, sources,"
            " klass) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                view.coil_id,
                view.side,
                view.md_m,
                view.cd_mm,
                view.length_mm,
                view.width_mm,
                view.area_mm2,
                view.score,
                json.dumps(view.cameras),
                json.dumps(view.sources),
                view.klass,
            ),
        )
        stored = dataclasses.replace(view, defect_id=int(cur.lastrowid or 0))
        if png is None:
            return stored
        rel = f"{folder}/{stored.defect_id}.png"
        self._write_thumbnail(rel, png, written)
        self._db.execute(
            "UPDATE defects SET thumbnail = ?, thumb_score = ? WHERE defect_id = ?", (rel, view.score, stored.defect_id)
        )
        return dataclasses.replace(stored, thumbnail=rel)

    def _merge_into(
        self,
        found: list[tuple[CoilDefect, float | None]],
        view: CoilDefect,
        folder: str,
        png: bytes | None,
        written: list[Path],
    ) -> tuple[CoilDefect, list[str]]:
        """Merge ``view`` and the stored defects ``found`` (oldest first) into the oldest; the
        others' rows go. Stored ones are merged first: they are separate pieces of one another,
        so their areas add when one camera saw them, whatever the new view adds."""
        merged, thumb, thumb_score = found[0][0], found[0][0].thumbnail, found[0][1]
        for d, score in found[1:]:
            merged = merge(merged, d)
            if d.thumbnail is not None and (thumb_score is None or (score is not None and score > thumb_score)):
                thumb, thumb_score = d.thumbnail, score
        merged = merge(merged, view)
        if png is not None and (thumb_score is None or view.score > thumb_score):
            # A new name: the file the committed row names stays as it is until the commit.
            thumb = f"{folder}/{merged.defect_id}-{len(merged.sources)}.png"
            thumb_score = view.score
            self._write_thumbnail(thumb, png, written)
        merged = dataclasses.replace(merged, thumbnail=thumb)
        self._db.execute(
            "UPDATE defects SET md_m = ?, cd_mm = ?, length_mm = ?, width_mm = ?, area_mm2 = ?, score = ?,"
            " cameras = ?, sources = ?, klass = ?, thumbnail = ?, thumb_score = ? WHERE defect_id = ?",
            (
                merged.md_m,
                merged.cd_mm,
                merged.length_mm,
                merged.width_mm,
                merged.area_mm2,
                merged.score,
                json.dumps(merged.cameras),
                json.dumps(merged.sources),
                merged.klass,
                merged.thumbnail,
                thumb_score,
                merged.defect_id,
            ),
        )
        self._db.executemany("DELETE FROM defects WHERE defect_id = ?", [(d.defect_id,) for d, _ in found[1:]])
        obsolete = [d.thumbnail for d, _ in found if d.thumbnail is not None and d.thumbnail != thumb]
        return merged, obsolete

    def _write_thumbnail(self, rel: str, png: bytes, written: list[Path]) -> None:
        """Write ``png`` at ``thumbs_root / rel`` by rename (never a half-written file under the
        final name); with FULL, fsync the file and every folder entry it needed. ``written``
        gets the paths to remove if the transaction rolls back."""
        final = self.thumbs_root / rel
        tmp = final.with_name(f".{final.name}.tmp")
        written += [tmp, final]
        try:
            self._mkdirs(final.parent)
            with open(tmp, "wb") as f:
                f.write(png)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
            if self._fsync:
                _fsync_dir(final.parent)
        except OSError as err:
            raise RecordsError(f"cannot write thumbnail {final}: {err}") from None

    def _mkdirs(self, folder: Path) -> None:
        if folder.is_dir():
            return
        self._mkdirs(folder.parent)
        folder.mkdir(exist_ok=True)
        if self._fsync:
            _fsync_dir(folder.parent)

    def defects(self, coil_id: str) -> list[CoilDefect]:
        """A coil's defects (both sides) along MD; empty for a coil not known."""
        with self._lock:
            rows = self._read(
                "defects",
                _DEFECT_SELECT + " WHERE coil_id = ? ORDER BY md_m, side, cd_mm, defect_id",
                (coil_id,),
            )
        return [_defect(r) for r in rows]

    # --- uninspected stretches, results --------------------------------------------------------

    def add_uninspected(self, stretch: Uninspected) -> None:
        """Mark a stretch uninspected; the coil may be open or already closed (the service marks
        what an offline camera missed when the coil ends)."""
        if not isinstance(stretch, Uninspected):
            raise RecordsError(f"add_uninspected needs an Uninspected, got {type(stretch).__name__}")
        _name("coil_id", stretch.coil_id)
        _side(stretch.side)
        _name("camera", stretch.camera)
        _name("reason", stretch.reason)
        md_from, md_to = _finite("md_from_m", stretch.md_from_m), _finite("md_to_m", stretch.md_to_m)
        cd_from, cd_to = _finite("cd_from_mm", stretch.cd_from_mm), _finite("cd_to_mm", stretch.cd_to_mm)
        if md_to < md_from or cd_to < cd_from:
            raise RecordsError(
                f"uninspected stretch of {stretch.camera} ends before it starts: MD [{md_from}, {md_to}) m,"
                f" CD [{cd_from}, {cd_to}) mm"
            )
        with self._lock, self._write(f"store an uninspected stretch of coil {stretch.coil_id!r}"):
            self._known(stretch.coil_id)
            self._db.execute(
                "INSERT INTO uninspected VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (stretch.coil_id, stretch.side, stretch.camera, md_from, md_to, cd_from, cd_to, stretch.reason),
            )

    def uninspected(self, coil_id: str) -> list[Uninspected]:
        """A coil's uninspected stretches by side, then MD."""
        with self._lock:
            rows = self._read(
                "uninspected stretches",
                "SELECT * FROM uninspected WHERE coil_id = ? ORDER BY side, md_from_m, cd_from_mm, rowid",
                (coil_id,),
            )
        return [Uninspected(*r) for r in rows]

    def set_results(self, coil_id: str, *, families: Sequence[PeriodicFamily], grading: Grading) -> None:
        """Replace the coil's periodic families and grading."""
        _name("coil_id", coil_id)
        families = tuple(families)
        if not all(isinstance(f, PeriodicFamily) for f in families):
            raise RecordsError(f"coil {coil_id!r}: families must be PeriodicFamily")
        if not isinstance(grading, Grading) or not all(isinstance(o, RuleOutcome) for o in grading.outcomes):
            raise RecordsError(f"coil {coil_id!r}: grading must be a Grading of RuleOutcome")
        with self._lock, self._write(f"store the results of coil {coil_id!r}"):
            self._known(coil_id)
            self._db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                (
                    coil_id,
                    json.dumps([dataclasses.asdict(f) for f in families]),
                    json.dumps(dataclasses.asdict(grading)),
                ),
            )

    def _known(self, coil_id: str) -> None:
        if self._db.execute("SELECT 1 FROM coils WHERE coil_id = ?", (coil_id,)).fetchone() is None:
            raise RecordsError(f"coil {coil_id!r} is not known")

    # --- cursors -------------------------------------------------------------------------------

    def cursor(self, camera: str) -> int:
        """The last alert number of ``camera`` stored (0 if none): resume from cursor + 1."""
        with self._lock:
            rows = self._read("a cursor", "SELECT seq FROM cursors WHERE camera = ?", (camera,))
        return int(rows[0][0]) if rows else 0

    def advance_cursor(self, camera: str, seq: int) -> None:
        """Mark alerts up to ``seq`` of ``camera`` as dealt with (ones the service skips); a
        cursor never goes back."""
        _name("camera", camera)
        _count("seq", seq, low=0)
        with self._lock, self._write(f"advance the cursor of {camera}"):
            if seq > self._cursor(camera):
                self._set_cursor(camera, seq)

    def _cursor(self, camera: str) -> int:
        row = self._db.execute("SELECT seq FROM cursors WHERE camera = ?", (camera,)).fetchone()
        return 0 if row is None else int(row[0])

    def _set_cursor(self, camera: str, seq: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (camera, seq))

    # --- retention -----------------------------------------------------------------------------

    def prune(self, *, now: float | None = None) -> int:
        """Delete closed coils that ended more than ``max_age_days`` before ``now`` (default: the
        clock) or are not among the newest ``max_coils`` closed ones, with everything of theirs.
        Open coils stay. Returns how many coils went."""
        at = time.time() if now is None else _finite("now", now)
        with self._lock:
            return self._prune(at)

    def _prune(self, now: float) -> int:
        with self._write("prune coils"):
            gone = self._db.execute(
                "DELETE FROM coils WHERE state = 'closed' AND (ended_utc < ? OR coil_id NOT IN"
                " (SELECT coil_id FROM coils WHERE state = 'closed' ORDER BY ended_utc DESC, rowid DESC LIMIT ?))",
                (now - self.max_age_days * _DAY_S, self.max_coils),
            ).rowcount
            kept = {r[0] for r in self._db.execute("SELECT thumbs_dir FROM coils")}
        # Folders after the commit: a crash in between leaves folders no coil names, and every
        # prune removes those (only names of our own pattern: the folder is ours, but be sure).
        try:
            entries = list(self.thumbs_root.iterdir()) if self.thumbs_root.is_dir() else []
            for entry in entries:
                if entry.name not in kept and _COIL_DIR.match(entry.name) and entry.is_dir():
                    shutil.rmtree(entry)
        except OSError as err:
            raise RecordsError(
                f"pruned {gone} coils, but cannot remove their thumbnails in {self.thumbs_root}: {err}"
            ) from None
        return int(gone)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()

    def __enter__(self) -> CoilRecords:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_COIL_QUERY = (
    "SELECT c.coil_id, c.grade, c.head_line, c.tail_line, c.width_mm, c.thickness_mm, c.nominal_length_m, c.state,"
    " c.started_utc, c.ended_utc, c.length_m, r.families, r.grading,"
    " (SELECT COUNT(*) FROM defects d WHERE d.coil_id = c.coil_id)"
    " FROM coils c LEFT JOIN results r ON r.coil_id = c.coil_id"
)


def _coil_record(row: Sequence[Any]) -> CoilRecord:
    families: tuple[PeriodicFamily, ...] = ()
    grading = None
    if row[11] is not None:
        families = tuple(PeriodicFamily(**{**f, "md_m": tuple(f["md_m"])}) for f in json.loads(row[11]))
        g = json.loads(row[12])
        grading = Grading(
            grade=g["grade"],
            disposition=g["disposition"],
            outcomes=tuple(RuleOutcome(**o) for o in g["outcomes"]),
            final=g["final"],
        )
    return CoilRecord(
        info=CoilInfo(
            coil_id=row[0],
            grade=row[1],
            head_line=row[2],
            tail_line=row[3],
            width_mm=row[4],
            thickness_mm=row[5],
            length_m=row[6],
        ),
        state=row[7],
        started_utc=row[8],
        ended_utc=row[9],
        length_m=row[10],
        families=families,
        grading=grading,
        defect_count=int(row[13]),
    )


def _defect(row: Sequence[Any]) -> CoilDefect:
    return CoilDefect(
        coil_id=row[1],
        side=row[2],
        md_m=row[3],
        cd_mm=row[4],
        length_mm=row[5],
        width_mm=row[6],
        area_mm2=row[7],
        score=row[8],
        cameras=tuple(json.loads(row[9])),
        sources=tuple(json.loads(row[10])),
        klass=row[11],
        thumbnail=row[12],
        defect_id=int(row[0]),
    )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
