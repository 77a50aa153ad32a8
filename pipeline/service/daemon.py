"""The inspection daemon: the one place where stages, queues, threads and sockets are wired.

acquire -> (frames queue) -> embed: preprocess, ONNX -> (features queue) -> score: kNN, map,
defects -> (results queue) -> publish. Embedding frame n+1 and searching the bank for frame n
run at the same time (both release the GIL), so two cores are busy. The camera thread never
waits for scoring: a full queue drops the frame and counts it by stage and reason. Every loop
checks the stop event and waits with a timeout.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from pipeline.acquisition.edges import EdgeTracker, detect_edges, mask_outside
from pipeline.acquisition.flatfield import FlatField
from pipeline.acquisition.genicam import CameraError
from pipeline.acquisition.linescan import BadBlockError, LineAssembler
from pipeline.acquisition.sources import Source
from pipeline.config import DaemonConfig, RuntimeConfig, ScoringConfig
from pipeline.errors import StripinspectError
from pipeline.inference.backends import open_frame_scorer
from pipeline.inference.framescore import AnyFrameScorer
from pipeline.postprocess.defects import extract_defects, per_column
from pipeline.service.ratelog import RateLimitedLog
from pipeline.service.systemd import notify
from pipeline.transport.journal import AlertJournal, JournalError
from pipeline.transport.messages import Defect, Frame, LineBlock
from pipeline.transport.publish import Publisher, alert_body
from pipeline.transport.security import CurveServer

log = logging.getLogger("stripinspect.daemon")

STAGES = ("acquire", "preprocess", "embed", "knn", "map", "defects", "publish", "end_to_end")
_END = object()


@dataclass(frozen=True)
class Embedded:
    """A frame between the embed and score stages, with the model, threshold and settings that
    were current when it was embedded (swaps happen between frames, never inside one)."""

    frame: Frame
    pixels: np.ndarray  # (lines, width, C) uint8, flat-field corrected
    # PatchCore: (lines / stride, width / stride, D) float32; learned encoders: one such map per scale
    features: Any
    frame_scorer: AnyFrameScorer
    threshold: float | np.ndarray
    cfg: DaemonConfig
    seconds: dict[str, float]


@dataclass(frozen=True)
class Scored:
    """A frame after scoring: its defects, summary numbers and per-stage seconds."""

    frame: Frame
    defects: list[Defect]
    max_score: float
    seconds: dict[str, float]
    threshold: float | list[float] = 0.0  # the frame's threshold (one per CD band with bands)
    score_map: np.ndarray | None = None  # valid rows, only when maps are published
    edges: tuple[float, float] | None = None  # detected strip edges (columns), when tracked


@dataclass
class Stats:
    """Counters and latency windows; written by the stage threads under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter[str] = field(default_factory=Counter)
    drops: Counter[tuple[str, str]] = field(default_factory=Counter)
    latency: dict[str, deque[float]] = field(default_factory=lambda: {s: deque(maxlen=2048) for s in STAGES})

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def drop(self, stage: str, reason: str) -> None:
        with self.lock:
            self.drops[(stage, reason)] += 1

    def time(self, seconds: dict[str, float]) -> None:
        with self.lock:
            for k, v in seconds.items():
                self.latency[k].append(v)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = {
                k: {f"p{q}": float(np.percentile(list(v), q)) for q in (50, 95, 99)}
                for k, v in self.latency.items()
                if v
            }
            return {
                "counts": dict(self.counts),
                "drops": {f"{s}:{r}": n for (s, r), n in self.drops.items()},
                "latency_seconds": lat,
            }


class Daemon:
    """Construct, ``start()``, then ``stop()`` and ``join()``; or ``run_until_done()``."""

    def __init__(
        self,
        *,
        cfg: DaemonConfig,
        runtime: RuntimeConfig,
        scoring: ScoringConfig,
        source: Source,
        context: zmq.Context | None = None,
    ) -> None:
        self.cfg = cfg if cfg.recipe is None else cfg.with_recipe(cfg.recipe)
        cfg = self.cfg
        self.runtime = runtime
        self.scoring = scoring
        self.source = source
        self.stats = Stats()
        self.camera_online = True
        self._ratelog = RateLimitedLog(log, interval_s=10.0)
        self.stop_event = threading.Event()
        self.eof = threading.Event()  # acquisition has ended
        self.scoring_done = threading.Event()
        self._acquire_go = threading.Event()
        self._context = context or zmq.Context.instance()
        self.frame_scorer = self._load(cfg.bundle)
        if self.frame_scorer.scorer.channels != source.channels:
            raise StripinspectError(
                f"camera delivers {source.channels} channel(s), bundle {cfg.bundle} was fitted on "
                f"{self.frame_scorer.scorer.channels}"
            )
        self._pending: AnyFrameScorer | None = None
        self._pending_threshold: float | np.ndarray | None = None
        self._pending_recipe: tuple[DaemonConfig, FlatField | None] | None = None
        self._swap_lock = threading.Lock()
        self.assembler = LineAssembler(
            width=source.width,
            channels=source.channels,
            lines=cfg.frame_lines,
            overlap=cfg.overlap_lines,
            mm_per_line=cfg.mm_per_line,
            camera_id=cfg.camera_id,
        )
        if source.width % 16:
            raise StripinspectError(f"camera width {source.width} must be a multiple of 16")
        self.edge_tracker = EdgeTracker(max_jump_px=cfg.max_edge_jump_px)
        self.flatfield: FlatField | None = None
        if cfg.flatfield is not None:
            self.flatfield = FlatField.from_file(cfg.flatfield, width=source.width)
        self.frames: queue.Queue[Any] = queue.Queue(maxsize=cfg.queue_frames)
        # Small: only the embed/score hand-over; backpressure beyond it lands on `frames`.
        self.embedded: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.embedding_done = threading.Event()
        # Tokens for frames between the start of embedding and the end of scoring.
        self._in_flight = threading.Semaphore(cfg.frames_in_flight)
        self.results: queue.Queue[Any] = queue.Queue(maxsize=cfg.queue_results)
        j = cfg.journal
        self.journal: AlertJournal | None = None
        if j.path is not None:
            self.journal = AlertJournal(
                path=j.path, max_rows=j.max_rows, max_age_s=j.max_age_days * 86400.0, synchronous=j.synchronous
            )
        self.curve: CurveServer | None = None
        if cfg.curve_keys is not None:
            self.curve = CurveServer(context=self._context, keys_dir=cfg.curve_keys)
        secure = self.curve.secure if self.curve is not None else None
        self.publisher = Publisher(
            context=self._context,
            endpoint=cfg.pub_endpoint,
            camera_id=cfg.camera_id,
            send_hwm=cfg.send_hwm,
            secure=secure,
        )
        if self.journal is not None:
            # Alert numbers continue across restarts: a subscriber never sees one number twice.
            self.publisher.seq["alert"] = self.journal.last_seq
        self._control = self._context.socket(zmq.REP)
        self._control.setsockopt(zmq.LINGER, 0)
        if secure is not None:
            secure(self._control)
        try:
            self._control.bind(cfg.control_endpoint)
        except zmq.ZMQError as err:
            self.publisher.close()
            self._control.close(0)
            if self.journal is not None:
                self.journal.close()
            if self.curve is not None:
                self.curve.stop()
            raise StripinspectError(f"cannot bind control {cfg.control_endpoint}: {err}") from None
        self.control_endpoint = self._control.getsockopt_string(zmq.LAST_ENDPOINT)
        self._threads: list[threading.Thread] = []
        self.state = "starting"
        self.failed: BaseException | None = None
        self._last_scored = 0
        self._normal_median: deque[float] = deque(maxlen=cfg.drift_window_frames)
        self._drifting = False
        self.threshold = self._threshold_for(self.frame_scorer, cfg)

    def _threshold_for(self, fs: AnyFrameScorer, cfg: DaemonConfig) -> float | np.ndarray:
        """``cfg.threshold``, else the bundle's per-band thresholds (per column), else its pixel one."""
        if cfg.threshold is not None:
            return cfg.threshold
        bands = fs.scorer.manifest.band_thresholds
        if bands is not None:
            if bands.band_edges_px[-1] != self.source.width:
                raise StripinspectError(
                    f"{cfg.bundle}: thresholds calibrated for {bands.band_edges_px[-1]} columns, "
                    f"camera has {self.source.width}"
                )
            return per_column(bands.band_edges_px, bands.thresholds)
        stored = (fs.scorer.manifest.thresholds or {}).get("pixel")
        if stored is None or not stored > 0:
            raise StripinspectError(f"{cfg.bundle}: no pixel threshold: set daemon.threshold or calibrate the bundle")
        return float(stored)

    def _threshold_json(self) -> float | list[float]:
        with self._swap_lock:
            t, fs = self.threshold, self.frame_scorer
        return self._threshold_value(t, fs)

    @staticmethod
    def _threshold_value(t: float | np.ndarray, fs: AnyFrameScorer) -> float | list[float]:
        if isinstance(t, np.ndarray):
            bands = fs.scorer.manifest.band_thresholds
            assert bands is not None  # per-column thresholds only ever come from bands
            return [float(t[e]) for e in bands.band_edges_px[:-1]]  # one value per band, left to right
        return float(t)

    def _load(self, bundle: Path) -> AnyFrameScorer:
        fs = self._open_frame_scorer(bundle)
        if fs.scorer.channels == self.source.channels:
            # One frame of the real size before the first real one: onnxruntime sizes its arena
            # and picks kernels per input shape, which otherwise makes frame one twice as slow
            # and the p99 latency a start-up artefact.
            lines, width = self.cfg.frame_lines, self.source.width
            feats = fs.features(np.zeros((lines, width, fs.scorer.channels), dtype=np.uint8))
            patch, first, _ = fs.search_band(feats, valid=(0, lines), lines=lines)
            fs.band_map(patch, first, out_hw=(lines, width))
        return fs

    def _open_frame_scorer(self, bundle: Path) -> AnyFrameScorer:
        c = self.cfg
        return open_frame_scorer(bundle, runtime=self.runtime, scoring=self.scoring, tile=c.tile, margin=c.tile_margin)

    # --- threads ------------------------------------------------------------------------

    def start(self, *, acquire: bool = True) -> None:
        for name, target in (
            ("publish", self._publish_loop),
            ("score", self._score_loop),
            ("embed", self._embed_loop),
            ("control", self._control_loop),
            ("acquire", self._acquire_loop),
        ):
            t = threading.Thread(target=self._guard(target), name=f"stripinspect-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if acquire:
            self.start_acquisition()

    def start_acquisition(self) -> None:
        self.state = "running"
        self._acquire_go.set()
        notify("READY=1")

    def _guard(self, target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except Exception as err:
                # A crashed stage must not leave a half-alive daemon: stop everything, and the
                # process exits non-zero so that systemd restarts it.
                log.exception("stage %s crashed", threading.current_thread().name)
                self.failed = err
                self.stop_event.set()

        return run

    def _acquire_loop(self) -> None:
        try:
            self._acquire()
        finally:
            self.eof.set()
            self.frames.put(_END)

    def _acquire(self) -> None:
        while not self.stop_event.is_set() and not self._acquire_go.wait(0.1):
            pass
        last_block = time.monotonic()
        next_reopen, backoff = 0.0, 0.0
        while not self.stop_event.is_set():
            t0 = time.perf_counter()
            try:
                block = self.source.read(timeout=0.2)
            except EOFError:
                break
            except CameraError as err:
                # A camera that vanished mid-read: treated as a stall, reopened below.
                self._ratelog.warning("camera", "camera read failed: %s", err)
                block = None
            now = time.monotonic()
            if block is None:
                idle = now - last_block
                if idle > self.cfg.camera_stall_s and self.camera_online:
                    self.camera_online = False
                    self.stats.count("camera_offline_total")
                    log.warning("no lines from the camera for %.1f s: camera_offline", idle)
                reopen = getattr(self.source, "reopen", None)
                due = idle > self.cfg.camera_reconnect_s and now >= next_reopen
                if not self.camera_online and reopen is not None and due:
                    try:
                        reopen()
                        self.stats.count("camera_reopens_total")
                        log.info("camera reopened; waiting for lines")
                        last_block = now  # give it a stall period to deliver
                        backoff = 0.0
                    except CameraError as err:
                        backoff = min(self.cfg.camera_backoff_max_s, max(1.0, 2 * backoff))
                        next_reopen = now + backoff
                        self._ratelog.warning("reopen", "camera reopen failed (next try in %.0f s): %s", backoff, err)
                continue
            if not self.camera_online:
                self.camera_online = True
                self.assembler.reset()  # lines across the outage are gone; start a new sequence
                log.info("camera back online after %.1f s", now - last_block)
            last_block = now
            frames = self._assemble(block)
            if frames is None:
                continue
            self.stats.count("lines_total", block.pixels.shape[0])
            for f in frames:
                self.stats.count("frames_total")
                self.stats.time({"acquire": time.perf_counter() - t0})
                try:
                    self.frames.put_nowait(f)
                except queue.Full:
                    self.stats.drop("score", "queue_full")

    def _embed_loop(self) -> None:
        try:
            self._embed_frames()
        finally:
            self.embedding_done.set()
            self._put_blocking(self.embedded, _END)

    def _put_blocking(self, q: queue.Queue[Any], item: Any) -> None:
        # Between embed and score the hand-over waits (bounded by the score stage) rather than
        # drop: a frame already embedded is not thrown away; the camera-side queue drops instead.
        while True:
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                if self.failed is not None:
                    return

    def _embed_frames(self) -> None:
        # Drains: stops at the end marker, which acquisition queues after its last frame.
        while True:
            try:
                item = self.frames.get(timeout=0.2)
            except queue.Empty:
                if self.eof.is_set() and self.frames.empty():
                    break
                continue
            if item is _END:
                break
            with self._swap_lock:
                # Swapped between frames: no frame is scored half by each model or threshold.
                if self._pending is not None:
                    self.frame_scorer, self._pending = self._pending, None
                if self._pending_threshold is not None:
                    self.threshold, self._pending_threshold = self._pending_threshold, None
                if self._pending_recipe is not None:
                    (self.cfg, self.flatfield), self._pending_recipe = self._pending_recipe, None
                fs, threshold, cfg, flatfield = self.frame_scorer, self.threshold, self.cfg, self.flatfield
            while not self._in_flight.acquire(timeout=0.2):
                if self.failed is not None:
                    return
            t0 = time.perf_counter()
            pixels = item.pixels if flatfield is None else flatfield.apply(item.pixels)
            t1 = time.perf_counter()
            try:
                feats = fs.features(fs.scorer.check_image(pixels))
            except ValueError as err:
                self._in_flight.release()
                self.stats.drop("embed", "bad_frame")
                self._ratelog.warning("embed", "frame %d skipped: %s", item.frame_id, err)
                continue
            t2 = time.perf_counter()
            self._put_blocking(
                self.embedded,
                Embedded(
                    frame=item,
                    pixels=pixels,
                    features=feats,
                    frame_scorer=fs,
                    threshold=threshold,
                    cfg=cfg,
                    seconds={"preprocess": t1 - t0, "embed": t2 - t1},
                ),
            )

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

    def _score_loop(self) -> None:
        try:
            while True:
                try:
                    item = self.embedded.get(timeout=0.2)
                except queue.Empty:
                    if self.embedding_done.is_set() and self.embedded.empty():
                        break
                    continue
                if item is _END:
                    break
                try:
                    scored = self._score(item)
                finally:
                    self._in_flight.release()
                if scored is None:
                    continue
                try:
                    self.results.put_nowait(scored)
                except queue.Full:
                    self.stats.drop("publish", "queue_full")
        finally:
            self.scoring_done.set()
            self.results.put(_END)

    def _score(self, item: Embedded) -> Scored | None:
        frame, fs, cfg = item.frame, item.frame_scorer, item.cfg
        h, w = item.pixels.shape[:2]
        t0 = time.perf_counter()
        try:
            patch, first_row, _ = fs.search_band(item.features, valid=(frame.valid_from, frame.valid_to), lines=h)
        except ValueError as err:
            self.stats.drop("score", "bad_frame")
            self._ratelog.warning("score", "frame %d skipped: %s", frame.frame_id, err)
            return None
        t1 = time.perf_counter()
        amap = fs.band_map(patch, first_row, out_hw=(h, w))
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
            threshold=item.threshold,
            min_area_px=cfg.min_area_px,
            mm_per_px=cfg.mm_per_px,
            mm_per_line=cfg.mm_per_line,
            strip_left_px=left,
        )
        t3 = time.perf_counter()
        valid = amap[frame.valid_from : frame.valid_to]
        self._track_normal(valid)
        self.stats.count("frames_scored_total")
        return Scored(
            frame=frame,
            defects=defects,
            max_score=float(valid.max()),
            threshold=self._threshold_value(item.threshold, fs),
            score_map=valid if cfg.publish_maps else None,
            edges=edges,
            seconds={**item.seconds, "knn": t1 - t0, "map": t2 - t1, "defects": t3 - t2},
        )

    def _track_normal(self, valid: np.ndarray) -> None:
        # Median score of the frame on a 4x4 subsample: defects cover a tiny part of a frame, so
        # this follows the normal surface; an ageing lamp or a new grade moves all of it.
        with self.stats.lock:
            self._normal_median.append(float(np.median(valid[::4, ::4])))

    def drift(self) -> dict[str, Any]:
        """Rolling median score of the normal surface against the calibration's (bundle quantiles)."""
        with self.stats.lock:
            values = list(self._normal_median)
        rolling = float(np.median(values)) if values else None
        bands = self.frame_scorer.scorer.manifest.band_thresholds
        medians = bands.normal_quantiles.get("q0.5") if bands is not None else None
        reference = float(np.mean(medians)) if medians else None
        ratio = rolling / reference if rolling is not None and reference else None
        drifting = ratio is not None and abs(ratio - 1.0) > self.cfg.drift_bound
        if drifting != self._drifting:
            self._drifting = drifting
            if drifting:
                log.warning("normal scores drifted: rolling median %.3f vs calibrated %.3f", rolling, reference)
            else:
                log.info("normal scores back within %.0f %% of calibration", 100 * self.cfg.drift_bound)
        return {
            "normal_median_rolling": rolling,
            "normal_median_calibrated": reference,
            "drift_ratio": ratio,
            "drifting": drifting,
        }

    def _publish_loop(self) -> None:
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + self.cfg.heartbeat_s
            try:
                item = self.results.get(timeout=min(0.2, max(0.0, next_beat - now)))
            except queue.Empty:
                if self.scoring_done.is_set() and self.results.empty():
                    break
                continue
            if item is _END:
                break
            t0 = time.perf_counter()
            f = item.frame
            end_md = f.md_m + f.pixels.shape[0] * self.cfg.mm_per_line / 1000.0
            self._publish_alerts(f, item.defects, capture_md_m=end_md)
            parts: tuple[bytes, ...] = ()
            map_header: dict[str, Any] = {}
            if self.cfg.publish_maps and item.score_map is not None:
                parts = (item.score_map.astype("<f2").tobytes(),)
                map_header = {"map_shape": list(item.score_map.shape), "map_dtype": "float16 little-endian"}
            self.publisher.send(
                "frame",
                {
                    **map_header,
                    "frame_id": f.frame_id,
                    "capture_time": f.capture_time,
                    "first_line": f.first_line,
                    "md_m": f.md_m,
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
        self.state = "stopped"
        self._heartbeat()

    def _publish_alerts(self, frame: Frame, defects: list[Defect], *, capture_md_m: float) -> None:
        headers = [self.publisher.stamp("alert", alert_body(frame, d, capture_md_m=capture_md_m)) for d in defects]
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
        for h in headers:
            self.publisher.send_stamped(h)

    def _heartbeat(self) -> None:
        snap = self.stats.snapshot()
        drift = self.drift()
        state = self.state
        if state == "running" and not self.camera_online:
            state = "camera_offline"
        elif state == "running" and drift["drifting"]:
            state = "drift"
        scored = snap["counts"].get("frames_scored_total", 0)
        if scored > self._last_scored:
            # The systemd watchdog is fed only while frames advance.
            notify("WATCHDOG=1")
            self._last_scored = scored
        self.publisher.send(
            "heartbeat",
            {
                "state": state,
                "frame_id": None,
                "capture_time": None,
                "threshold": self._threshold_json(),
                "drift": drift,
                "camera": self.camera_status(),
                **snap,
            },
        )

    def camera_status(self) -> dict[str, Any]:
        """Online or not, and the source's own counters where it keeps them (GenICam: buffers
        that arrived incomplete, read timeouts, reopens)."""
        out: dict[str, Any] = {"online": self.camera_online}
        for name in ("incomplete", "stalls", "reopens"):
            value = getattr(self.source, name, None)
            if isinstance(value, int):
                out[name] = value
        return out

    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._control, zmq.POLLIN)
        while not self.stop_event.is_set():
            if not poller.poll(200):
                continue
            raw = self._control.recv()
            try:
                req = json.loads(raw)
                cmd = req.get("cmd") if isinstance(req, dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                cmd, req = None, {}
            self._control.send_json(self._command(cmd, req))

    def _command(self, cmd: Any, req: dict[str, Any]) -> dict[str, Any]:
        if cmd == "status":
            return {
                "ok": True,
                "state": self.state,
                "recipe": self.cfg.recipe,
                "drift": self.drift(),
                "camera": self.camera_status(),
                **self.stats.snapshot(),
            }
        if cmd == "recipe":
            name = req.get("name")
            if name not in self.cfg.recipes:
                return {"ok": False, "error": f"unknown recipe {name!r}; known: {sorted(self.cfg.recipes)}"}
            new_cfg = self.cfg.with_recipe(name)
            try:
                fs = self._load(new_cfg.bundle)
                threshold = self._threshold_for(fs, new_cfg)
                ff = None
                if new_cfg.flatfield is not None:
                    ff = FlatField.from_file(new_cfg.flatfield, width=self.source.width)
            except StripinspectError as err:
                return {"ok": False, "error": str(err)}  # the running recipe stays
            with self._swap_lock:
                self._pending, self._pending_threshold = fs, threshold
                self._pending_recipe = (new_cfg, ff)
            return {"ok": True, "recipe": name}
        if cmd == "replay":
            return self._replay(req)
        if cmd == "stop":
            self.stop_event.set()
            return {"ok": True, "state": "stopping"}
        if cmd == "reload" and "threshold" in req and "bundle" not in req:
            value = req["threshold"]
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                return {"ok": False, "error": f"threshold must be a number > 0, got {value!r}"}
            with self._swap_lock:
                self._pending_threshold = float(value)
            return {"ok": True, "threshold": float(value)}
        if cmd == "reload":
            bundle = Path(req.get("bundle") or self.cfg.bundle)
            try:
                new = self._load(bundle)
                threshold = self._threshold_for(new, self.cfg)
            except StripinspectError as err:
                # The old model keeps running.
                return {"ok": False, "error": str(err)}
            with self._swap_lock:
                self._pending = new
                self._pending_threshold = threshold
            return {"ok": True, "bundle": str(bundle)}
        return {"ok": False, "error": f"unknown command {cmd!r}; known: status, reload, recipe, replay, stop"}

    def _replay(self, req: dict[str, Any]) -> dict[str, Any]:
        """Alerts after ``after`` from the journal (zguide Clone pattern: the subscriber keeps its
        live subscription open while it fetches, then drops live alerts it already has)."""
        if self.journal is None:
            return {"ok": False, "error": "no alert journal (daemon.journal.path is null)"}
        after = req.get("after", 0)
        limit = req.get("limit", self.cfg.journal.replay_limit)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            return {"ok": False, "error": f"after must be an integer >= 0, got {after!r}"}
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            return {"ok": False, "error": f"limit must be an integer >= 1, got {limit!r}"}
        alerts = self.journal.after(after, min(limit, self.cfg.journal.replay_limit))
        first = self.journal.first_seq()
        return {
            "ok": True,
            "alerts": alerts,
            "last_seq": self.journal.last_seq,
            # Alerts between `after` and the oldest one kept were pruned (journal bounds).
            "pruned": first is not None and first > after + 1,
        }

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop acquiring; frames already acquired are scored and published (drained)."""
        self.stop_event.set()

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the pipeline to drain, then stop the control thread and close the sockets."""
        deadline = time.monotonic() + timeout
        for t in reversed(self._threads):
            if not t.name.endswith("control"):
                t.join(max(0.0, deadline - time.monotonic()))
        self.stop_event.set()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.publisher.close()
        self._control.close(0)
        self.source.close()
        if self.journal is not None:
            self.journal.close()
        if self.curve is not None:
            self.curve.stop()

    def run_until_done(self) -> None:
        """Until the source ends or ``stop``; then drain and close."""
        self.start()
        publish = self._threads[0]
        while publish.is_alive() and not self.stop_event.wait(0.1):
            pass
        self.stop()
        self.join()
