"""ZeroMQ messages out: topic, JSON header, optional binary parts.

Every header carries the schema version, a per-topic sequence number with no gaps, the camera
id, the frame id, and capture and publish timestamps (PUB/SUB drops at the high-water mark, so
a subscriber must be able to see what it missed: zguide ch. 5).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import zmq

from pipeline.transport.messages import Defect, Frame

SCHEMA_VERSION = 1
TOPICS = ("alert", "frame", "heartbeat", "coil")


def decode(parts: list[bytes]) -> tuple[str, dict[str, Any], list[bytes]]:
    """(topic, header, binary parts) of a received multipart message."""
    if len(parts) < 2:
        raise ValueError(f"message has {len(parts)} parts, expected topic and header")
    try:
        header = json.loads(parts[1])
    except RecursionError:
        raise ValueError("header nested too deep") from None
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    return parts[0].decode("ascii"), header, parts[2:]


def alert_body(frame: Frame, defect: Defect, *, capture_md_m: float) -> dict[str, Any]:
    """The alert header without the publisher's common fields. ``capture_md_m``: MD of the line
    the camera saw at ``capture_time`` (the frame's last line), so a reject actuator can tell
    how far past the camera the defect already is."""
    body = asdict(defect)
    body["box"] = list(defect.box)
    return {"frame_id": frame.frame_id, "capture_time": frame.capture_time, "capture_md_m": capture_md_m, **body}


class Publisher:
    """Owns the PUB socket; used from one thread only (ZeroMQ sockets are not thread-safe)."""

    def __init__(
        self,
        *,
        context: zmq.Context,
        endpoint: str,
        camera_id: str,
        send_hwm: int,
        secure: Callable[[zmq.Socket], None] | None = None,
        topics: tuple[str, ...] = TOPICS,
    ) -> None:
        self.camera_id = camera_id
        self._sock = context.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, send_hwm)
        self._sock.setsockopt(zmq.LINGER, 1000)
        if secure is not None:
            secure(self._sock)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as err:
            self._sock.close(0)
            raise OSError(err.errno, f"cannot bind PUB {endpoint}: {err}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.seq = dict.fromkeys(topics, 0)

    def stamp(self, topic: str, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with the common header fields, except ``seq``."""
        return {
            **body,
            "schema_version": SCHEMA_VERSION,
            "topic": topic,
            "camera_id": self.camera_id,
            "publish_time": time.time(),
        }

    def send(self, topic: str, body: dict[str, Any], parts: tuple[bytes, ...] = ()) -> None:
        header = self.stamp(topic, body)
        header["seq"] = self.seq[topic] + 1
        self.send_stamped(header, parts)

    def send_stamped(self, header: dict[str, Any], parts: tuple[bytes, ...] = ()) -> None:
        """Send a header from ``stamp`` whose ``seq`` was given elsewhere (alerts: by the journal);
        it must be the next number of its topic."""
        topic = header["topic"]
        if header["seq"] != self.seq[topic] + 1:
            raise ValueError(f"{topic} seq {header['seq']} does not follow {self.seq[topic]}")
        self.seq[topic] += 1
        # PUB never blocks: at a subscriber's high-water mark ZeroMQ drops the message silently,
        # which the subscriber sees as a gap in ``seq`` (and can fetch from the journal).
        self._sock.send_multipart([topic.encode("ascii"), json.dumps(header).encode(), *parts])

    def close(self) -> None:
        self._sock.close()
