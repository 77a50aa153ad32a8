"""The bridge's core: daemon messages in, plant messages out, one bounded queue per protocol.

Pure functions turn the daemons' headers into plant messages (``to_defect``, ``line_status``);
``Bridge`` wires the camera followers (threads) to the protocol servers (asyncio). Each protocol
has its own queue and worker, so a slow or stuck protocol never delays the others: when its
queue is full its messages are dropped and counted, and its worker later gives it the defects it
missed from the bridge journal (statuses and coil messages are superseded by the next ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from pipeline.bridge.follow import CameraFollower, CoilServiceFollower
from pipeline.bridge.journal import BridgeJournal
from pipeline.bridge.model import STATES, CameraStatus, LineStatus, NotDeliveredError, PlantCoil, PlantDefect, Sink
from pipeline.config import BridgeCameraConfig, BridgeCoilServiceConfig, RejectRuleConfig
from pipeline.process import RateLimitedLog

log = logging.getLogger("stripinspect.bridge")
STATUS_PERIOD_S = 0.5  # the plant's heartbeat: a PLC watchdog sees the counter move twice a second
STALE_HEARTBEATS = 3.0  # a camera silent this many of its heartbeat periods is "unknown"
CATCH_UP_BATCH = 500
COILS_REMEMBERED = 10_000
STOP_WAIT_S = 10.0  # stop: the protocols deliver what the followers took, at most this long
RETRY_S = 0.5  # a protocol that could not take a defect is offered it again this much later


def to_defect(h: dict[str, Any], bridge_seq: int, *, camera_id: str, reject: RejectRuleConfig) -> PlantDefect:
    """A daemon's alert header (docs/messages.md) as the plant's defect, with the reject decision.

    The actuator stands ``reject.distance_m`` after the camera; at ``capture_time`` the camera saw
    ``capture_md_m`` and the defect was already ``capture_md_m - md_m`` past it."""
    score, threshold = float(h["max_score"]), float(h["threshold"])
    area = float(h["area_mm2"])
    md = float(h["md_m"])
    rejected = area >= reject.min_area_mm2 and score >= reject.min_score_ratio * threshold
    confidence = h.get("class_confidence")
    return PlantDefect(
        bridge_seq=bridge_seq,
        camera_id=camera_id,
        journal=h.get("journal"),
        seq=int(h["seq"]),
        coil_id=h.get("coil_id"),
        side=str(h.get("side") or "top"),
        md_m=md,
        strip_md_m=float(h.get("strip_md_m", md)),
        cd_mm=float(h["cd_mm"]),
        length_mm=float(h["length_mm"]),
        width_mm=float(h["width_mm"]),
        area_mm2=area,
        score=score,
        threshold=threshold,
        defect_class=str(h.get("class") or "unknown"),
        class_confidence=None if confidence is None else float(confidence),
        decision="reject" if rejected else "accept",
        reject_in_m=reject.distance_m - (float(h.get("capture_md_m", md)) - md),
        capture_time=float(h["capture_time"]),
        publish_time=float(h["publish_time"]),
    )


def camera_status(camera_id: str, h: dict[str, Any] | None, *, now: float, stale_s: float) -> CameraStatus:
    """A camera's last heartbeat as the plant sees it; ``unknown`` without one for ``stale_s``."""
    if h is None:
        return CameraStatus(camera_id, "unknown", False, None, (), None, None, 0, 0, 0, 0.0)
    t = float(h.get("publish_time") or 0.0)
    state = str(h.get("state") or "unknown")
    if state not in STATES or now - t > stale_s:
        state = "unknown"
    counts, coil = h.get("counts") or {}, h.get("coil") or {}
    md = coil.get("md_m")
    return CameraStatus(
        camera_id=camera_id,
        state=state,
        camera_online=bool((h.get("camera") or {}).get("online")) and state != "unknown",
        recipe=h.get("recipe"),
        recipes=tuple(h.get("recipes") or ()),
        coil_id=coil.get("coil_id"),
        md_m=None if md is None else float(md),
        frames=int(counts.get("frames_total", 0)),
        alerts=int(counts.get("alerts_total", 0)),
        drops=int(sum((h.get("drops") or {}).values())),
        heartbeat_time=t,
    )


def line_status(
    cameras: Sequence[CameraStatus], *, heartbeat: int, defects: int, drops: dict[str, int], now: float
) -> LineStatus:
    """The line as one state: its worst camera's (``STATES`` order), its coil and recipe when the
    cameras agree (None when they differ)."""
    state = max((c.state for c in cameras), key=STATES.index, default="unknown")
    coils = {c.coil_id for c in cameras}
    recipes = {c.recipe for c in cameras}
    return LineStatus(
        state=state,
        heartbeat=heartbeat,
        defects=defects,
        coil_id=coils.pop() if len(coils) == 1 else None,
        recipe=recipes.pop() if len(recipes) == 1 else None,
        cameras=tuple(cameras),
        drops=dict(drops),
        time=now,
    )


COIL_KINDS = {"grading": "grading", "periodic": "periodic", "coil_closed": "closed"}


@dataclass
class Channel:
    """One protocol: its queue, the last defect it delivered, its counters."""

    sink: Sink
    queue: asyncio.Queue[tuple[str, Any]]
    last: int
    behind: bool = False  # messages were dropped at its full queue since it last caught up
    counts: dict[str, int] = field(
        default_factory=lambda: {"delivered": 0, "dropped": 0, "caught_up": 0, "lost": 0, "errors": 0, "retries": 0}
    )


class Bridge:
    """``await run(stop)`` serves until ``stop`` is set, then drains and stops every protocol."""

    def __init__(
        self,
        *,
        cameras: dict[str, BridgeCameraConfig],
        coil_service: BridgeCoilServiceConfig | None,
        sinks: Sequence[Sink],
        journal: BridgeJournal,
        reject: RejectRuleConfig,
        queue_size: int,
        replay_timeout_s: float,
        context: zmq.Context,
        heartbeat_s: float = 1.0,
    ) -> None:
        if not cameras:
            raise ValueError("the bridge needs at least one camera")
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        names = [s.name for s in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"protocol names must differ, got {names}")
        self.cameras, self.coil_service, self.sinks = cameras, coil_service, list(sinks)
        self.journal, self.reject, self.queue_size = journal, reject, queue_size
        self.replay_timeout_s, self.context = replay_timeout_s, context
        self.stale_s = STALE_HEARTBEATS * heartbeat_s
        self._heartbeats: dict[str, dict[str, Any] | None] = dict.fromkeys(cameras)
        self._coils_seen: set[tuple[str, str]] = set()
        self._coils_lock = threading.Lock()
        self._beat = 0
        self._channels: list[Channel] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.followers: list[CameraFollower | CoilServiceFollower] = []
        self.ready = asyncio.Event()
        self._ratelog = RateLimitedLog(log, interval_s=10.0)

    # --- from the follower threads ----------------------------------------------------------

    def _post(self, kind: str, item: Any) -> None:
        """Thread-safe: hand a message to every protocol's queue on the loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._fan_out, kind, item)

    def _fan_out(self, kind: str, item: Any) -> None:
        for ch in self._channels:
            try:
                ch.queue.put_nowait((kind, item))
            except asyncio.QueueFull:
                # A protocol that cannot keep up loses its place in the queue, not the defect:
                # its worker takes the missed defects from the journal once it is back.
                ch.counts["dropped"] += 1
                ch.behind = True

    def _on_heartbeat(self, camera_id: str, h: dict[str, Any]) -> None:
        self._heartbeats[camera_id] = h

    def _on_coil(self, camera_id: str, h: dict[str, Any]) -> None:
        kind, cid = h.get("event"), h.get("coil_id")
        if kind not in ("start", "end") or not cid:
            raise ValueError(f"coil event {kind!r} of coil {cid!r}")
        with self._coils_lock:  # follower threads of several cameras
            if (kind, cid) in self._coils_seen:
                return  # every camera reports the head and the tail: the plant hears them once
            self._coils_seen.add((kind, cid))
            if len(self._coils_seen) > COILS_REMEMBERED:
                self._coils_seen.clear()  # months of coils; an old coil's repeat is harmless
        self._post("coil", PlantCoil(kind=kind, coil_id=str(cid), data={**h, "camera_id": camera_id}))

    def _on_coil_service(self, topic: str, h: dict[str, Any]) -> None:
        kind = COIL_KINDS.get(topic)
        if kind is None or not h.get("coil_id"):
            raise ValueError(f"coil service {topic!r} message without a coil")
        self._post("coil", PlantCoil(kind=kind, coil_id=str(h["coil_id"]), data=h))  # type: ignore[arg-type]

    # --- the loop ---------------------------------------------------------------------------

    def status(self) -> LineStatus:
        now = time.time()
        cams = [camera_status(c, h, now=now, stale_s=self.stale_s) for c, h in self._heartbeats.items()]
        drops = {ch.sink.name: ch.counts["dropped"] for ch in self._channels}
        return line_status(cams, heartbeat=self._beat, defects=self.journal.last_seq, drops=drops, now=now)

    def counters(self) -> dict[str, Any]:
        return {
            "defects": self.journal.last_seq,
            "protocols": {ch.sink.name: {**ch.counts, **ch.sink.counters()} for ch in self._channels},
            "followers": {getattr(f, "camera_id", "coil-service"): dict(f.counts) for f in self.followers},
        }

    async def _deliver(self, ch: Channel, d: PlantDefect) -> bool:
        """Give ``d`` to the protocol; False when it could not take it now (then it stays behind
        and is offered ``d`` again from the journal ``RETRY_S`` later)."""
        try:
            await ch.sink.defect(d)
            ch.counts["delivered"] += 1
        except NotDeliveredError as err:
            ch.counts["retries"] += 1
            ch.behind = True
            self._ratelog.warning(
                f"retry:{ch.sink.name}", "%s: defect %d offered again later: %s", ch.sink.name, d.bridge_seq, err
            )
            await asyncio.sleep(RETRY_S)
            return False
        except Exception as err:  # a protocol's fault must not stop the others
            ch.counts["errors"] += 1
            log.error("%s: defect %d not delivered: %r", ch.sink.name, d.bridge_seq, err)
        ch.last = d.bridge_seq
        # One small row; a kill -9 between the delivery and this commit resends one defect.
        await asyncio.to_thread(self.journal.delivered, ch.sink.name, d.bridge_seq)
        return True

    async def _catch_up(self, ch: Channel, upto: int) -> None:
        """Give ``ch`` the defects after its last one up to ``upto`` from the journal."""
        while ch.last < upto:
            held = await asyncio.to_thread(self.journal.after, ch.last, CATCH_UP_BATCH)
            batch = [d for d in held if d.bridge_seq <= upto]
            if not batch:
                ch.counts["lost"] += upto - ch.last  # pruned from the journal (keep_defects)
                log.error("%s: defects %d..%d pruned before delivery", ch.sink.name, ch.last + 1, upto)
                ch.last = upto
                await asyncio.to_thread(self.journal.delivered, ch.sink.name, upto)
                return
            for d in batch:
                if d.bridge_seq > ch.last + 1:
                    ch.counts["lost"] += d.bridge_seq - ch.last - 1
                if not await self._deliver(ch, d):
                    return
                ch.counts["caught_up"] += 1

    async def _work(self, ch: Channel) -> None:
        ch.behind = True  # what it had not delivered before a restart, from the journal
        while True:
            if ch.behind and ch.queue.empty():
                ch.behind = False
                try:
                    await self._catch_up(ch, self.journal.last_seq)
                except Exception as err:
                    # The journal could not be read (disk): this protocol tries again, the others
                    # are not concerned; the worker must not die silently.
                    ch.counts["errors"] += 1
                    ch.behind = True
                    self._ratelog.error(f"catch-up:{ch.sink.name}", "%s: catch-up failed: %r", ch.sink.name, err)
                    await asyncio.sleep(RETRY_S)
                    continue
            kind, item = await ch.queue.get()
            try:
                if kind == "stop":
                    return
                if kind == "defect":
                    if item.bridge_seq <= ch.last:
                        continue  # already given from the journal
                    if item.bridge_seq > ch.last + 1:
                        await self._catch_up(ch, item.bridge_seq - 1)
                    if item.bridge_seq == ch.last + 1:
                        await self._deliver(ch, item)
                elif kind == "status":
                    await ch.sink.status(item)
                elif kind == "coil":
                    await ch.sink.coil(item)
            except Exception as err:
                ch.counts["errors"] += 1
                log.error("%s: %s not delivered: %r", ch.sink.name, kind, err)

    async def _status_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._beat += 1
            try:
                self._fan_out("status", self.status())
            except Exception as err:
                # A malformed heartbeat must not stop the plant's heartbeat counter for good.
                self._ratelog.error("status", "line status skipped: %r", err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATUS_PERIOD_S)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        started: list[Sink] = []
        threads: list[threading.Thread] = []
        halt = threading.Event()
        workers: list[asyncio.Task[None]] = []
        try:
            for sink in self.sinks:
                await sink.start()
                started.append(sink)
                cursor = await asyncio.to_thread(self.journal.sink_cursor, sink.name)
                # A protocol never run before starts at the journal's end: no old defects for it.
                last = self.journal.last_seq if cursor is None else cursor
                if cursor is None:
                    await asyncio.to_thread(self.journal.delivered, sink.name, last)
                self._channels.append(Channel(sink=sink, queue=asyncio.Queue(self.queue_size), last=last))
            workers = [asyncio.create_task(self._work(ch), name=f"bridge-{ch.sink.name}") for ch in self._channels]
            for cid, cam in self.cameras.items():
                self.followers.append(
                    CameraFollower(
                        camera_id=cid,
                        pub=cam.pub,
                        control=cam.control,
                        journal=self.journal,
                        to_defect=functools.partial(to_defect, camera_id=cid, reject=self.reject),
                        on_defect=lambda d: self._post("defect", d),
                        on_heartbeat=self._on_heartbeat,
                        on_coil=self._on_coil,
                        context=self.context,
                        replay_timeout_s=self.replay_timeout_s,
                    )
                )
            if self.coil_service is not None:
                self.followers.append(
                    CoilServiceFollower(
                        pub=self.coil_service.pub, on_message=self._on_coil_service, context=self.context
                    )
                )
            for f in self.followers:
                name = f"bridge-follow-{getattr(f, 'camera_id', 'coil-service')}"
                t = threading.Thread(target=f.run, args=(halt,), name=name, daemon=True)
                t.start()
                threads.append(t)
            status = asyncio.create_task(self._status_loop(stop))
            self.ready.set()
            await stop.wait()
            await status
        finally:
            halt.set()
            for t in threads:
                await asyncio.to_thread(t.join, 5.0)
            give_up = time.monotonic() + STOP_WAIT_S
            for ch in self._channels:
                # What the followers took before they stopped is still delivered (bounded wait:
                # a protocol that cannot take anything is cancelled, its cursor is in the journal).
                while time.monotonic() < give_up:
                    try:
                        ch.queue.put_nowait(("stop", None))
                        break
                    except asyncio.QueueFull:
                        await asyncio.sleep(0.01)
            if workers:
                _, pending = await asyncio.wait(workers, timeout=max(0.1, give_up - time.monotonic()))
                for w in pending:
                    w.cancel()
            for sink in reversed(started):
                try:
                    await sink.stop()
                except Exception as err:
                    log.error("%s: stop failed: %r", sink.name, err)
