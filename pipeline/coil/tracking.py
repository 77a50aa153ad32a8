"""Which coil each strip line belongs to, in the daemon.

Level 2 announces a coil's start (ID, steel grade, nominal dimensions) and its end, through the
control socket (``coil_start`` / ``coil_end``; the plant protocols call the same methods), or a
schedule file gives every coil of a replay in advance. Coils are placed by strip line (the
encoder count the line camera stamps on its lines), not by the time a command arrives: a frame
still in the pipeline when the command comes is tagged by where its lines are. MD restarts at
each coil head.

Bad sequences: an end without an open coil, an end naming another coil, an unknown grade, a
head behind the open coil's head, or a coil ID that already ended are refused with one line. A
start while a coil is open is a missed end: the open coil ends at the new head (its end event
says so) and nothing before or after is lost. Restarting the same coil (a retried Level 2
message) is accepted once more and changes nothing.

Each start and end becomes an event (``events_through``) that the publish stage sends on the
``coil`` topic when its frames reach the event's line, so every camera's stream carries the
coil's start before the coil's first alert and its end after the coil's last frame. The state is
saved through ``store`` (the alert journal) on every change, so a restarted daemon resumes the
coil it was in.
"""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pipeline.coil.model import CoilInfo
from pipeline.errors import StripinspectError

KEEP_ENDED = 64  # ended coils kept for lines still in the pipeline and for replies
SCHEDULE_COLUMNS = ("coil_id", "grade", "head_m", "length_m", "width_mm", "thickness_mm")


class CoilError(StripinspectError):
    """A coil command or schedule that cannot be applied; one line."""


@dataclass(frozen=True)
class CoilEvent:
    """A coil's start (at ``line`` = its head) or end (at ``line`` = its tail); ``note`` says why
    when it was not the plain command (an end forced by the next coil's start)."""

    event: Literal["start", "end"]
    coil: CoilInfo
    line: int
    note: str | None = None

    def body(self, *, mm_per_line: float) -> dict[str, Any]:
        """The ``coil`` topic message body."""
        info = asdict(self.coil)
        return {
            "event": self.event,
            **info,
            "line": self.line,
            "note": self.note,
            "strip_md_m": self.line * mm_per_line / 1000.0,
            "mm_per_line": mm_per_line,
        }


@dataclass
class _Entry:
    info: CoilInfo
    start_sent: bool = False
    end_sent: bool = False
    end_note: str | None = None


class CoilTracker:
    """Thread-safe: the control thread starts and ends coils, the acquire stage moves
    ``camera_line``, the publish stage locates lines and takes events."""

    def __init__(
        self,
        *,
        mm_per_line: float,
        grades: Collection[str],
        schedule: Sequence[CoilInfo] = (),
        save: Callable[[str], None] | None = None,
        saved: str | None = None,
    ) -> None:
        if mm_per_line <= 0:
            raise CoilError(f"mm_per_line must be > 0, got {mm_per_line}")
        self.mm_per_line = mm_per_line
        self.grades = frozenset(grades)
        self.scheduled = bool(schedule)
        self.camera_line = 0  # the last line the camera delivered (acquire stage)
        self._save = save
        self._lock = threading.Lock()
        self._coils: list[_Entry] = []
        if saved:
            self._restore(saved)
        if schedule:
            self._add_schedule(schedule)

    # --- Level 2 ---------------------------------------------------------------------------

    def start(
        self,
        *,
        coil_id: object,
        grade: object,
        head_line: object = None,
        width_mm: object = None,
        thickness_mm: object = None,
        length_m: object = None,
    ) -> dict[str, Any]:
        """Open a coil at ``head_line`` (default: the line the camera is at). Returns the reply:
        the coil and, when a coil was still open, the one this start ended."""
        cid = _coil_id(coil_id)
        if not isinstance(grade, str) or not grade:
            raise CoilError(f"grade must be a non-empty string, got {grade!r}")
        if self.grades and grade not in self.grades:
            raise CoilError(f"unknown grade {grade!r}; coil.grades has {sorted(self.grades)}")
        width, thickness, length = (
            _positive("width_mm", width_mm),
            _positive("thickness_mm", thickness_mm),
            _positive("length_m", length_m),
        )
        with self._lock:
            if self.scheduled:
                raise CoilError("coils come from daemon.coil_schedule in this daemon; coil_start is refused")
            head = self.camera_line if head_line is None else _line("head_line", head_line)
            info = CoilInfo(
                coil_id=cid, grade=grade, head_line=head, width_mm=width, thickness_mm=thickness, length_m=length
            )
            known = self._find(cid)
            if known is not None:
                if known.info.tail_line is None and known.info.grade == grade:
                    return {"coil": asdict(known.info), "repeated": True}
                state = "is open with another grade" if known.info.tail_line is None else "has ended"
                raise CoilError(f"coil {cid!r} {state}; a coil ID is started once")
            ended = None
            open_ = self._open()
            if open_ is not None:
                if head <= open_.info.head_line:
                    raise CoilError(
                        f"head_line {head} is not after the head of the open coil {open_.info.coil_id!r} "
                        f"({open_.info.head_line})"
                    )
                # A missed end: the open coil ends where the next one starts, so no line is lost.
                open_.info = replace(open_.info, tail_line=head)
                open_.end_note = f"no coil_end: ended by the start of coil {cid!r}"
                ended = asdict(open_.info)
            elif self._coils and self._coils[-1].info.tail_line is not None and head < self._coils[-1].info.tail_line:
                last = self._coils[-1].info
                raise CoilError(
                    f"head_line {head} is inside the last coil {last.coil_id!r} (ended at {last.tail_line})"
                )
            self._coils.append(_Entry(info))
            self._trim()
            self._persist()
        reply: dict[str, Any] = {"coil": asdict(info)}
        if ended is not None:
            reply["ended"] = ended
            reply["warning"] = f"coil {ended['coil_id']!r} had no coil_end; it ends at line {head}"
        return reply

    def end(self, *, coil_id: object = None, tail_line: object = None) -> dict[str, Any]:
        """End the open coil at ``tail_line`` (default: the line the camera is at)."""
        with self._lock:
            if self.scheduled:
                raise CoilError("coils come from daemon.coil_schedule in this daemon; coil_end is refused")
            open_ = self._open()
            if open_ is None:
                raise CoilError("no coil is open (coil_end without coil_start)")
            if coil_id is not None and _coil_id(coil_id) != open_.info.coil_id:
                raise CoilError(f"coil {coil_id!r} is not the open coil ({open_.info.coil_id!r})")
            tail = self.camera_line if tail_line is None else _line("tail_line", tail_line)
            if tail <= open_.info.head_line:
                raise CoilError(f"tail_line {tail} is not after the coil's head_line {open_.info.head_line}")
            open_.info = replace(open_.info, tail_line=tail)
            self._persist()
            return {"coil": asdict(open_.info)}

    # --- the pipeline ----------------------------------------------------------------------

    def locate(self, line: float) -> tuple[str | None, float]:
        """(coil ID, MD in m from its head) of a strip line; (None, MD from strip line 0)
        outside every known coil."""
        with self._lock:
            for e in reversed(self._coils):
                if e.info.head_line <= line and (e.info.tail_line is None or line < e.info.tail_line):
                    return e.info.coil_id, (line - e.info.head_line) * self.mm_per_line / 1000.0
        return None, line * self.mm_per_line / 1000.0

    def events_through(self, line: int) -> list[CoilEvent]:
        """Events not yet sent whose line is at or before ``line``, in strip order (an end
        before the next start at the same line); marked sent."""
        out: list[CoilEvent] = []
        with self._lock:
            for e in self._coils:
                if not e.start_sent and e.info.head_line <= line:
                    e.start_sent = True
                    out.append(CoilEvent(event="start", coil=e.info, line=e.info.head_line))
                if not e.end_sent and e.info.tail_line is not None and e.info.tail_line <= line:
                    e.end_sent = True
                    out.append(CoilEvent(event="end", coil=e.info, line=e.info.tail_line, note=e.end_note))
            if out:
                self._persist()
        out.sort(key=lambda ev: (ev.line, ev.event == "start"))
        return out

    def status(self) -> dict[str, Any]:
        """The coil at the camera and the last ones (control ``coil`` command)."""
        cid, md = self.locate(self.camera_line)
        with self._lock:
            coils = [asdict(e.info) for e in self._coils[-8:]]
        return {
            "current": cid,
            "md_m": md,
            "camera_line": self.camera_line,
            "scheduled": self.scheduled,
            "coils": coils,
        }

    def coil(self, coil_id: str) -> CoilInfo | None:
        with self._lock:
            e = self._find(coil_id)
            return None if e is None else e.info

    # --- internals -------------------------------------------------------------------------

    def _open(self) -> _Entry | None:
        return next((e for e in reversed(self._coils) if e.info.tail_line is None), None)

    def _find(self, coil_id: str) -> _Entry | None:
        return next((e for e in self._coils if e.info.coil_id == coil_id), None)

    def _trim(self) -> None:
        ended = [e for e in self._coils if e.info.tail_line is not None and e.start_sent and e.end_sent]
        for e in ended[: max(0, len(ended) - KEEP_ENDED)]:
            self._coils.remove(e)

    def _persist(self) -> None:
        if self._save is None:
            return
        state = [
            {"info": asdict(e.info), "start_sent": e.start_sent, "end_sent": e.end_sent, "end_note": e.end_note}
            for e in self._coils
        ]
        self._save(json.dumps(state))

    def _restore(self, saved: str) -> None:
        try:
            for row in json.loads(saved):
                self._coils.append(
                    _Entry(
                        info=CoilInfo(**row["info"]),
                        start_sent=bool(row["start_sent"]),
                        end_sent=bool(row["end_sent"]),
                        end_note=row.get("end_note"),
                    )
                )
        except (ValueError, KeyError, TypeError) as err:
            raise CoilError(f"saved coil state is unreadable: {err}") from None

    def _add_schedule(self, schedule: Sequence[CoilInfo]) -> None:
        known = {e.info.coil_id for e in self._coils}
        last_tail = None
        for info in schedule:
            if info.grade not in self.grades and self.grades:
                raise CoilError(f"schedule coil {info.coil_id!r}: unknown grade {info.grade!r}")
            if info.tail_line is None or info.tail_line <= info.head_line:
                raise CoilError(f"schedule coil {info.coil_id!r}: length must be > 0")
            if last_tail is not None and info.head_line < last_tail:
                raise CoilError(f"schedule coil {info.coil_id!r} starts before the previous coil ends")
            last_tail = info.tail_line
            if info.coil_id not in known:  # restored with its sent flags
                self._coils.append(_Entry(info))


def read_schedule(path: Path, *, mm_per_line: float) -> list[CoilInfo]:
    """Coils of a replay from a CSV with the header ``SCHEDULE_COLUMNS`` (width and thickness
    may be empty); head and length in strip metres become lines. CoilError naming the row."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise CoilError(f"{path}: cannot read coil schedule: {err.strerror or err}") from None
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise CoilError(f"{path}: coil schedule has no coils")
    missing = [c for c in SCHEDULE_COLUMNS[:4] if c not in rows[0]]
    if missing:
        raise CoilError(f"{path}: coil schedule lacks columns {missing}; expected {list(SCHEDULE_COLUMNS)}")
    out = []
    for n, row in enumerate(rows, start=2):
        try:
            head_m, length_m = float(row["head_m"]), float(row["length_m"])
            width = float(row["width_mm"]) if row.get("width_mm") else None
            thickness = float(row["thickness_mm"]) if row.get("thickness_mm") else None
        except ValueError as err:
            raise CoilError(f"{path} line {n}: {err}") from None
        if head_m < 0 or length_m <= 0 or not row["coil_id"] or not row["grade"]:
            raise CoilError(f"{path} line {n}: needs coil_id, grade, head_m >= 0 and length_m > 0")
        head = round(head_m * 1000.0 / mm_per_line)
        tail = head + round(length_m * 1000.0 / mm_per_line)
        out.append(
            CoilInfo(
                coil_id=row["coil_id"],
                grade=row["grade"],
                head_line=head,
                tail_line=tail,
                length_m=length_m,
                width_mm=width,
                thickness_mm=thickness,
            )
        )
    return out


def _coil_id(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise CoilError(f"coil_id must be a non-empty string of at most 64 characters, got {value!r}")
    return value.strip()


def _positive(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise CoilError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _line(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CoilError(f"{name} must be an integer line number >= 0, got {value!r}")
    return value
