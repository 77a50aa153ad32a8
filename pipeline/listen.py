"""The other end of the PUB socket: receive, check sequence numbers, print or record JSON lines."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from pipeline.publish import TOPICS, decode


@dataclass
class ListenReport:
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOPICS, 0))
    gaps: list[tuple[str, int, int]] = field(default_factory=list)  # (topic, expected seq, got seq)
    last_seq: dict[str, int] = field(default_factory=dict)


def listen(
    *,
    endpoint: str,
    topics: tuple[str, ...],
    on_message: Callable[[str, dict[str, Any]], None],
    stop: Callable[[], bool],
    context: zmq.Context | None = None,
    until_state: str | None = "stopped",
) -> ListenReport:
    """Subscribe to ``topics`` until ``stop()`` is true or a heartbeat reports ``until_state``."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    for t in set(topics) | {"heartbeat"}:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    sock.connect(endpoint)
    report = ListenReport()
    try:
        while not stop():
            if not sock.poll(200):
                continue
            topic, header, _ = decode(sock.recv_multipart())
            seq = int(header.get("seq", 0))
            last = report.last_seq.get(topic)
            # A gap after the first message seen: messages lost between publisher and us.
            if last is not None and seq != last + 1:
                report.gaps.append((topic, last + 1, seq))
            report.last_seq[topic] = seq
            report.received[topic] = report.received.get(topic, 0) + 1
            if topic in topics:
                on_message(topic, header)
            if topic == "heartbeat" and until_state is not None and header.get("state") == until_state:
                break
    finally:
        sock.close(0)
    return report


def json_line(topic: str, header: dict[str, Any]) -> str:
    return json.dumps(header, sort_keys=True)


def deadline(seconds: float | None) -> Callable[[], bool]:
    end = None if seconds is None else time.monotonic() + seconds
    return lambda: end is not None and time.monotonic() >= end


def collect_run(
    *,
    endpoint: str,
    topics: tuple[str, ...],
    start: Callable[[], None],
    context: zmq.Context,
    timeout_s: float = 600.0,
) -> tuple[list[tuple[str, dict[str, Any]]], ListenReport]:
    """Subscribe, wait for the first heartbeat (so the subscription is live and nothing is
    missed: PUB drops messages for subscribers that have not joined yet), then call ``start``
    and collect ``topics`` until the publisher reports that it stopped."""
    import threading

    messages: list[tuple[str, dict[str, Any]]] = []
    joined = threading.Event()

    def on_message(topic: str, header: dict[str, Any]) -> None:
        if topic == "heartbeat":
            joined.set()
        if topic in topics:
            messages.append((topic, header))

    box: dict[str, ListenReport] = {}
    thread = threading.Thread(
        target=lambda: box.update(
            report=listen(
                endpoint=endpoint,
                topics=(*topics, "heartbeat"),
                on_message=on_message,
                stop=deadline(timeout_s),
                context=context,
            )
        )
    )
    thread.start()
    if not joined.wait(30):
        raise TimeoutError(f"no heartbeat from {endpoint} within 30 s")
    start()
    thread.join()
    return messages, box["report"]
