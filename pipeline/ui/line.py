"""Following the line: one thread per camera daemon (or per endpoint cameras share: the proxy)
and one for the coil service, each feeding ``LineState`` and handing its updates to the ``Hub``.

The station shows live state only, so there is no journal recovery here (the coil records and
the bridge do that): a message lost is counted as a gap in ``seq`` and the page says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import cv2
import zmq

from pipeline.config import BridgeCameraConfig, BridgeCoilServiceConfig
from pipeline.process import RateLimitedLog
from pipeline.transport.publish import decode
from pipeline.ui.hub import Hub
from pipeline.ui.state import COIL_SERVICE_TOPICS, LineState, Update

log = logging.getLogger("stripinspect.ui")
POLL_MS = 100
# Frames (with a map and a preview, megabytes each) come on a socket of their own with a small
# queue: the station shows the latest, and a burst of frames must not push alerts out of theirs.
FRAME_HWM = 4
EVENT_HWM = 10_000


class Line:
    """``start()`` the followers, ``stop()`` them (joins, closes their sockets)."""

    def __init__(
        self,
        *,
        cameras: dict[str, BridgeCameraConfig],
        coil_service: BridgeCoilServiceConfig | None,
        state: LineState,
        hub: Hub,
        context: zmq.Context,
    ) -> None:
        if set(cameras) != set(state.camera_ids):
            raise ValueError(f"cameras {sorted(cameras)} differ from the state's {sorted(state.camera_ids)}")
        self.cameras, self.coil_service = dict(cameras), coil_service
        self.state, self.hub, self.context = state, hub, context
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ratelog = RateLimitedLog(log, interval_s=10.0)
        self.counts = {"messages": 0, "bad_messages": 0, "other_cameras": 0}
        self._counts_lock = threading.Lock()

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("the line followers are running already")
        # One follower per endpoint: a camera daemon's own PUB (one camera), or the proxy's XPUB
        # that several cameras share (each message then goes to the camera its header names).
        by_pub: dict[str, list[str]] = {}
        for cid, cam in self.cameras.items():
            by_pub.setdefault(cam.pub, []).append(cid)
        for pub, cids in by_pub.items():
            self._spawn(f"stripinspect-ui-{'+'.join(cids)}", self._follow_cameras, (frozenset(cids), pub))
        if self.coil_service is not None:
            self._spawn("stripinspect-ui-coil-service", self._follow_coil_service, (self.coil_service.pub,))

    def _spawn(self, name: str, target: Callable[..., None], args: tuple[object, ...]) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
        self._threads = []

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def _sub(self, endpoint: str, topics: tuple[str, ...], hwm: int) -> zmq.Socket:
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, hwm)
        for t in topics:
            sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        sock.connect(endpoint)
        return sock

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self.counts[key] += 1

    def _follow_cameras(self, camera_ids: frozenset[str], pub: str) -> None:
        frames = self._sub(pub, ("frame",), FRAME_HWM)
        events = self._sub(pub, ("alert", "heartbeat", "coil"), EVENT_HWM)
        poller = zmq.Poller()
        poller.register(frames, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(POLL_MS))
                # Alerts first: a frame's alerts precede it, and its heat-map crops need them.
                for sock in (events, frames):
                    if sock in ready:
                        self._take_camera(camera_ids, sock.recv_multipart(zmq.NOBLOCK))
        finally:
            frames.close(0)
            events.close(0)

    def _take_camera(self, camera_ids: frozenset[str], parts: list[bytes]) -> None:
        self._count("messages")
        try:
            topic, header, binary = decode(parts)
        except (ValueError, UnicodeDecodeError) as err:
            self._count("bad_messages")
            self._ratelog.warning(f"bad:{'+'.join(sorted(camera_ids))}", "message skipped: %r", err)
            return
        camera_id = header.get("camera_id")
        if camera_id not in camera_ids:
            self._count("other_cameras")  # a camera of the proxy's that ui.cameras does not list
            return
        try:
            updates = self.state.on_camera(camera_id, topic, header, binary, now=time.monotonic())
        except (KeyError, TypeError, ValueError, AttributeError, cv2.error) as err:
            self._count("bad_messages")
            self._ratelog.warning(f"bad:{camera_id}", "%s: %s message skipped: %r", camera_id, topic, err)
            return
        self._publish(updates)

    def _follow_coil_service(self, pub: str) -> None:
        sock = self._sub(pub, COIL_SERVICE_TOPICS, EVENT_HWM)
        try:
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                parts = sock.recv_multipart(zmq.NOBLOCK)
                self._count("messages")
                try:
                    topic, header, _ = decode(parts)
                    updates = self.state.on_coil_service(topic, header)
                except (KeyError, TypeError, ValueError, UnicodeDecodeError, AttributeError) as err:
                    self._count("bad_messages")
                    self._ratelog.warning("bad:coil-service", "coil service: message skipped: %r", err)
                    continue
                self._publish(updates)
        finally:
            sock.close(0)

    def _publish(self, updates: list[Update]) -> None:
        if updates:
            self.hub.publish(updates)
