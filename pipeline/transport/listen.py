"""The other end of the PUB socket: receive, check sequence numbers, print or record JSON lines."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from pipeline.transport.publish import TOPICS, decode
from pipeline.transport.security import secure_client


@dataclass
class ListenReport:
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOPICS, 0))
    gaps: list[tuple[str, int, int]] = field(default_factory=list)  # (topic, expected seq, got seq)
    last_seq: dict[str, int] = field(default_factory=dict)
    recovered: int = 0  # alerts fetched from the daemon's journal instead of received live
    last_alert: int | None = None  # highest alert seq delivered


class ReplayError(RuntimeError):
    """The control socket did not answer a replay, or refused it."""


@dataclass(frozen=True)
class ClientKeys:
    """CURVE: this client's certificate (a .key_secret file) and the daemon's public key file."""

    client_key: Path
    server_key: Path

    def apply(self, sock: zmq.Socket) -> None:
        secure_client(sock, client_key=self.client_key, server_key=self.server_key)


def fetch_alerts(
    *,
    control_endpoint: str,
    after: int,
    context: zmq.Context,
    timeout_s: float = 5.0,
    keys: ClientKeys | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Alerts after ``after`` from the daemon's journal, oldest first, and whether some of them
    were already pruned. Pages through the journal until nothing more comes."""
    out: list[dict[str, Any]] = []
    pruned = False
    while True:
        sock = context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        if keys is not None:
            keys.apply(sock)
        sock.connect(control_endpoint)
        try:
            sock.send_json({"cmd": "replay", "after": after})
            rep = sock.recv_json()
        except zmq.Again:
            raise ReplayError(f"no answer from {control_endpoint} within {timeout_s} s") from None
        finally:
            sock.close(0)
        if not isinstance(rep, dict) or not rep.get("ok"):
            raise ReplayError(f"replay refused: {rep.get('error') if isinstance(rep, dict) else rep!r}")
        pruned = pruned or bool(rep.get("pruned"))
        batch = rep["alerts"]
        if not batch:
            return out, pruned
        out += batch
        after = int(batch[-1]["seq"])


def listen(
    *,
    endpoint: str,
    topics: tuple[str, ...],
    on_message: Callable[[str, dict[str, Any]], None],
    stop: Callable[[], bool],
    context: zmq.Context | None = None,
    until_state: str | None = "stopped",
    control_endpoint: str | None = None,
    since: int | None = None,
    keys: ClientKeys | None = None,
) -> ListenReport:
    """Subscribe to ``topics`` until ``stop()`` is true or a heartbeat reports ``until_state``.

    With ``control_endpoint``, alerts are recovered from the daemon's journal (zguide Clone
    pattern): once the subscription is live, everything after ``since`` is fetched (when given),
    and a gap in live alert numbers is filled before the next live alert is delivered; each
    alert is delivered once, in order. What the journal no longer holds is reported as a gap."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    for t in set(topics) | {"heartbeat"}:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    if keys is not None:
        keys.apply(sock)
    sock.connect(endpoint)
    report = ListenReport(last_alert=since)
    recover = control_endpoint is not None and "alert" in topics
    live = False

    def catch_up(upto: int | None) -> None:
        # Fetch from the journal what lies between the last alert delivered and ``upto``.
        assert control_endpoint is not None
        after = report.last_alert or 0
        alerts, _ = fetch_alerts(control_endpoint=control_endpoint, after=after, context=ctx, keys=keys)
        for h in alerts:
            s = int(h["seq"])
            if upto is not None and s >= upto:
                break
            report.recovered += 1
            report.last_alert = s
            on_message("alert", h)

    try:
        while not stop():
            if not sock.poll(200):
                continue
            topic, header, _ = decode(sock.recv_multipart())
            seq = int(header.get("seq", 0))
            if recover and not live:
                live = True  # the subscription is live: what was published before, the journal has
                if since is not None:
                    catch_up(None)
            last = report.last_seq.get(topic)
            if recover and topic == "alert":
                if report.last_alert is not None and seq <= report.last_alert:
                    continue  # already delivered from the journal
                if report.last_alert is not None and seq > report.last_alert + 1:
                    catch_up(seq)
                if report.last_alert is not None and seq > report.last_alert + 1:
                    report.gaps.append((topic, report.last_alert + 1, seq))  # pruned from the journal
                report.last_alert = seq
            elif last is not None and seq != last + 1:
                # A gap after the first message seen: messages lost between publisher and us.
                report.gaps.append((topic, last + 1, seq))
            report.last_seq[topic] = seq
            report.received[topic] = report.received.get(topic, 0) + 1
            if topic == "alert" and not recover:
                report.last_alert = seq
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
