"""Coils that have passed: the coil service's records (``ui.coil_db``, read only) and the report
files it wrote (``ui.reports_dir/<coil>/report.pdf, map.png, report.json``)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pipeline.coil.records import CoilRecords, RecordsError
from pipeline.coil.report_data import FILES
from pipeline.coil.service import safe_name
from pipeline.process import RateLimitedLog

log = logging.getLogger("stripinspect.ui")
REPORT_FILES = tuple(FILES.values())


class PastCoils:
    """Opens the records when the file is there (the coil service may start after the station)
    and keeps them open; thread-safe."""

    def __init__(self, *, db: Path | None, reports_dir: Path | None) -> None:
        self.db, self.reports_dir = db, reports_dir
        self._records: CoilRecords | None = None
        self._lock = threading.Lock()
        self._ratelog = RateLimitedLog(log, interval_s=60.0)

    def records(self) -> CoilRecords | None:
        """The records, or None without ``ui.coil_db``, before the coil service made the file, or
        when it cannot be opened (logged)."""
        if self.db is None:
            return None
        with self._lock:
            if self._records is None and self.db.is_file():
                try:
                    # Opened, never written: the coil service owns the file (SQLite WAL lets it
                    # write while the station reads).
                    self._records = CoilRecords(path=self.db, synchronous="NORMAL")
                except RecordsError as err:
                    self._ratelog.error("records", "ui: coil records unavailable: %s", err)
            return self._records

    def report_file(self, coil_id: str, name: str) -> Path | None:
        """One of a coil's report files, if written; None for any other name."""
        if self.reports_dir is None or name not in REPORT_FILES:
            return None
        base = self.reports_dir.resolve()
        path = (base / safe_name(coil_id) / name).resolve()
        # safe_name keeps the folder inside the reports folder; checked again all the same.
        if base not in path.parents or not path.is_file():
            return None
        return path

    def report_files(self, coil_id: str) -> list[str]:
        return [n for n in REPORT_FILES if self.report_file(coil_id, n) is not None]

    def thumbnail(self, rel: str) -> Path | None:
        """A defect thumbnail the records name (a path relative to their ``thumbs`` folder)."""
        records = self.records()
        if records is None:
            return None
        root = records.thumbs_root.resolve()
        path = (root / rel).resolve()
        if root not in path.parents or not path.is_file():
            return None
        return path

    def close(self) -> None:
        with self._lock:
            if self._records is not None:
                self._records.close()
                self._records = None
