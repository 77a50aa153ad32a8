"""What the station knows of the line: per camera its latest frame, its state and the recent
alerts; per coil the defects seen live and the coil service's grading and periodic families.

No sockets and no threads: ``LineState.on_camera`` and ``on_coil_service`` take decoded messages
(docs/messages.md) from the follower threads and return the updates for the browsers; the web
app reads immutable snapshots. One lock guards the state. The station shows what comes: after a
restart of either side it starts from the next messages (the coil records keep the history, and
the bridge and the coil service recover missed alerts from the journals; a screen does not).
"""

from __future__ import annotations

import base64
import binascii
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np

from pipeline.coil.model import CoilDefect, Grading, PeriodicFamily, RuleOutcome
from pipeline.ui.heatmap import encode_png, heat_crop, heat_rgba, threshold_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
SIDES = ("top", "bottom")
CAMERA_TOPICS = ("alert", "frame", "heartbeat", "coil")
COIL_SERVICE_TOPICS = ("grading", "periodic", "coil_closed")
_FAMILY_FIELDS = tuple(f.name for f in fields(PeriodicFamily))
_OUTCOME_FIELDS = tuple(f.name for f in fields(RuleOutcome))


@dataclass(frozen=True, kw_only=True)
class Update:
    """One change for the browsers: ``kind`` (alert, frame, camera, coil) and a small JSON body."""

    kind: str
    data: dict[str, Any]


@dataclass(frozen=True, kw_only=True, eq=False)
class AlertView:
    """One alert as the pages show it; ``thumbnail``: the daemon's PNG crop, or None."""

    camera_id: str
    seq: int
    journal: str | None
    frame_id: int | None
    coil_id: str | None
    side: str
    md_m: float
    strip_md_m: float
    cd_mm: float
    length_mm: float
    width_mm: float
    area_mm2: float
    max_score: float
    mean_score: float | None
    threshold: float
    klass: str
    class_confidence: float | None
    box: tuple[int, int, int, int]
    capture_time: float
    publish_time: float
    thumbnail: bytes | None

    @property
    def key(self) -> tuple[str, str | None, int]:
        return (self.camera_id, self.journal, self.seq)

    @property
    def path(self) -> str:
        """``camera/journal/seq`` for URLs ('-' for an alert without a journal), each part quoted."""
        return "/".join(quote(p, safe="") for p in (self.camera_id, self.journal or "-", str(self.seq)))

    @property
    def ratio(self) -> float:
        return self.max_score / self.threshold


@dataclass(frozen=True, kw_only=True, eq=False)
class FrameView:
    """A camera's frame: ``md_m`` of row 0 and ``md_end_m`` of the end of its valid rows (m from
    the coil head, None outside a coil); ``score_map`` float16 (rows, cols) of the valid rows (or None),
    ``preview`` JPEG bytes of the valid rows with ``preview_shape`` (h, w) (or None)."""

    camera_id: str
    frame_id: int
    seq: int
    capture_time: float
    coil_id: str | None
    side: str
    md_m: float | None
    md_end_m: float | None
    max_score: float
    defects: int
    threshold: float
    valid_rows: tuple[int, int]
    score_map: np.ndarray | None
    preview: bytes | None
    preview_shape: tuple[int, int] | None


@dataclass(frozen=True, kw_only=True)
class CameraView:
    """A camera's state from its last heartbeat. ``fps``: frames per second between the last two
    heartbeats; ``latency_p99_s``: the end-to-end (capture to publish) 99th percentile;
    ``received``: when it came (the caller's monotonic clock)."""

    camera_id: str
    state: str
    online: bool
    camera_state: str | None
    side: str
    recipe: str | None
    coil_id: str | None
    coil_md_m: float | None
    frames_total: int
    alerts_total: int
    fps: float | None
    drops_total: int
    drops: dict[str, int]
    latency_p99_s: float | None
    drift_ratio: float | None
    drifting: bool
    threshold: float | None
    publish_time: float
    received: float


@dataclass(frozen=True, kw_only=True)
class CameraPanel:
    """What the camera panel shows: the camera's last state (None before its first heartbeat),
    whether it went silent, its latest frame's summary, and what this station missed."""

    camera_id: str
    view: CameraView | None
    silent: bool
    frame_id: int | None
    frame_max_score: float | None
    frame_threshold: float | None
    has_preview: bool
    has_map: bool
    lost: int
    bad: int


@dataclass(frozen=True, kw_only=True)
class CoilView:
    """A coil as seen live: what its start said, the defects of its alerts (``sources`` holds
    each alert's ``path``), how far each side's cameras have reached (m), the coil service's
    families and grading, and whether it ended (``closed``: the coil service's summary)."""

    coil_id: str
    grade: str | None
    width_mm: float | None
    thickness_mm: float | None
    nominal_length_m: float | None
    ended: bool
    reach_m: dict[str, float]
    defects: tuple[CoilDefect, ...]
    families: tuple[PeriodicFamily, ...]
    grading: Grading | None
    closed: dict[str, Any] | None
    dropped_defects: int


# --- pure parsers: a header (and its binary parts) to a view --------------------------------


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def decode_thumbnail(value: Any) -> bytes | None:
    """The alert's base64 PNG, or None when absent or not a PNG (the alert itself is still good)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(PNG_MAGIC) else None


def alert_from_header(h: dict[str, Any]) -> AlertView:
    """An alert header as a view; KeyError, TypeError or ValueError when it is not one."""
    box = tuple(int(v) for v in h["box"])
    if len(box) != 4:
        raise ValueError(f"box must be [x, y, w, h], got {h['box']!r}")
    threshold = threshold_of(h["threshold"])
    journal = h.get("journal")
    confidence = h.get("class_confidence")
    md = float(h["md_m"])
    view = AlertView(
        camera_id=str(h["camera_id"]),
        seq=int(h["seq"]),
        journal=None if journal is None else str(journal),
        frame_id=None if h.get("frame_id") is None else int(h["frame_id"]),
        coil_id=None if h.get("coil_id") is None else str(h["coil_id"]),
        side=str(h.get("side") or "top"),
        md_m=md,
        strip_md_m=float(h.get("strip_md_m", md)),
        cd_mm=float(h["cd_mm"]),
        length_mm=float(h["length_mm"]),
        width_mm=float(h["width_mm"]),
        area_mm2=float(h["area_mm2"]),
        max_score=float(h["max_score"]),
        mean_score=_opt_float(h.get("mean_score")),
        threshold=threshold,
        klass=str(h.get("class") or "unknown"),
        class_confidence=_opt_float(confidence),
        box=(box[0], box[1], box[2], box[3]),
        capture_time=float(h["capture_time"]),
        publish_time=float(h["publish_time"]),
        thumbnail=decode_thumbnail(h.get("thumbnail_png")),
    )
    if view.side not in SIDES:
        raise ValueError(f"side must be top or bottom, got {view.side!r}")
    numbers = (view.md_m, view.cd_mm, view.length_mm, view.width_mm, view.area_mm2, view.max_score)
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError("alert has a number that is not finite")
    return view


def frame_parts(h: dict[str, Any], parts: Sequence[bytes]) -> dict[str, bytes]:
    """A frame's binary parts by name, in the order the header's ``parts`` lists them. A header
    without ``parts`` and with ``map_shape`` and one part is a map alone (daemons from before
    previews)."""
    names = h.get("parts")
    if names is None:
        names = ["map"] if "map_shape" in h and len(parts) == 1 else []
    if not isinstance(names, list) or len(names) != len(parts):
        raise ValueError(f"header lists parts {names!r} but {len(parts)} came")
    return {str(n): p for n, p in zip(names, parts, strict=True)}


def frame_from_message(h: dict[str, Any], parts: Sequence[bytes]) -> FrameView:
    """A frame message as a view; KeyError, TypeError or ValueError when it is not one."""
    named = frame_parts(h, parts)
    score_map = None
    if "map" in named:
        shape = tuple(int(v) for v in h["map_shape"])
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"map_shape must be [rows, cols], got {h['map_shape']!r}")
        data = named["map"]
        if len(data) != shape[0] * shape[1] * 2:
            raise ValueError(f"map part has {len(data)} bytes, map_shape {list(shape)} needs {shape[0] * shape[1] * 2}")
        score_map = np.frombuffer(data, dtype="<f2").reshape(shape)
    preview, preview_shape = None, None
    if "preview" in named:
        preview = named["preview"]
        if not preview.startswith(JPEG_MAGIC):
            raise ValueError("preview part is not a JPEG")
        if "preview_shape" in h:
            ph, pw = (int(v) for v in h["preview_shape"])
        else:
            img = cv2.imdecode(np.frombuffer(preview, np.uint8), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise ValueError("preview JPEG cannot be decoded")
            ph, pw = img.shape[:2]
        if ph < 1 or pw < 1:
            raise ValueError(f"preview_shape must be positive, got {[ph, pw]}")
        preview_shape = (ph, pw)
    valid = h.get("valid_rows")
    if valid is not None:
        v0, v1 = (int(v) for v in valid)
    else:
        v0, v1 = 0, (score_map.shape[0] if score_map is not None else 0)
    md, pitch = h.get("md_m"), h.get("mm_per_line")
    md_end = None if md is None or pitch is None else float(md) + v1 * float(pitch) / 1000.0
    return FrameView(
        camera_id=str(h["camera_id"]),
        frame_id=int(h["frame_id"]),
        seq=int(h["seq"]),
        capture_time=float(h.get("capture_time") or 0.0),
        coil_id=None if h.get("coil_id") is None else str(h["coil_id"]),
        side=str(h.get("side") or "top"),
        md_m=None if md is None else float(md),
        md_end_m=md_end,
        max_score=float(h.get("max_score") or 0.0),
        defects=int(h.get("defects") or 0),
        threshold=threshold_of(h["threshold"]),
        valid_rows=(v0, v1),
        score_map=score_map,
        preview=preview,
        preview_shape=preview_shape,
    )


def camera_from_heartbeat(h: dict[str, Any], previous: CameraView | None, *, now: float) -> CameraView:
    """A heartbeat as the camera's state; the frame rate from the frame counts of this heartbeat
    and ``previous`` (the rate before, when the daemon restarted and its counts began again)."""
    counts, coil, cam = h.get("counts") or {}, h.get("coil") or {}, h.get("camera") or {}
    drift, latency = h.get("drift") or {}, h.get("latency_seconds") or {}
    frames, t = int(counts.get("frames_total", 0)), float(h["publish_time"])
    fps = previous.fps if previous is not None else None
    if previous is not None and t > previous.publish_time and frames >= previous.frames_total:
        fps = (frames - previous.frames_total) / (t - previous.publish_time)
    drops = {str(k): int(v) for k, v in (h.get("drops") or {}).items()}
    p99 = (latency.get("end_to_end") or {}).get("p99")
    threshold = h.get("threshold")
    state = str(h.get("state") or "unknown")
    return CameraView(
        camera_id=str(h["camera_id"]),
        state=state,
        online=bool(cam.get("online")),
        camera_state=None if cam.get("state") is None else str(cam["state"]),
        side=str(h.get("side") or "top"),
        recipe=None if h.get("recipe") is None else str(h["recipe"]),
        coil_id=None if coil.get("coil_id") is None else str(coil["coil_id"]),
        coil_md_m=_opt_float(coil.get("md_m")),
        frames_total=frames,
        alerts_total=int(counts.get("alerts_total", 0)),
        fps=fps,
        drops_total=sum(drops.values()),
        drops=drops,
        latency_p99_s=_opt_float(p99),
        drift_ratio=_opt_float(drift.get("drift_ratio")),
        drifting=bool(drift.get("drifting")),
        threshold=None if threshold is None else threshold_of(threshold),
        publish_time=t,
        received=now,
    )


def family_from_header(h: dict[str, Any]) -> PeriodicFamily:
    """A coil service ``periodic`` message as the family it announces."""
    values = {k: h[k] for k in _FAMILY_FIELDS if k in h}
    values["md_m"] = tuple(float(v) for v in h["md_m"])
    return PeriodicFamily(**values)


def grading_from_header(h: dict[str, Any]) -> Grading:
    """A coil service ``grading`` message as the grading it announces."""
    outcomes = tuple(RuleOutcome(**{k: o[k] for k in _OUTCOME_FIELDS}) for o in h["outcomes"])
    return Grading(grade=str(h["grade"]), disposition=str(h["disposition"]), outcomes=outcomes, final=bool(h["final"]))


def defect_of(a: AlertView) -> CoilDefect:
    """An alert as a mark on its coil's map (the live view; the coil records merge views)."""
    return CoilDefect(
        coil_id=a.coil_id or "",
        side=a.side,
        md_m=a.md_m,
        cd_mm=a.cd_mm,
        length_mm=a.length_mm,
        width_mm=a.width_mm,
        area_mm2=a.area_mm2,
        score=a.max_score,
        cameras=(a.camera_id,),
        sources=(a.path,),
        klass=None if a.klass == "unknown" else a.klass,
    )


# --- the state ----------------------------------------------------------------------------------


@dataclass
class _Camera:
    view: CameraView | None = None
    frame: FrameView | None = None
    overlay: tuple[int, bytes] | None = None  # (frame_id, PNG) of the last overlay drawn
    last_seq: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    bad: int = 0


@dataclass
class _Coil:
    coil_id: str
    grade: str | None = None
    width_mm: float | None = None
    thickness_mm: float | None = None
    nominal_length_m: float | None = None
    ended: bool = False
    reach_m: dict[str, float] = field(default_factory=dict)
    defects: list[CoilDefect] = field(default_factory=list)
    families: dict[tuple[str, int, int], PeriodicFamily] = field(default_factory=dict)
    grading: Grading | None = None
    closed: dict[str, Any] | None = None
    dropped: int = 0


class LineState:
    """Thread-safe: follower threads write, the web app reads."""

    def __init__(
        self,
        *,
        cameras: Sequence[str],
        recent_alerts: int,
        stale_s: float,
        coils_kept: int = 4,
        defects_per_coil: int = 20_000,
        heat_crop_px: int = 192,
    ) -> None:
        if not cameras or len(set(cameras)) != len(cameras):
            raise ValueError(f"cameras must be distinct names, at least one, got {list(cameras)}")
        for name, value in (("recent_alerts", recent_alerts), ("coils_kept", coils_kept)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if defects_per_coil < 1 or heat_crop_px < 8 or not stale_s > 0:
            raise ValueError("defects_per_coil >= 1, heat_crop_px >= 8 and stale_s > 0 are needed")
        self.camera_ids = tuple(cameras)
        self.stale_s = stale_s
        self.coils_kept = coils_kept
        self.defects_per_coil = defects_per_coil
        self.heat_crop_px = heat_crop_px
        self._lock = threading.Lock()
        self._cameras = {c: _Camera() for c in cameras}
        self._alerts: deque[AlertView] = deque(maxlen=recent_alerts)
        self._by_key: dict[tuple[str, str | None, int], AlertView] = {}
        self._heat: dict[tuple[str, str | None, int], bytes] = {}
        self._coils: OrderedDict[str, _Coil] = OrderedDict()
        self._last_coil: str | None = None
        self.coil_service_bad = 0

    # --- from the followers ----------------------------------------------------------------

    def on_camera(
        self, camera_id: str, topic: str, header: dict[str, Any], parts: Sequence[bytes], *, now: float
    ) -> list[Update]:
        """One message of a camera's stream; a message that is not what docs/messages.md says is
        counted (``bad``) and changes nothing."""
        if camera_id not in self._cameras:
            raise ValueError(f"unknown camera {camera_id!r}")
        try:
            if header.get("camera_id") != camera_id:
                raise ValueError(f"message of camera {header.get('camera_id')!r} on {camera_id}'s stream")
            if topic == "alert":
                return self._on_alert(alert_from_header(header))
            if topic == "frame":
                return self._on_frame(frame_from_message(header, parts))
            if topic == "heartbeat":
                return self._on_heartbeat(camera_id, header, now=now)
            if topic == "coil":
                return self._on_coil_event(header)
            return []
        except (KeyError, TypeError, ValueError):
            with self._lock:
                self._cameras[camera_id].bad += 1
            raise

    def on_coil_service(self, topic: str, header: dict[str, Any]) -> list[Update]:
        """One message of the coil service's stream (grading, periodic, coil_closed)."""
        try:
            coil_id = str(header["coil_id"])
            with self._lock:
                coil = self._coil(coil_id)
                if topic == "grading":
                    coil.grading = grading_from_header(header)
                    what = coil.grading.disposition
                elif topic == "periodic":
                    f = family_from_header(header)
                    coil.families[(f.side, round(f.cd_mm), round(f.period_m * 1000))] = f
                    what = f"{f.side} every {f.period_m:.3f} m"
                elif topic == "coil_closed":
                    coil.closed = dict(header)
                    coil.ended = True
                    what = str(header.get("disposition"))
                else:
                    return []
            return [Update(kind="coil", data={"coil_id": coil_id, "event": topic, "what": what})]
        except (KeyError, TypeError, ValueError):
            with self._lock:
                self.coil_service_bad += 1
            raise

    def _count_seq(self, cam: _Camera, topic: str, seq: int) -> None:
        """A jump in ``seq`` is messages this station lost; a step back is the daemon (or its
        alert journal) starting again."""
        last = cam.last_seq.get(topic)
        if last is not None and seq > last + 1:
            cam.lost += seq - last - 1
        cam.last_seq[topic] = seq

    def _on_alert(self, a: AlertView) -> list[Update]:
        with self._lock:
            self._count_seq(self._cameras[a.camera_id], "alert", a.seq)
            if len(self._alerts) == self._alerts.maxlen:
                old = self._alerts[0]
                if self._by_key.get(old.key) is old:
                    del self._by_key[old.key]
                    self._heat.pop(old.key, None)
            self._alerts.append(a)
            self._by_key[a.key] = a
            if a.coil_id is not None:
                coil = self._coil(a.coil_id)
                if len(coil.defects) < self.defects_per_coil:
                    coil.defects.append(defect_of(a))
                else:
                    coil.dropped += 1
                coil.reach_m[a.side] = max(coil.reach_m.get(a.side, 0.0), a.md_m)
        return [
            Update(
                kind="alert",
                data={
                    "camera": a.camera_id,
                    "path": a.path,
                    "seq": a.seq,
                    "coil_id": a.coil_id,
                    "side": a.side,
                    "class": a.klass,
                    "md_m": a.md_m,
                    "cd_mm": a.cd_mm,
                    "ratio": round(a.ratio, 3),
                },
            )
        ]

    def _on_frame(self, f: FrameView) -> list[Update]:
        with self._lock:
            cam = self._cameras[f.camera_id]
            self._count_seq(cam, "frame", f.seq)
            cam.frame = f
            waiting = [
                a
                for a in self._alerts
                if (a.camera_id, a.frame_id) == (f.camera_id, f.frame_id) and a.key not in self._heat
            ]
            if f.coil_id is not None and f.md_end_m is not None:
                coil = self._coil(f.coil_id)
                coil.reach_m[f.side] = max(coil.reach_m.get(f.side, 0.0), f.md_end_m)
        # The crops are drawn outside the lock (a few ms each); the frame's alerts came before it.
        crops = {}
        if f.score_map is not None:
            for a in waiting:
                img = heat_crop(f.score_map, f.threshold, box=a.box, valid_rows=f.valid_rows, out_px=self.heat_crop_px)
                if img is not None:
                    crops[a.key] = encode_png(img)
        with self._lock:
            for key, png in crops.items():
                if key in self._by_key:
                    self._heat[key] = png
        return [
            Update(
                kind="frame",
                data={
                    "camera": f.camera_id,
                    "frame_id": f.frame_id,
                    "max_score": f.max_score,
                    "threshold": f.threshold,
                    "defects": f.defects,
                    "preview": f.preview is not None,
                    "map": f.score_map is not None,
                },
            )
        ]

    def _on_heartbeat(self, camera_id: str, h: dict[str, Any], *, now: float) -> list[Update]:
        with self._lock:
            cam = self._cameras[camera_id]
            self._count_seq(cam, "heartbeat", int(h["seq"]))
            view = camera_from_heartbeat(h, cam.view, now=now)
            cam.view = view
            if view.coil_id is not None:
                coil = self._coil(view.coil_id)
                self._last_coil = view.coil_id
                if view.coil_md_m is not None:
                    coil.reach_m[view.side] = max(coil.reach_m.get(view.side, 0.0), view.coil_md_m)
        return [
            Update(
                kind="camera",
                data={
                    "camera": camera_id,
                    "state": view.state,
                    "fps": view.fps,
                    "coil_id": view.coil_id,
                    "drops": view.drops_total,
                },
            )
        ]

    def _on_coil_event(self, h: dict[str, Any]) -> list[Update]:
        event, coil_id = str(h["event"]), h.get("coil_id")
        if event not in ("start", "end") or not coil_id:
            raise ValueError(f"coil event {event!r} of coil {coil_id!r}")
        with self._lock:
            coil = self._coil(str(coil_id))
            if event == "start":
                coil.grade = None if h.get("grade") is None else str(h["grade"])
                coil.width_mm = _opt_float(h.get("width_mm"))
                coil.thickness_mm = _opt_float(h.get("thickness_mm"))
                coil.nominal_length_m = _opt_float(h.get("length_m"))
                self._last_coil = coil.coil_id
            else:
                coil.ended = True
        return [Update(kind="coil", data={"coil_id": str(coil_id), "event": event, "what": event})]

    def _coil(self, coil_id: str) -> _Coil:
        """The live coil ``coil_id``, made when first heard of; the oldest beyond ``coils_kept`` go."""
        coil = self._coils.get(coil_id)
        if coil is None:
            coil = self._coils[coil_id] = _Coil(coil_id=coil_id)
            while len(self._coils) > self.coils_kept:
                self._coils.popitem(last=False)
        return coil

    # --- for the pages -----------------------------------------------------------------------

    def panels(self, *, now: float) -> list[CameraPanel]:
        out = []
        with self._lock:
            for cid, cam in self._cameras.items():
                v, f = cam.view, cam.frame
                out.append(
                    CameraPanel(
                        camera_id=cid,
                        view=v,
                        silent=v is None or now - v.received > self.stale_s,
                        frame_id=None if f is None else f.frame_id,
                        frame_max_score=None if f is None else f.max_score,
                        frame_threshold=None if f is None else f.threshold,
                        has_preview=f is not None and f.preview is not None,
                        has_map=f is not None and f.score_map is not None,
                        lost=cam.lost,
                        bad=cam.bad,
                    )
                )
        return out

    def alerts(self, *, limit: int | None = None) -> list[AlertView]:
        """The recent alerts, newest first."""
        with self._lock:
            items = list(self._alerts)
        items.reverse()
        return items if limit is None else items[:limit]

    def alert(self, camera_id: str, journal: str | None, seq: int) -> AlertView | None:
        with self._lock:
            return self._by_key.get((camera_id, journal, seq))

    def heat_png(self, camera_id: str, journal: str | None, seq: int) -> bytes | None:
        """The heat-map crop around an alert, when its frame came with a map."""
        with self._lock:
            return self._heat.get((camera_id, journal, seq))

    def frame(self, camera_id: str) -> FrameView | None:
        with self._lock:
            cam = self._cameras.get(camera_id)
            return None if cam is None else cam.frame

    def overlay_png(self, camera_id: str) -> tuple[int, bytes] | None:
        """(frame_id, RGBA PNG) of the latest frame's heat map at its preview's size (the map's
        own without a preview); drawn once per frame, whoever asks."""
        with self._lock:
            cam = self._cameras.get(camera_id)
            if cam is None or cam.frame is None or cam.frame.score_map is None:
                return None
            f, cached = cam.frame, cam.overlay
        if cached is not None and cached[0] == f.frame_id:
            return cached
        assert f.score_map is not None
        size = None if f.preview_shape is None else (f.preview_shape[1], f.preview_shape[0])
        png = encode_png(heat_rgba(f.score_map, f.threshold, size=size))
        drawn = (f.frame_id, png)
        with self._lock:
            cam.overlay = drawn
        return drawn

    def classes(self) -> list[str]:
        """Classes the recent alerts carry (for the label field's suggestions)."""
        with self._lock:
            return sorted({a.klass for a in self._alerts if a.klass != "unknown"})

    def current_coil_id(self) -> str | None:
        """The coil the cameras reported last (heartbeat or coil start)."""
        with self._lock:
            return self._last_coil

    def coil(self, coil_id: str) -> CoilView | None:
        with self._lock:
            c = self._coils.get(coil_id)
            if c is None:
                return None
            return CoilView(
                coil_id=c.coil_id,
                grade=c.grade,
                width_mm=c.width_mm,
                thickness_mm=c.thickness_mm,
                nominal_length_m=c.nominal_length_m,
                ended=c.ended,
                reach_m=dict(c.reach_m),
                defects=tuple(c.defects),
                families=tuple(c.families.values()),
                grading=c.grading,
                closed=None if c.closed is None else dict(c.closed),
                dropped_defects=c.dropped,
            )
