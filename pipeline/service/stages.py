"""The four stage loops and the typed items between them.

acquire -> (frames) -> embed: flat-field, ONNX -> (embedded) -> score: kNN, map, defects ->
(results) -> publish. With ``daemon.frames_in_flight: 2`` embedding frame n+1 and searching the
bank for frame n run at the same time (both release the GIL); with 1 (the default, lower
latency) each frame is embedded and searched before the next starts, each library using both
cores itself. The camera thread never waits for scoring:
a full queue drops the frame and counts it by stage and reason. Every loop beats its liveness
each time round (waits have timeouts), and each one after acquire drains: it ends at the end
marker its upstream queues after its last item.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.acquisition.edges import EdgeTracker, detect_edges, mask_outside
from pipeline.acquisition.linescan import BadBlockError, LineAssembler
from pipeline.acquisition.sources import Source
from pipeline.coil.tracking import CoilEvent, CoilTracker
from pipeline.config import DaemonConfig
from pipeline.postprocess.defects import defect_thumbnail, extract_defects, frame_preview
from pipeline.process import RateLimitedLog
from pipeline.service.camera import CameraSupervisor
from pipeline.service.drift import DriftMonitor
from pipeline.service.feedback import Region, Teacher
from pipeline.service.health import Liveness
from pipeline.service.slot import Model, ModelSlot
from pipeline.service.stats import Stats
from pipeline.transport.journal import AlertJournal, JournalError
from pipeline.transport.messages import Defect, Frame, LineBlock
from pipeline.transport.publish import Publisher, alert_body

log = logging.getLogger("stripinspect.daemon")
END = object()  # queued after a stage's last item
WAIT_S = 0.2  # every blocking wait in a stage loop is at most this long


@dataclass(frozen=True)
class Embedded:
    """A frame between the embed and score stages, with the model that was current when it was
    embedded (swaps happen between frames, never inside one)."""

    frame: Frame
    pixels: np.ndarray  # (lines, width, C) uint8, flat-field corrected
    # PatchCore: (lines / stride, width / stride, D) float32; learned encoders: one such map per scale
    features: Any
    model: Model
    seconds: dict[str, float]


@dataclass(frozen=True)
class Scored:
    """A frame after scoring: its defects, summary numbers and per-stage seconds."""

    frame: Frame
    defects: list[Defect]
    max_score: float
    seconds: dict[str, float]
    end_md_m: float  # MD of the frame's last line: where the camera is at capture_time
    threshold: float | list[float] = 0.0  # the frame's threshold (one per CD band with bands)
    score_map: np.ndarray | None = None  # (valid rows, width) float32, only when maps are published
    edges: tuple[float, float] | None = None  # detected strip edges (columns), when tracked
    thumbnails: tuple[str, ...] | None = None  # one base64 PNG per defect, when daemon.thumbnail_px > 0
    regions: tuple[Region, ...] = ()  # one per defect for feedback (PatchCore bundles), else empty
    classes: tuple[tuple[str, float | None], ...] = ()  # (class, confidence) per defect, with regions
    preview: tuple[bytes, tuple[int, int]] | None = None  # JPEG of the valid rows and its (h, w), when asked for


@dataclass(frozen=True)
class Flow:
    """What every stage shares: stop acquiring, a stage crashed (stop waiting), liveness."""

    stop: threading.Event
    crashed: threading.Event
    live: Liveness


def put_waiting(q: queue.Queue[Any], item: Any, *, flow: Flow, name: str) -> bool:
    """Put, waiting for room (a frame already embedded is not thrown away; the camera-side queue
    drops instead); False when a stage crashed meanwhile."""
    while True:
        try:
            q.put(item, timeout=WAIT_S)
            return True
        except queue.Full:
            flow.live.beat(name)
            if flow.crashed.is_set():
                return False


def get_waiting(q: queue.Queue[Any], *, flow: Flow, name: str, upstream_done: threading.Event) -> Any:
    """The next item, or END once upstream has ended and the queue is empty."""
    while True:
        flow.live.beat(name)
        try:
            return q.get(timeout=WAIT_S)
        except queue.Empty:
            if upstream_done.is_set() and q.empty():
                return END


class AcquireStage:
    def __init__(
        self,
        *,
        camera: CameraSupervisor,
        assembler: LineAssembler,
        coils: CoilTracker,
        out: queue.Queue[Any],
        go: threading.Event,
        done: threading.Event,
        stats: Stats,
        flow: Flow,
    ) -> None:
        self.camera, self.assembler, self.coils, self.out = camera, assembler, coils, out
        self.go, self.done, self.stats, self.flow = go, done, stats, flow
        self._ratelog = RateLimitedLog(log, interval_s=10.0)

    def run(self) -> None:
        try:
            self._acquire()
        finally:
            self.camera.finish()  # handing on END may wait for room; the camera need not move
            self.done.set()
            put_waiting(self.out, END, flow=self.flow, name="acquire")

    def _acquire(self) -> None:
        stop, live = self.flow.stop, self.flow.live
        while not stop.is_set() and not self.go.wait(WAIT_S):
            live.beat("acquire")
        self.camera.start()
        while not stop.is_set():
            live.beat("acquire")
            try:
                block, resumed = self.camera.read(timeout=WAIT_S)
            except EOFError:
                break
            if block is None:
                continue
            # From the block's arrival: the wait for the camera is line time, not work.
            t0 = time.perf_counter()
            # Where the strip is at the camera: a coil command without a line takes this one.
            self.coils.camera_line = block.first_line + block.pixels.shape[0]
            if resumed:
                self.assembler.reset()  # lines across the outage are gone; start a new sequence
            frames = self._assemble(block)
            if frames is None:
                continue
            self.stats.count("lines_total", block.pixels.shape[0])
            for f in frames:
                self.stats.count("frames_total")
                self.stats.time({"acquire": time.perf_counter() - t0})
                try:
                    self.out.put_nowait(f)
                except queue.Full:
                    self.stats.drop("score", "queue_full")

    def _assemble(self, block: LineBlock) -> list[Frame] | None:
        """Frames completed by ``block``; None when the block is bad (counted by reason, logged
        at a limited rate, skipped). After lost lines the block starts a new frame sequence."""
        try:
            return self.assembler.push(block)
        except BadBlockError as err:
            self.stats.drop("acquire", err.reason)
            self._ratelog.warning(err.reason, "line block skipped: %s", err)
            if err.reason != "line_gap":
                return None
        self.assembler.reset()
        try:
            return self.assembler.push(block)
        except BadBlockError as err:  # pragma: no cover - the block was checked just above
            self.stats.drop("acquire", err.reason)
            return None


class EmbedStage:
    def __init__(
        self,
        *,
        slot: ModelSlot,
        inp: queue.Queue[Any],
        upstream_done: threading.Event,
        out: queue.Queue[Any],
        done: threading.Event,
        in_flight: threading.Semaphore,
        stats: Stats,
        flow: Flow,
    ) -> None:
        self.slot, self.inp, self.upstream_done, self.out, self.done = slot, inp, upstream_done, out, done
        self.in_flight, self.stats, self.flow = in_flight, stats, flow
        self._ratelog = RateLimitedLog(log, interval_s=10.0)

    def run(self) -> None:
        try:
            self._embed()
        finally:
            self.done.set()
            put_waiting(self.out, END, flow=self.flow, name="embed")

    def _embed(self) -> None:
        flow = self.flow
        while (item := get_waiting(self.inp, flow=flow, name="embed", upstream_done=self.upstream_done)) is not END:
            model = self.slot.take()  # between frames: no frame is scored half by each model
            # A token per frame between the start of embedding and the end of scoring.
            while not self.in_flight.acquire(timeout=WAIT_S):
                flow.live.beat("embed")
                if flow.crashed.is_set():
                    return
            t0 = time.perf_counter()
            pixels = item.pixels if model.flatfield is None else model.flatfield.apply(item.pixels)
            t1 = time.perf_counter()
            try:
                feats = model.embed(pixels)
            except ValueError as err:
                self.in_flight.release()
                self.stats.drop("embed", "bad_frame")
                self._ratelog.warning("embed", "frame %d skipped: %s", item.frame_id, err)
                continue
            t2 = time.perf_counter()
            embedded = Embedded(
                frame=item,
                pixels=pixels,
                features=feats,
                model=model,
                seconds={"preprocess": t1 - t0, "embed": t2 - t1},
            )
            if not put_waiting(self.out, embedded, flow=flow, name="embed"):
                return


class ScoreStage:
    def __init__(
        self,
        *,
        slot: ModelSlot,
        inp: queue.Queue[Any],
        upstream_done: threading.Event,
        out: queue.Queue[Any],
        done: threading.Event,
        in_flight: threading.Semaphore,
        edge_tracker: EdgeTracker,
        drift: DriftMonitor,
        teacher: Teacher,
        stats: Stats,
        flow: Flow,
    ) -> None:
        self.slot, self.inp, self.upstream_done, self.out, self.done = slot, inp, upstream_done, out, done
        self.in_flight, self.edge_tracker, self.drift, self.teacher = in_flight, edge_tracker, drift, teacher
        self.stats, self.flow = stats, flow
        self._ratelog = RateLimitedLog(log, interval_s=10.0)

    def run(self) -> None:
        try:
            while (
                item := get_waiting(self.inp, flow=self.flow, name="score", upstream_done=self.upstream_done)
            ) is not END:
                try:
                    scored = self._score(item)
                finally:
                    self.in_flight.release()
                if scored is None:
                    continue
                try:
                    self.out.put_nowait(scored)
                except queue.Full:
                    self.stats.drop("publish", "queue_full")
        finally:
            self.done.set()
            put_waiting(self.out, END, flow=self.flow, name="score")

    def _score(self, item: Embedded) -> Scored | None:
        frame, model, cfg = item.frame, item.model, item.model.cfg
        h, w = item.pixels.shape[:2]
        t0 = time.perf_counter()
        try:
            band, first_row = model.search(item.features, valid=(frame.valid_from, frame.valid_to), lines=h)
        except ValueError as err:
            self.stats.drop("score", "bad_frame")
            self._ratelog.warning("score", "frame %d skipped: %s", frame.frame_id, err)
            return None
        t1 = time.perf_counter()
        amap = model.score_map(band, first_row, out_hw=(h, w))
        t2 = time.perf_counter()
        left = cfg.strip_edge_px
        edges = None
        if cfg.track_edges:
            edges = self.edge_tracker.update(detect_edges(item.pixels))
            if edges is not None:
                amap = mask_outside(amap, edges)
                left = edges[0]
        defects = extract_defects(
            amap,
            frame=frame,
            threshold=model.threshold,
            min_area_px=cfg.min_area_px,
            mm_per_px=cfg.mm_per_px,
            mm_per_line=cfg.mm_per_line,
            strip_left_px=left,
            cd_offset_mm=cfg.cd_offset_mm,
        )
        thumbs = None
        if cfg.thumbnail_px and defects:
            thumbs = tuple(
                base64.b64encode(defect_thumbnail(item.pixels, d.box, side_px=cfg.thumbnail_px)).decode("ascii")
                for d in defects
            )
        scorer = model.frame_scorer.scorer
        regions = self.teacher.regions(
            item.features,
            defects,
            stride=getattr(scorer, "stride", 0),
            overlay=getattr(scorer, "overlay", None),
            band=band,
            first_row=first_row,
        )
        classes = tuple(self.teacher.classify(r) for r in regions)
        t3 = time.perf_counter()
        valid = amap[frame.valid_from : frame.valid_to]
        preview = None
        if cfg.preview_px:
            preview = frame_preview(item.pixels[frame.valid_from : frame.valid_to], width=cfg.preview_px)
        self.drift.track(valid)
        self.stats.count("frames_scored_total")
        return Scored(
            frame=frame,
            defects=defects,
            max_score=float(valid.max()),
            end_md_m=frame.md_m + h * cfg.mm_per_line / 1000.0,
            threshold=self.slot.threshold_json(model),
            score_map=valid if cfg.publish_maps else None,
            edges=edges,
            thumbnails=thumbs,
            regions=tuple(regions),
            classes=classes,
            preview=preview,
            seconds={**item.seconds, "knn": t1 - t0, "map": t2 - t1, "defects": t3 - t2},
        )


class PublishStage:
    """Frames and alerts as they come, and a heartbeat every ``heartbeat_s`` (the PUB socket is
    used from this thread only). ``recent_alerts()``: the last alert headers, for a console."""

    def __init__(
        self,
        *,
        publisher: Publisher,
        journal: AlertJournal | None,
        coils: CoilTracker,
        side: str,
        mm_per_line: float,
        inp: queue.Queue[Any],
        upstream_done: threading.Event,
        heartbeat: Callable[[], dict[str, Any]],
        heartbeat_s: float,
        drained: Callable[[], None],
        teacher: Teacher,
        stats: Stats,
        flow: Flow,
    ) -> None:
        self.teacher = teacher
        self.publisher, self.journal, self.inp, self.upstream_done = publisher, journal, inp, upstream_done
        self.coils, self.side, self.mm_per_line = coils, side, mm_per_line
        self.heartbeat, self.heartbeat_s, self.drained = heartbeat, heartbeat_s, drained
        self.stats, self.flow = stats, flow
        self._recent: deque[dict[str, Any]] = deque(maxlen=256)
        self._recent_lock = threading.Lock()

    def recent_alerts(self) -> list[dict[str, Any]]:
        with self._recent_lock:
            return list(self._recent)

    def run(self) -> None:
        next_beat = time.monotonic()
        while True:
            self.flow.live.beat("publish")
            now = time.monotonic()
            if now >= next_beat:
                self.publisher.send("heartbeat", self.heartbeat())
                next_beat = now + self.heartbeat_s
            try:
                item = self.inp.get(timeout=min(WAIT_S, max(0.0, next_beat - now)))
            except queue.Empty:
                if self.upstream_done.is_set() and self.inp.empty():
                    break
                continue
            if item is END:
                break
            self._publish(item)
        self.drained()
        self.publisher.send("heartbeat", self.heartbeat())

    def _publish(self, item: Scored) -> None:
        t0 = time.perf_counter()
        f = item.frame
        # Coil starts and ends this frame's lines have reached, before its alerts: a coil's
        # start precedes its first alert in every camera's stream.
        for event in self.coils.events_through(f.first_line + f.valid_to - 1):
            self._publish_coil(event)
        self._publish_alerts(f, item, capture_md_m=item.end_md_m)
        coil_id, coil_md = self.coils.locate(f.first_line + f.valid_from)
        parts: tuple[bytes, ...] = ()
        map_header: dict[str, Any] = {}
        names: list[str] = []
        if item.score_map is not None:
            parts += (item.score_map.astype("<f2").tobytes(),)
            names.append("map")
            map_header = {"map_shape": list(item.score_map.shape), "map_dtype": "float16 little-endian"}
        if item.preview is not None:
            parts += (item.preview[0],)
            names.append("preview")
            map_header["preview_shape"] = list(item.preview[1])
        if names:
            map_header["parts"] = names
        self.publisher.send(
            "frame",
            {
                **map_header,
                "frame_id": f.frame_id,
                "capture_time": f.capture_time,
                "first_line": f.first_line,
                "coil_id": coil_id,
                "side": self.side,
                # MD of row 0 from the head of the coil of the first valid row (negative when the
                # frame's context reaches back into the previous coil).
                "md_m": coil_md - f.valid_from * self.mm_per_line / 1000.0,
                "strip_md_m": f.md_m,
                "mm_per_line": self.mm_per_line,
                "lines": int(f.pixels.shape[0]),
                "valid_rows": [f.valid_from, f.valid_to],
                "max_score": item.max_score,
                "defects": len(item.defects),
                "threshold": item.threshold,
                "strip_edges_px": None if item.edges is None else [round(e, 2) for e in item.edges],
            },
            parts,
        )
        self.stats.count("alerts_total", len(item.defects))
        secs = dict(item.seconds)
        secs["publish"] = time.perf_counter() - t0
        secs["end_to_end"] = time.time() - f.capture_time
        self.stats.time(secs)

    def _publish_coil(self, event: CoilEvent) -> None:
        self.publisher.send("coil", {**event.body(mm_per_line=self.mm_per_line), "frame_id": None, "side": self.side})

    def _publish_alerts(self, frame: Frame, item: Scored, *, capture_md_m: float) -> None:
        defects, thumbnails = item.defects, item.thumbnails
        headers = []
        for i, d in enumerate(defects):
            coil_id, md = self.coils.locate(d.line)
            body = alert_body(frame, d, capture_md_m=capture_md_m)
            # The daemon's MD is from strip line 0; alerts carry the coil's (strip_md_m keeps the
            # other), and the camera's position in the same terms, so that the reject actuator's
            # "how far past the camera" (capture_md_m - md_m) does not change.
            body.update(coil_id=coil_id, md_m=md, strip_md_m=d.md_m, side=self.side)
            body["capture_md_m"] = md + (capture_md_m - d.md_m)
            body["journal"] = None if self.journal is None else self.journal.journal_id
            body["thumbnail_png"] = None if thumbnails is None else thumbnails[i]
            body["class"], body["class_confidence"] = item.classes[i] if item.classes else ("unknown", None)
            headers.append(self.publisher.stamp("alert", body))
        if not headers:
            return
        journaled = False
        if self.journal is not None:
            try:
                self.journal.append(headers)  # committed before anyone can see them
                journaled = True
            except JournalError as err:
                # Inspection goes on: the alerts are still published live, numbered after the
                # last one, and the journal skips their numbers.
                self.stats.drop("journal", "write_error")
                log.error("%s", err)
        if not journaled:
            for i, h in enumerate(headers, start=1):
                h["seq"] = self.publisher.seq["alert"] + i
            if self.journal is not None:
                self.journal.last_seq = headers[-1]["seq"]
        for i, h in enumerate(headers):
            if item.regions:
                self.teacher.remember(h.get("journal"), int(h["seq"]), item.regions[i])
            self.publisher.send_stamped(h)
        with self._recent_lock:
            self._recent.extend(headers)


@dataclass(frozen=True)
class Stages:
    """The four stages joined by their bounded queues: ``runs`` in start order (publish first,
    so every stage finds its consumer running; acquire last), the publish stage (recent alerts)
    and the event that starts acquisition."""

    runs: tuple[tuple[str, Callable[[], None]], ...]
    publish: PublishStage
    go: threading.Event


def build_stages(
    *,
    cfg: DaemonConfig,
    source: Source,
    camera: CameraSupervisor,
    slot: ModelSlot,
    publisher: Publisher,
    journal: AlertJournal | None,
    coils: CoilTracker,
    drift: DriftMonitor,
    heartbeat: Callable[[], dict[str, Any]],
    drained: Callable[[], None],
    teacher: Teacher,
    stats: Stats,
    flow: Flow,
) -> Stages:
    frames: queue.Queue[Any] = queue.Queue(maxsize=cfg.queue_frames)
    # Small: only the embed/score hand-over; backpressure beyond it lands on `frames`.
    embedded: queue.Queue[Any] = queue.Queue(maxsize=2)
    results: queue.Queue[Any] = queue.Queue(maxsize=cfg.queue_results)
    acquired, embedding_done, scoring_done = threading.Event(), threading.Event(), threading.Event()
    # Tokens for frames between the start of embedding and the end of scoring.
    in_flight = threading.Semaphore(cfg.frames_in_flight)
    go = threading.Event()
    assembler = LineAssembler(
        width=source.width,
        channels=source.channels,
        lines=cfg.frame_lines,
        overlap=cfg.overlap_lines,
        mm_per_line=cfg.mm_per_line,
        camera_id=cfg.camera_id,
    )
    publish = PublishStage(
        publisher=publisher,
        journal=journal,
        coils=coils,
        side=cfg.side,
        mm_per_line=cfg.mm_per_line,
        inp=results,
        upstream_done=scoring_done,
        heartbeat=heartbeat,
        heartbeat_s=cfg.heartbeat_s,
        drained=drained,
        teacher=teacher,
        stats=stats,
        flow=flow,
    )
    score = ScoreStage(
        slot=slot,
        inp=embedded,
        upstream_done=embedding_done,
        out=results,
        done=scoring_done,
        in_flight=in_flight,
        edge_tracker=EdgeTracker(max_jump_px=cfg.max_edge_jump_px),
        drift=drift,
        teacher=teacher,
        stats=stats,
        flow=flow,
    )
    embed = EmbedStage(
        slot=slot,
        inp=frames,
        upstream_done=acquired,
        out=embedded,
        done=embedding_done,
        in_flight=in_flight,
        stats=stats,
        flow=flow,
    )
    acquire = AcquireStage(
        camera=camera, assembler=assembler, coils=coils, out=frames, go=go, done=acquired, stats=stats, flow=flow
    )
    runs = (("publish", publish.run), ("score", score.run), ("embed", embed.run), ("acquire", acquire.run))
    return Stages(runs=runs, publish=publish, go=go)
