"""Following the daemons: one thread per camera (and one for the coil service), each a ZeroMQ
SUB with the zguide's Clone recovery from that camera's alert journal.

A camera's alerts are numbered by its journal (``journal`` id, ``seq``). The bridge journal
keeps, per camera, the last number taken, committed with the defect itself; so whatever the
order of live messages, replays after a gap and restarts of either side, each alert becomes one
plant defect exactly once. A bridge started for the first time takes what is published from
then on (a mill does not want last month's alerts replayed into its PLC); after that, nothing a
camera journaled is skipped while its journal still holds it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from pipeline.bridge.journal import BridgeJournal
from pipeline.bridge.model import PlantDefect
from pipeline.transport.publish import decode
from pipeline.transport.request import request

log = logging.getLogger("stripinspect.bridge")
POLL_MS = 100
FIRST_RUN = 2**62  # a replay "after" this returns no alerts, only the journal's id and last number


def subscriber(context: zmq.Context, pub: str, topics: tuple[str, ...]) -> zmq.Socket:
    """A SUB socket on ``pub`` for ``topics``, deep enough for a burst (the follower is quick)."""
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    sock.connect(pub)
    return sock


class NoJournalError(RuntimeError):
    """The daemon keeps no alert journal (``daemon.journal.path`` null): live alerts only."""


class CameraFollower:
    """Follows one camera daemon until ``stop`` is set.

    ``on_defect`` gets each new plant defect (already committed to the bridge journal),
    ``on_heartbeat`` and ``on_coil`` the camera's heartbeat and coil headers; all are called
    from this thread. ``to_defect(header, bridge_seq)`` turns an alert header into a defect."""

    def __init__(
        self,
        *,
        camera_id: str,
        pub: str,
        control: str,
        journal: BridgeJournal,
        to_defect: Callable[[dict[str, Any], int], PlantDefect],
        on_defect: Callable[[PlantDefect], None],
        on_heartbeat: Callable[[str, dict[str, Any]], None],
        on_coil: Callable[[str, dict[str, Any]], None],
        context: zmq.Context,
        replay_timeout_s: float,
    ) -> None:
        if replay_timeout_s <= 0:
            raise ValueError(f"replay_timeout_s must be positive, got {replay_timeout_s}")
        self.camera_id, self.pub, self.control = camera_id, pub, control
        self.journal = journal
        self.to_defect, self.on_defect = to_defect, on_defect
        self.on_heartbeat, self.on_coil = on_heartbeat, on_coil
        self.context = context
        self.replay_timeout_s = replay_timeout_s
        self.counts = {"live": 0, "replayed": 0, "duplicates": 0, "lost": 0, "bad_messages": 0}
        self._synced = False  # caught up with the camera's journal since this thread started
        self._journal_less = False

    # --- the journal -------------------------------------------------------------------------

    def _replay(self, after: int) -> tuple[list[dict[str, Any]], str | None, int]:
        """(alerts after ``after``, the journal's id, its last number), paging through it."""
        out: list[dict[str, Any]] = []
        while True:
            rep = request(
                self.context, self.control, {"cmd": "replay", "after": after}, timeout_s=self.replay_timeout_s
            )
            if not rep.get("ok"):
                raise NoJournalError(f"{self.control}: replay refused: {rep.get('error')}")
            batch = rep.get("alerts") or []
            if not batch:
                return out, rep.get("journal"), int(rep.get("last_seq") or 0)
            out += batch
            after = int(batch[-1]["seq"])

    def _take(self, h: dict[str, Any], *, replayed: bool) -> None:
        try:
            d = self.journal.add(
                camera_id=self.camera_id,
                journal=h.get("journal"),
                seq=int(h["seq"]),
                build=lambda bseq: self.to_defect(h, bseq),
            )
        except (KeyError, TypeError, ValueError) as err:
            # A malformed alert (live or in the journal): skipped and counted, and the cursor
            # moves past it, or every later replay would stop at it again.
            self.counts["bad_messages"] += 1
            log.warning("%s: alert %r skipped: %r", self.camera_id, h.get("seq"), err)
            if isinstance(h.get("seq"), int):
                self.journal.set_camera_cursor(self.camera_id, h.get("journal"), h["seq"])
            return
        if d is None:
            self.counts["duplicates"] += 1
            return
        self.counts["replayed" if replayed else "live"] += 1
        self.on_defect(d)

    def sync(self, *, upto: int | None = None) -> None:
        """Take from the camera's journal what this bridge has not taken yet; below ``upto`` (the
        live alert about to be taken) when given."""
        known, last = self.journal.camera_cursor(self.camera_id)
        if known is None and last == 0:
            # First run of this bridge for this camera: start at the journal's end (before the
            # live alert in hand, which the journal holds already).
            _, jid, last_seq = self._replay(FIRST_RUN)
            start = last_seq if upto is None else min(last_seq, upto - 1)
            self.journal.set_camera_cursor(self.camera_id, jid, start)
            return
        alerts, jid, _ = self._replay(last)
        if jid != known:
            alerts, jid, _ = self._replay(0)  # the daemon's journal was started again: from its start
        for h in alerts:
            if upto is not None and int(h["seq"]) >= upto:
                break
            self._take(h, replayed=True)

    # --- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        sock = subscriber(self.context, self.pub, ("alert", "heartbeat", "coil"))
        try:
            while not stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                try:
                    topic, header, _ = decode(sock.recv_multipart())
                except (ValueError, UnicodeDecodeError) as err:
                    self.counts["bad_messages"] += 1
                    log.warning("%s: undecodable message skipped: %s", self.camera_id, err)
                    continue
                try:
                    self._dispatch(topic, header)
                except TimeoutError as err:
                    # The control socket did not answer a replay: the alerts stay in the camera's
                    # journal, and the next message tries again (the cursor did not move).
                    log.warning("%s: journal replay failed, retried with the next message: %s", self.camera_id, err)
                    self._synced = False
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    self.counts["bad_messages"] += 1
                    log.warning("%s: %s message skipped: %r", self.camera_id, topic, err)
        finally:
            sock.close(0)

    def _dispatch(self, topic: str, h: dict[str, Any]) -> None:
        upto = int(h["seq"]) if topic == "alert" else None
        if not self._synced and not self._journal_less:
            # The subscription is live now: what was published before it, the journal has.
            try:
                self.sync(upto=upto)
            except NoJournalError as err:
                self._journal_less = True
                log.warning("%s: live alerts only, no recovery of missed ones: %s", self.camera_id, err)
            self._synced = True
        if topic == "alert":
            seq, jid = int(h["seq"]), h.get("journal")
            known, last = self.journal.camera_cursor(self.camera_id)
            gap = (jid == known and seq > last + 1) or (jid != known and seq > 1)
            if gap and not self._journal_less:
                self.sync(upto=seq)
                known, last = self.journal.camera_cursor(self.camera_id)
                if jid == known and seq > last + 1:
                    self.counts["lost"] += seq - last - 1
                    log.warning("%s: alerts %d..%d no longer in its journal: lost", self.camera_id, last + 1, seq - 1)
            self._take(h, replayed=False)
        elif topic == "heartbeat":
            self.on_heartbeat(self.camera_id, h)
        elif topic == "coil":
            self.on_coil(self.camera_id, h)


class CoilServiceFollower:
    """The coil service's PUB: live grading, confirmed periodic families, closed coils. These are
    summaries the plant can ask for again (the coil records), so no journal recovery here."""

    def __init__(self, *, pub: str, on_message: Callable[[str, dict[str, Any]], None], context: zmq.Context) -> None:
        self.pub, self.on_message, self.context = pub, on_message, context
        self.counts = {"messages": 0, "bad_messages": 0}

    def run(self, stop: threading.Event) -> None:
        sock = subscriber(self.context, self.pub, ("grading", "periodic", "coil_closed"))
        try:
            while not stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                try:
                    topic, header, _ = decode(sock.recv_multipart())
                    self.on_message(topic, header)
                    self.counts["messages"] += 1
                except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                    self.counts["bad_messages"] += 1
                    log.warning("coil service: message skipped: %r", err)
        finally:
            sock.close(0)
