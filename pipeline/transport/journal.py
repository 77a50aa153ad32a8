"""Durable alert journal: SQLite in WAL mode, written before an alert is published.

PUB/SUB drops messages for a subscriber that is down or slow. Every alert gets its sequence
number here, is committed, and only then published; a subscriber that saw a gap asks the
control socket for everything after the last number it saw (the zguide's Clone pattern:
subscribe first, fetch what was missed, then apply live messages with a higher number). The
numbers continue across daemon restarts, and the journal is bounded by rows and by age.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import StripinspectError

_SCHEMA = 1


def open_wal(path: Path, *, synchronous: str) -> sqlite3.Connection:
    """The SQLite connection every durable store of the product uses (the alert journal, the
    bridge journal, the coil records): WAL, so readers never wait for the writer and a crash
    loses no committed row; ``synchronous`` FULL also survives a power cut, NORMAL only a crash of
    the process. One connection shared by the store's threads under the store's own lock,
    autocommit (transactions are explicit). Raises OSError or sqlite3.Error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
    except sqlite3.Error:
        db.close()
        raise
    return db


class JournalError(StripinspectError):
    """The journal cannot be opened or written; one line."""


class AlertJournal:
    """Thread-safe: the publish thread appends, the control thread reads."""

    def __init__(self, *, path: Path, max_rows: int, max_age_s: float, synchronous: str = "FULL") -> None:
        if max_rows < 1 or max_age_s <= 0:
            raise JournalError(f"journal bounds must be positive, got max_rows={max_rows}, max_age_s={max_age_s}")
        if synchronous not in ("NORMAL", "FULL"):
            raise JournalError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        try:
            # FULL: a committed alert survives a power cut, not only a crash of this process.
            self._db = open_wal(self.path, synchronous=synchronous)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS alerts (seq INTEGER PRIMARY KEY, time REAL NOT NULL, header TEXT NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(_SCHEMA),))
            elif row[0] != str(_SCHEMA):
                raise JournalError(f"{self.path}: journal schema {row[0]}, this version reads {_SCHEMA}")
            # The last number ever given, kept apart from the rows so pruning never reuses one.
            row = self._db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            self.last_seq = int(row[0]) if row is not None else 0
            # Names this journal: a journal deleted and started again numbers from 1 once more,
            # and a subscriber that keeps cursors must tell the two apart.
            row = self._db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
            if row is None:
                row = (uuid.uuid4().hex,)
                self._db.execute("INSERT INTO meta VALUES ('journal_id', ?)", row)
            self.journal_id = str(row[0])
        except (OSError, sqlite3.Error) as err:
            raise JournalError(f"cannot open alert journal {self.path}: {err}") from None
        self._appends = 0

    def append(self, headers: list[dict[str, Any]]) -> list[int]:
        """Number and commit ``headers`` (one transaction); returns their sequence numbers.
        The headers are updated in place with their ``seq``."""
        if not headers:
            return []
        with self._lock:
            first = self.last_seq + 1
            seqs = list(range(first, first + len(headers)))
            now = time.time()
            for h, s in zip(headers, seqs, strict=True):
                h["seq"] = s
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT INTO alerts (seq, time, header) VALUES (?, ?, ?)",
                    [(s, now, json.dumps(h)) for h, s in zip(headers, seqs, strict=True)],
                )
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(seqs[-1]),))
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise JournalError(f"cannot write alert journal {self.path}: {err}") from None
            self.last_seq = seqs[-1]
            self._appends += 1
            if self._appends % 64 == 1:
                self._prune(now)
            return seqs

    def after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        """Alerts with a sequence number above ``seq``, oldest first, at most ``limit``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT header FROM alerts WHERE seq > ? ORDER BY seq LIMIT ?", (int(seq), int(limit))
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def first_seq(self) -> int | None:
        """Oldest number still held (older ones were pruned), None when empty."""
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM alerts").fetchone()
        return None if row[0] is None else int(row[0])

    def prune(self) -> None:
        with self._lock:
            self._prune(time.time())

    def _prune(self, now: float) -> None:
        self._db.execute(
            "DELETE FROM alerts WHERE seq <= ? OR time < ?", (self.last_seq - self.max_rows, now - self.max_age_s)
        )

    def load_state(self, key: str) -> str | None:
        """A small piece of daemon state kept with the journal (the coil tracker's), or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (f"state:{key}",)).fetchone()
        return None if row is None else str(row[0])

    def save_state(self, key: str, value: str) -> None:
        """Commit ``value`` under ``key`` (replacing it); JournalError when the disk refuses."""
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"state:{key}", value))
            except sqlite3.Error as err:
                raise JournalError(f"cannot write alert journal {self.path}: {err}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
