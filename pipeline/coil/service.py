"""The coil service: every camera's stream, through the proxy, onto one coil map per side.

One thread, one poll loop over three sockets: SUB on the proxy (alerts, frames, coil events of
every camera), REP for Level 2 (``coil_start`` / ``coil_end`` forwarded to every camera's
control socket, ``status``, ``report``), PUB for what it finds (``periodic``: a roll mark is
confirmed; ``grading``: a coil's live disposition changed; ``coil_closed``: the record is
closed and the report written).

Nothing lost: each camera's alerts are numbered by its journal. The records keep, per camera,
the last number stored (in the same transaction as the defect), so a gap in the live numbers,
or a restart of this service, is filled from that camera's journal (control ``replay``) and a
replayed alert already stored is skipped. Where no frame of a camera covered some lines of a
coil (the camera or its daemon was down), those lines become an uninspected stretch of that
camera's CD span, not a hole. A coil closes when every camera's frames have passed its tail
(or the camera has been silent for ``camera_timeout_s``): then its periodic families, its
final grade and its report.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import zmq

from pipeline.coil.grading import grade_coil
from pipeline.coil.model import CoilDefect, CoilInfo, Grading, PeriodicFamily, Uninspected
from pipeline.coil.periodic import find_families
from pipeline.coil.records import CoilRecords, RecordsError
from pipeline.coil.report_data import CoilSummary
from pipeline.config import CoilConfig
from pipeline.errors import StripinspectError
from pipeline.transport.publish import Publisher, decode
from pipeline.transport.request import request

log = logging.getLogger("stripinspect.coil")
TOPICS = ("periodic", "grading", "coil_closed")
TICK_S = 1.0  # live grading, periodic search, camera timeouts and coil closing at most this often
POLL_MS = 200


class CoilServiceError(StripinspectError):
    """The service cannot start (an endpoint, the records); one line."""


@dataclass
class CameraState:
    """What the service knows of one camera: how far its frames have covered the strip (lines,
    exclusive end; None until its first frame), when it was last heard, its line pitch."""

    side: str
    cd_from_mm: float
    cd_to_mm: float
    covered_to: int | None = None
    last_heard: float = 0.0
    mm_per_line: float | None = None
    alerts: int = 0
    replayed: int = 0
    frames: int = 0


@dataclass
class OpenCoil:
    info: CoilInfo
    opened_here: bool  # opened while this service ran: a camera silent since is uninspected
    dirty: bool = True  # defects since the last live grading
    confirmed: set[tuple[str, int, int]] = field(default_factory=set)
    disposition: str | None = None


class CoilService:
    """``run(stop)`` until ``stop`` is set; ``close()`` after. Constructed with the records it
    writes (the CLI opens them from ``coil.db``)."""

    def __init__(self, *, cfg: CoilConfig, records: CoilRecords, context: zmq.Context) -> None:
        if not cfg.cameras:
            raise CoilServiceError("coil.cameras is empty: the coil service needs the cameras it merges")
        self.cfg, self.records, self.context = cfg, records, context
        self.cameras = {
            cid: CameraState(side=c.side, cd_from_mm=c.cd_from_mm, cd_to_mm=c.cd_to_mm)
            for cid, c in cfg.cameras.items()
        }
        self.open: dict[str, OpenCoil] = {
            r.info.coil_id: OpenCoil(info=r.info, opened_here=False) for r in records.coils(open_only=True, limit=1000)
        }
        self.journals: dict[str, str | None] = dict.fromkeys(cfg.cameras)
        self.counts = {"alerts": 0, "duplicates": 0, "replayed": 0, "outside_coil": 0, "unknown_coil": 0}
        self._sub = context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, 200_000)
        self._sub.setsockopt(zmq.LINGER, 0)
        for topic in ("alert", "frame", "coil", "heartbeat"):
            self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._rep = context.socket(zmq.REP)
        self._rep.setsockopt(zmq.LINGER, 0)
        try:
            self._sub.connect(cfg.proxy_endpoint)
            try:
                self._rep.bind(cfg.control_endpoint)
            except zmq.ZMQError as err:
                raise CoilServiceError(f"coil.control_endpoint = {cfg.control_endpoint}: cannot bind: {err}") from None
            self.control_endpoint = self._rep.getsockopt_string(zmq.LAST_ENDPOINT)
            try:
                self.publisher = Publisher(
                    context=context, endpoint=cfg.pub_endpoint, camera_id="coil-service", send_hwm=10_000, topics=TOPICS
                )
            except OSError as err:
                raise CoilServiceError(f"coil.pub_endpoint = {cfg.pub_endpoint}: {err}") from None
        except CoilServiceError:
            self._sub.close(0)
            self._rep.close(0)
            raise

    # --- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        # Alerts published while this service was down: from each camera's journal.
        for cid in self.cameras:
            self._fill(cid, upto=None)
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._rep, zmq.POLLIN)
        next_tick = time.monotonic() + TICK_S
        while not stop.is_set():
            ready = dict(poller.poll(POLL_MS))
            if self._rep in ready:
                self._serve()
            if self._sub in ready:
                for _ in range(1000):  # a burst, then let the control socket and the tick in
                    try:
                        parts = self._sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._dispatch(parts)
            if time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + TICK_S

    def _dispatch(self, parts: list[bytes]) -> None:
        try:
            topic, header, _ = decode(parts)
            cid = header["camera_id"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            log.warning("message skipped: %s", err)
            return
        cam = self.cameras.get(cid)
        if cam is None:
            return  # a camera this service does not merge (another line on the same proxy)
        cam.last_heard = time.monotonic()
        try:
            if topic == "alert":
                self.on_alert(cid, header)
            elif topic == "frame":
                self.on_frame(cid, header)
            elif topic == "coil":
                self.on_coil_event(cid, header)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("%s %s from %s skipped: %r", topic, header.get("seq"), cid, err)

    # --- alerts ------------------------------------------------------------------------------

    def _stream(self, cid: str) -> str:
        """The cursor of a camera's current alert journal: a daemon whose journal was deleted
        numbers from 1 again, and its new alerts must not look like replays of the old ones."""
        jid = self.journals.get(cid)
        return cid if jid is None else f"{cid}@{jid}"

    def _journal_seen(self, cid: str, jid: object) -> None:
        if isinstance(jid, str) and jid != self.journals.get(cid):
            if self.journals.get(cid) is not None:
                log.warning("camera %s has a new alert journal (%s): its numbers start again", cid, jid)
            self.journals[cid] = jid

    def on_alert(self, cid: str, header: dict[str, Any]) -> None:
        seq = int(header["seq"])
        self._journal_seen(cid, header.get("journal"))
        cursor = self.records.cursor(self._stream(cid))
        if seq <= cursor:
            self.counts["duplicates"] += 1
            return
        if seq > cursor + 1:
            self._fill(cid, upto=seq - 1)
        self._store(cid, header)

    def _fill(self, cid: str, *, upto: int | None) -> None:
        """Alerts of ``cid`` after the stored cursor (up to ``upto``) from its journal."""
        endpoint = self.cfg.cameras[cid].control
        while True:
            after = self.records.cursor(self._stream(cid))
            if upto is not None and after >= upto:
                return
            try:
                reply = request(
                    self.context, endpoint, {"cmd": "replay", "after": after}, timeout_s=self.cfg.replay_timeout_s
                )
            except TimeoutError as err:
                log.warning("camera %s: cannot fetch alerts after %d: %s", cid, after, err)
                return
            if not reply.get("ok"):
                log.warning("camera %s: replay refused: %s", cid, reply.get("error"))
                return
            if reply.get("journal") is not None and reply["journal"] != self.journals.get(cid):
                self._journal_seen(cid, reply["journal"])
                continue  # the cursor to fetch after is that journal's
            alerts = [a for a in reply["alerts"] if upto is None or a["seq"] <= upto]
            if reply.get("pruned"):
                log.error("camera %s: alerts after %d were pruned from its journal before fetching", cid, after)
            for a in alerts:
                try:
                    self._store(cid, a)
                except (KeyError, TypeError, ValueError) as err:
                    log.warning("replayed alert %s of camera %s skipped: %r", a.get("seq"), cid, err)
                    self.records.advance_cursor(self._stream(cid), int(a["seq"]))
                self.counts["replayed"] += 1
                self.cameras[cid].replayed += 1
            if not alerts or len(alerts) < len(reply["alerts"]) or not reply["alerts"]:
                return

    def _store(self, cid: str, h: dict[str, Any]) -> None:
        seq = int(h["seq"])
        coil_id = h.get("coil_id")
        self.counts["alerts"] += 1
        self.cameras[cid].alerts += 1
        if coil_id is None:
            self.counts["outside_coil"] += 1
            self.records.advance_cursor(self._stream(cid), seq)
            return
        if self.records.coil(coil_id) is None and not self._learn_coil(cid, coil_id):
            self.counts["unknown_coil"] += 1
            log.error("alert %s of camera %s names coil %r, which no one knows; not stored", seq, cid, coil_id)
            self.records.advance_cursor(self._stream(cid), seq)
            return
        defect = CoilDefect(
            coil_id=coil_id,
            side=str(h["side"]),
            md_m=float(h["md_m"]),
            cd_mm=float(h["cd_mm"]),
            length_mm=float(h["length_mm"]),
            width_mm=float(h["width_mm"]),
            area_mm2=float(h["area_mm2"]),
            score=float(h["max_score"]),
            cameras=(cid,),
            sources=(f"{cid}:{seq}",),
            # The daemon's few-shot class (docs/feedback.md); "unknown" is no class for the record.
            klass=None if h.get("class") in (None, "unknown") else str(h["class"]),
        )
        thumb = None
        if h.get("thumbnail_png"):
            try:
                thumb = base64.b64decode(h["thumbnail_png"], validate=True)
            except (binascii.Error, ValueError):
                thumb = None
        try:
            self.records.add_defect(
                defect, camera=cid, seq=seq, merge_mm=self.cfg.merge_mm, thumbnail_png=thumb, stream=self._stream(cid)
            )
        except RecordsError as err:
            # A coil already closed (an alert fetched late): kept out of the closed record.
            log.error("alert %s of camera %s not stored: %s", seq, cid, err)
            self.records.advance_cursor(self._stream(cid), seq)
            return
        if coil_id in self.open:
            self.open[coil_id].dirty = True

    def _learn_coil(self, cid: str, coil_id: str) -> bool:
        """A coil seen first in an alert (this service started after its start event): ask the
        camera that tagged it."""
        try:
            endpoint = self.cfg.cameras[cid].control
            reply = request(self.context, endpoint, {"cmd": "coil"}, timeout_s=self.cfg.replay_timeout_s)
        except TimeoutError:
            return False
        for c in reply.get("coils", []):
            if c.get("coil_id") == coil_id:
                self._open_coil(CoilInfo(**c), opened_here=False)
                return True
        return False

    # --- frames and coil events ----------------------------------------------------------------

    def on_frame(self, cid: str, h: dict[str, Any]) -> None:
        cam = self.cameras[cid]
        cam.frames += 1
        cam.mm_per_line = float(h["mm_per_line"])
        start = int(h["first_line"]) + int(h["valid_rows"][0])
        end = int(h["first_line"]) + int(h["valid_rows"][1])
        if cam.covered_to is None:
            # The first frame this service sees from the camera: coils it opened before then
            # were not seen by this camera from their head.
            for oc in list(self.open.values()):
                if oc.opened_here and oc.info.head_line < start:
                    self._uninspected(cid, oc.info.head_line, start, "camera not delivering at coil start", only=oc)
        elif start > cam.covered_to:
            self._uninspected(cid, cam.covered_to, start, "no frames from the camera")
        cam.covered_to = end if cam.covered_to is None else max(cam.covered_to, end)

    def _uninspected(self, cid: str, a: int, b: int, reason: str, *, only: OpenCoil | None = None) -> None:
        """Lines [a, b) of camera ``cid`` were not inspected: one stretch per coil they touch
        (or in ``only``)."""
        cam = self.cameras[cid]
        mm = cam.mm_per_line or 1.0
        for oc in [only] if only is not None else list(self.open.values()):
            head = oc.info.head_line
            tail = oc.info.tail_line
            lo, hi = max(a, head), b if tail is None else min(b, tail)
            if hi <= lo:
                continue
            self.records.add_uninspected(
                Uninspected(
                    coil_id=oc.info.coil_id,
                    side=cam.side,
                    camera=cid,
                    md_from_m=(lo - head) * mm / 1000.0,
                    md_to_m=(hi - head) * mm / 1000.0,
                    cd_from_mm=cam.cd_from_mm,
                    cd_to_mm=cam.cd_to_mm,
                    reason=reason,
                )
            )
            oc.dirty = True

    def on_coil_event(self, cid: str, h: dict[str, Any]) -> None:
        info = CoilInfo(
            coil_id=h["coil_id"],
            grade=h["grade"],
            head_line=int(h["head_line"]),
            tail_line=None if h.get("tail_line") is None else int(h["tail_line"]),
            width_mm=h.get("width_mm"),
            thickness_mm=h.get("thickness_mm"),
            length_m=h.get("length_m"),
        )
        self.cameras[cid].mm_per_line = float(h["mm_per_line"])
        if h["event"] == "start":
            if self.records.coil(info.coil_id) is None:
                self._open_coil(info, opened_here=True)
        elif h["event"] == "end":
            oc = self.open.get(info.coil_id)
            if oc is not None and oc.info.tail_line is None:
                oc.info = info

    def _open_coil(self, info: CoilInfo, *, opened_here: bool) -> None:
        # A scheduled coil's tail is known at its start; the record gets it when it closes.
        self.records.open_coil(replace(info, tail_line=None), started_utc=time.time())
        self.open[info.coil_id] = OpenCoil(info=info, opened_here=opened_here)

    # --- live results and closing ----------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        for oc in list(self.open.values()):
            tail = oc.info.tail_line
            if tail is not None and self._all_passed(tail, now):
                self.close_coil(oc)
            elif oc.dirty:
                self._live(oc)

    def _all_passed(self, tail: int, now: float) -> bool:
        for cam in self.cameras.values():
            silent = now - cam.last_heard > self.cfg.camera_timeout_s
            if not silent and (cam.covered_to is None or cam.covered_to < tail):
                return False
        return True

    def _mm_per_line(self) -> float:
        known = [c.mm_per_line for c in self.cameras.values() if c.mm_per_line is not None]
        return known[0] if known else 1.0

    def _results(self, oc: OpenCoil, *, final: bool) -> tuple[list[PeriodicFamily], Grading, float]:
        info = oc.info
        defects = self.records.defects(info.coil_id)
        families = find_families(
            defects, cfg=self.cfg.periodic, rolls=self.cfg.rolls, roll_tolerance=self.cfg.roll_tolerance
        )
        reach = [c.covered_to for c in self.cameras.values() if c.covered_to is not None]
        end_line = info.tail_line if final and info.tail_line is not None else max(reach, default=info.head_line)
        length_m = max(0.0, (end_line - info.head_line) * self._mm_per_line() / 1000.0)
        grading = grade_coil(
            grade=info.grade,
            rules=self.cfg.grades.get(info.grade, []),
            defects=defects,
            families=families,
            length_m=length_m,
            width_mm=info.width_mm,
            uninspected=self.records.uninspected(info.coil_id),
            final=final,
        )
        return families, grading, length_m

    def _live(self, oc: OpenCoil) -> None:
        families, grading, _ = self._results(oc, final=False)
        oc.dirty = False
        self.records.set_results(oc.info.coil_id, families=families, grading=grading)
        for f in families:
            key = (f.side, round(f.cd_mm / self.cfg.periodic.lane_mm), round(f.period_m * 100))
            if f.confirmed and key not in oc.confirmed:
                oc.confirmed.add(key)
                # A roll mark prints again every revolution until the roll is changed.
                self.publisher.send("periodic", {"coil_id": oc.info.coil_id, "frame_id": None, **asdict(f)})
        if grading.disposition != oc.disposition:
            oc.disposition = grading.disposition
            self.publisher.send("grading", {"coil_id": oc.info.coil_id, "frame_id": None, **asdict(grading)})

    def close_coil(self, oc: OpenCoil) -> dict[str, Any]:
        """Mark what silent cameras did not see, grade, close the record, write the report."""
        info = oc.info
        tail = info.tail_line if info.tail_line is not None else info.head_line
        for cid, cam in self.cameras.items():
            seen_to = cam.covered_to if cam.covered_to is not None else (info.head_line if oc.opened_here else tail)
            if seen_to < tail:
                self._uninspected(cid, max(seen_to, info.head_line), tail, "camera offline at coil end", only=oc)
        families, grading, length_m = self._results(oc, final=True)
        self.records.set_results(info.coil_id, families=families, grading=grading)
        self.records.close_coil(info.coil_id, tail_line=tail, length_m=length_m, ended_utc=time.time())
        del self.open[info.coil_id]
        files = self.write_report(info.coil_id) if self.cfg.reports_dir is not None else None
        body = {
            "coil_id": info.coil_id,
            "frame_id": None,
            "disposition": grading.disposition,
            "length_m": length_m,
            "families": len(families),
            "report": files,
        }
        self.publisher.send("coil_closed", body)
        log.info("coil %s closed: %s, %.1f m, report %s", info.coil_id, grading.disposition, length_m, files)
        return body

    def write_report(self, coil_id: str) -> dict[str, str] | None:
        """The coil's report under ``reports_dir/<coil>``; None when it cannot be written (logged:
        the record is kept and ``stripinspect coil report`` can write it later)."""
        from pipeline.coil.report import write_report  # matplotlib: only when a report is written

        assert self.cfg.reports_dir is not None
        try:
            out = write_report(coil_summary(self.records, coil_id, self.cfg), self.cfg.reports_dir / safe_name(coil_id))
        except (OSError, ValueError, RecordsError) as err:
            log.error("report of coil %s not written: %s", coil_id, err)
            return None
        return {"pdf": str(out.pdf), "png": str(out.png), "json": str(out.json)}

    # --- Level 2 -------------------------------------------------------------------------------

    def _serve(self) -> None:
        raw = self._rep.recv()
        try:
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise ValueError("not an object")
            reply = self.handle(req)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            reply = {"ok": False, "error": f"bad request: {err}"}
        except StripinspectError as err:
            reply = {"ok": False, "error": str(err)}
        self._rep.send_json(reply)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd in ("coil_start", "coil_end"):
            return self._forward(cmd, req)
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "report":
            coil_id = req.get("coil_id")
            if not isinstance(coil_id, str) or self.records.coil(coil_id) is None:
                return {"ok": False, "error": f"unknown coil {coil_id!r}"}
            if self.cfg.reports_dir is None:
                return {"ok": False, "error": "coil.reports_dir is null"}
            files = self.write_report(coil_id)
            return {"ok": True, "files": files} if files else {"ok": False, "error": "report not written (logged)"}
        return {"ok": False, "error": f"unknown command {cmd!r}; known: coil_start, coil_end, status, report"}

    def _forward(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        """The same command to every camera (they tag their streams; the records open from their
        coil events). A start of an unknown grade is refused here before any camera sees it."""
        if cmd == "coil_start" and req.get("grade") not in self.cfg.grades:
            known = sorted(self.cfg.grades)
            return {"ok": False, "error": f"unknown grade {req.get('grade')!r}; coil.grades has {known}"}
        replies: dict[str, Any] = {}
        for cid, cam in self.cfg.cameras.items():
            try:
                replies[cid] = request(self.context, cam.control, req, timeout_s=self.cfg.replay_timeout_s)
            except TimeoutError as err:
                replies[cid] = {"ok": False, "error": str(err)}
        ok = [r for r in replies.values() if r.get("ok")]
        if cmd == "coil_start" and ok and self.records.coil(str(req.get("coil_id"))) is None:
            self._open_coil(CoilInfo(**ok[0]["coil"]), opened_here=True)
        errors = {cid: r["error"] for cid, r in replies.items() if not r.get("ok")}
        out: dict[str, Any] = {"ok": bool(ok) and not errors, "cameras": replies}
        if errors:
            out["error"] = "; ".join(f"{cid}: {e}" for cid, e in errors.items())
        return out

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "open_coils": {cid: asdict(oc.info) for cid, oc in self.open.items()},
            "cameras": {
                cid: {
                    "online": now - c.last_heard <= self.cfg.camera_timeout_s,
                    "covered_to": c.covered_to,
                    "alerts": c.alerts,
                    "replayed": c.replayed,
                    "frames": c.frames,
                    "cursor": self.records.cursor(self._stream(cid)),
                    "journal": self.journals.get(cid),
                }
                for cid, c in self.cameras.items()
            },
            "counts": dict(self.counts),
        }

    def close(self) -> None:
        self._sub.close(0)
        self._rep.close(0)
        self.publisher.close()


def safe_name(coil_id: str) -> str:
    """A folder name for a coil ID (IDs are free text from Level 2)."""
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in coil_id).strip(".")
    return keep or "coil"


def coil_summary(records: CoilRecords, coil_id: str, cfg: CoilConfig) -> CoilSummary:
    """What the report shows of a coil, from its records (RecordsError when unknown)."""
    rec = records.coil(coil_id)
    if rec is None:
        raise RecordsError(f"no coil {coil_id!r} in {records.path}")
    return CoilSummary(
        info=rec.info,
        length_m=rec.length_m if rec.length_m is not None else 0.0,
        started_utc=rec.started_utc,
        ended_utc=rec.ended_utc,
        defects=tuple(records.defects(coil_id)),
        uninspected=tuple(records.uninspected(coil_id)),
        families=tuple(rec.families),
        grading=rec.grading,
        cameras={
            cid: {"side": c.side, "cd_from_mm": c.cd_from_mm, "cd_to_mm": c.cd_to_mm} for cid, c in cfg.cameras.items()
        },
        thumbs_root=records.thumbs_root,
    )
