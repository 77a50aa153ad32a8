"""The bridge's own journal: SQLite in WAL mode.

Every defect a camera published gets a ``bridge_seq`` here, once: the row is committed together
with that camera's cursor (its alert journal's id and the last sequence number taken), so an
alert replayed after a restart or a gap fill is recognised and skipped. Each plant protocol's
cursor (the last ``bridge_seq`` it delivered) is kept too: after a restart, or after its queue
overflowed, a protocol is given what it has not delivered from here, and nothing twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from pipeline.bridge.model import PlantDefect
from pipeline.errors import StripinspectError
from pipeline.transport.journal import open_wal

_SCHEMA = 1


class BridgeJournalError(StripinspectError):
    """The bridge journal cannot be opened or written; one line."""


class BridgeJournal:
    """Thread-safe: camera intake threads add, the protocol workers read and move cursors."""

    def __init__(self, *, path: Path, keep: int, synchronous: str = "FULL") -> None:
        if keep < 1:
            raise BridgeJournalError(f"keep must be positive, got {keep}")
        if synchronous not in ("NORMAL", "FULL"):
            raise BridgeJournalError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = Path(path)
        self.keep = keep
        self._lock = threading.Lock()
        try:
            self._db = open_wal(self.path, synchronous=synchronous)
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS defects (bridge_seq INTEGER PRIMARY KEY, body TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS cameras (camera_id TEXT PRIMARY KEY, journal TEXT, seq INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS sinks (name TEXT PRIMARY KEY, bridge_seq INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                """
            )
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(_SCHEMA),))
            elif row[0] != str(_SCHEMA):
                raise BridgeJournalError(f"{self.path}: bridge journal schema {row[0]}, this version reads {_SCHEMA}")
            # The last number ever given, apart from the rows, so pruning never reuses one.
            row = self._db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            self.last_seq = int(row[0]) if row is not None else 0
        except (OSError, sqlite3.Error) as err:
            raise BridgeJournalError(f"cannot open bridge journal {self.path}: {err}") from None
        self._adds = 0

    def camera_cursor(self, camera_id: str) -> tuple[str | None, int]:
        """(the camera's alert journal id, the last of its sequence numbers taken); (None, 0) for a
        camera never heard."""
        with self._lock:
            row = self._db.execute("SELECT journal, seq FROM cameras WHERE camera_id = ?", (camera_id,)).fetchone()
        return (None, 0) if row is None else (row[0], int(row[1]))

    def set_camera_cursor(self, camera_id: str, journal: str | None, seq: int) -> None:
        """Start taking the camera's alerts after ``seq`` of ``journal`` (a bridge's first run)."""
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO cameras VALUES (?, ?, ?)", (camera_id, journal, int(seq)))
            except sqlite3.Error as err:
                raise BridgeJournalError(f"cannot write bridge journal {self.path}: {err}") from None

    def add(
        self, *, camera_id: str, journal: str | None, seq: int, build: Callable[[int], PlantDefect]
    ) -> PlantDefect | None:
        """Number the camera's alert ``seq`` of ``journal`` and commit it with the camera's cursor;
        None when it was taken already (seq not above the cursor of the same journal). A new
        journal id (the daemon's journal was started again) restarts that camera's cursor.
        ``build(bridge_seq)`` makes the defect."""
        with self._lock:
            row = self._db.execute("SELECT journal, seq FROM cameras WHERE camera_id = ?", (camera_id,)).fetchone()
            # A daemon without a journal (journal None) numbers from 1 again at every restart:
            # its numbers say nothing about what was taken, so nothing is skipped for it.
            if journal is not None and row is not None and row[0] == journal and seq <= int(row[1]):
                return None
            d = build(self.last_seq + 1)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO defects VALUES (?, ?)", (d.bridge_seq, json.dumps(d.to_json())))
                self._db.execute("INSERT OR REPLACE INTO cameras VALUES (?, ?, ?)", (camera_id, journal, seq))
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(d.bridge_seq),))
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise BridgeJournalError(f"cannot write bridge journal {self.path}: {err}") from None
            self.last_seq = d.bridge_seq
            self._adds += 1
            if self._adds % 256 == 1:
                self._db.execute("DELETE FROM defects WHERE bridge_seq <= ?", (self.last_seq - self.keep,))
            return d

    def after(self, bridge_seq: int, limit: int = 1000) -> list[PlantDefect]:
        """Defects above ``bridge_seq``, oldest first, at most ``limit`` (pruned ones are gone)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM defects WHERE bridge_seq > ? ORDER BY bridge_seq LIMIT ?", (int(bridge_seq), limit)
            ).fetchall()
        return [PlantDefect(**json.loads(r[0])) for r in rows]

    def latest(self, n: int) -> list[PlantDefect]:
        """The ``n`` newest defects, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM defects ORDER BY bridge_seq DESC LIMIT ?", (n,)).fetchall()
        return [PlantDefect(**json.loads(r[0])) for r in reversed(rows)]

    def sink_cursor(self, name: str) -> int | None:
        """The last ``bridge_seq`` the protocol ``name`` delivered; None for one never run."""
        with self._lock:
            row = self._db.execute("SELECT bridge_seq FROM sinks WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def delivered(self, name: str, bridge_seq: int) -> None:
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO sinks VALUES (?, ?)", (name, int(bridge_seq)))
            except sqlite3.Error as err:
                raise BridgeJournalError(f"cannot write bridge journal {self.path}: {err}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
