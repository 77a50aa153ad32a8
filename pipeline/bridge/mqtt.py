"""MQTT publisher of the plant bridge: defect alerts, coil messages and the line status, as JSON,
to the plant's broker (docs/plant_mqtt.md has the topics and payloads).

A thin shell over paho-mqtt 2.x: paho's network thread (``loop_start``) owns the socket, connects
in the background and reconnects with backoff; this module decides topics and payloads, counts
what happened, and tells the bridge whether the broker has each alert.

Alerts are not left in paho's memory: ``defect`` hands one to paho only while connected and
returns once the broker has acknowledged it (PUBACK, PUBCOMP for QoS 2), or raises
NotDeliveredError, and the bridge offers it again from its durable journal. The wait never blocks
the event loop: ``on_publish`` (paho's thread) resolves an asyncio future on the loop.
Coil messages and the status are not waited for (paho keeps QoS 1/2 ones, bounded,
while disconnected); the bridge does not resend those.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from pipeline.bridge.model import LineStatus, NotDeliveredError, PlantCoil, PlantCommands, PlantDefect
from pipeline.config import MqttConfig
from pipeline.errors import StripinspectError
from pipeline.process import RateLimitedLog

log = logging.getLogger(__name__)

# Reconnect backoff (doubling from the first to the second): a restarted broker is found again
# within 5 s, and a dead one is not hammered.
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
# QoS 1/2 messages on the wire before the broker's PUBACK; more wait in paho's queue (coil
# messages during an outage). paho's default of 20 would hold a burst behind one round trip.
MAX_INFLIGHT = 100
# How long defect() waits for the broker's acknowledgement before the bridge is told to offer the
# alert again. Loopback takes ~1 ms; a broker that has not answered in 5 s is frozen or the link is
# dead (paho notices the latter only at the keepalive), and the bridge's journal holds the alert.
ACK_TIMEOUT_S = 5.0
# How long stop() waits for outstanding acknowledgements and for the offline status's own.
DRAIN_TIMEOUT_S = 2.0
_POLL_S = 0.005  # stop()'s drain only: the alert path waits on a future, never on a timer


class _Pending:
    """A message paho has accepted and not yet reported sent (QoS 0: written; 1/2: acknowledged).
    ``future`` is set while an alert's ``defect`` waits on it; paho's thread reads it under the
    sink's lock. Mutable, and compared by identity: a mid is reused once paho lets it go."""

    __slots__ = ("future", "mid", "qos")

    def __init__(self, *, mid: int, qos: int, future: asyncio.Future[None] | None) -> None:
        self.mid, self.qos, self.future = mid, qos, future


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # it may have timed out (cancelled) meanwhile
        fut.set_result(None)


class MqttError(StripinspectError):
    """The MQTT section cannot be used (bad topic, unreadable password file); one line."""


@dataclass(frozen=True)
class Topics:
    """Every topic the bridge publishes, under ``base``."""

    base: str

    @property
    def alert(self) -> str:
        return f"{self.base}/alert"

    @property
    def coil(self) -> str:
        return f"{self.base}/coil"

    @property
    def coil_last(self) -> str:
        return f"{self.base}/coil/last"

    @property
    def status(self) -> str:
        return f"{self.base}/status"


def check_base_topic(base: str) -> str:
    """``base`` unchanged, or MqttError: wildcards cannot be published to, and a leading or
    trailing ``/`` would make empty topic levels that subscribers rarely expect."""
    if any(c in base for c in "+#\0"):
        raise MqttError(f"bridge.mqtt.base_topic = {base!r}: must not contain '+', '#' or NUL")
    if base.startswith("/") or base.endswith("/") or "//" in base:
        raise MqttError(f"bridge.mqtt.base_topic = {base!r}: no empty levels (leading, trailing or double '/')")
    if base.startswith("$"):
        raise MqttError(f"bridge.mqtt.base_topic = {base!r}: topics starting with '$' belong to the broker")
    return base


def encode(obj: dict[str, Any]) -> bytes:
    """The one JSON encoding of every payload: sorted keys, compact, floats as Python prints them."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def status_payload(s: LineStatus) -> dict[str, Any]:
    return {**s.to_json(), "online": True}


def offline_payload(*, reason: str, at: float | None) -> dict[str, Any]:
    """The status when the bridge is gone: ``reason`` "stopped" (a clean stop, ``at`` its Unix
    time) or "connection_lost" (the broker's last will, ``at`` None: the will is written at
    connect time, so it cannot know when the connection will be lost)."""
    return {"online": False, "state": "offline", "reason": reason, "time": at}


def read_password(cfg: MqttConfig) -> str | None:
    """The broker password from ``cfg.password_file`` (surrounding whitespace stripped), or None."""
    if cfg.password_file is None:
        return None
    if cfg.username is None:
        raise MqttError("bridge.mqtt.password_file is set but bridge.mqtt.username is not (MQTT needs both)")
    try:
        password = cfg.password_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise MqttError(f"bridge.mqtt.password_file = {str(cfg.password_file)!r}: cannot read: {err}") from err
    if not password:
        raise MqttError(f"bridge.mqtt.password_file = {str(cfg.password_file)!r}: empty")
    return password


class MqttSink:
    """Publishes to ``cfg``'s broker; one instance per bridge process.

    ``ack_timeout_s`` bounds the wait for an alert's acknowledgement. ``queue_size`` bounds paho's
    queue of QoS>0 messages not yet acknowledged (coil messages kept during an outage, alerts
    whose acknowledgement was late); a coil message beyond it is dropped and counted. ``commands``
    is unused: MQTT is output only (the plant's commands come over OPC UA or Modbus).
    """

    name = "mqtt"

    def __init__(
        self,
        *,
        cfg: MqttConfig,
        commands: PlantCommands,
        queue_size: int = 10_000,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        if not 1 <= queue_size <= 10_000_000:
            raise ValueError(f"queue_size must be in 1..10000000, got {queue_size}")
        if not 0 < ack_timeout_s <= 600:
            raise ValueError(f"ack_timeout_s must be in (0, 600], got {ack_timeout_s}")
        if not 0 <= drain_timeout_s <= 600:
            raise ValueError(f"drain_timeout_s must be in 0..600, got {drain_timeout_s}")
        self._cfg = cfg
        self._commands = commands
        self._topics = Topics(check_base_topic(cfg.base_topic))
        self._queue_size = queue_size
        self._ack_timeout_s = ack_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._ratelog = RateLimitedLog(log, interval_s=10.0)
        self._loop: asyncio.AbstractEventLoop | None = None

        # Guards the counters, the connected flag and the pending messages (paho's thread and the
        # loop's). Never held while calling into paho: on_publish runs under paho's message lock.
        self._lock = threading.Lock()
        self._connected = False
        self._stopping = False
        self._started = False
        self._published = 0
        self._acked = 0
        self._unacked = 0
        self._dropped = 0
        self._not_delivered = 0
        self._ack_timeouts = 0
        self._refused = 0
        self._connects = 0
        self._disconnects = 0
        self._connect_failures = 0
        # mid -> the message paho holds for it. paho may report a mid sent (on_publish) before the
        # loop has registered it (publish() returned, the lock not yet taken): such mids wait in
        # _early until their registration, which every accepted publish does, so none goes stale.
        self._pending: dict[int, _Pending] = {}
        self._early: set[int] = set()
        # An alert whose acknowledgement did not come in time, which paho still holds and resends
        # after a reconnect: when the bridge offers that alert again, defect() waits for this copy
        # instead of publishing a second one (bridge_seq, its message).
        self._held: tuple[int, _Pending] | None = None

        # Serialises "remember the latest status" with publishing it, so on_connect (paho's
        # thread) never re-publishes an older status after the loop published a newer one.
        self._status_lock = threading.Lock()
        self._last_status: LineStatus | None = None

        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        client.max_queued_messages_set(queue_size)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)  # type: ignore[arg-type]
        password = read_password(cfg)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, password)
        # Registered before connecting: the broker publishes it if the connection ends without a
        # DISCONNECT (process killed, network cut, keepalive missed: 1.5 x keepalive_s).
        client.will_set(
            self._topics.status, encode(offline_payload(reason="connection_lost", at=None)), qos=1, retain=True
        )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        self._client = client

    @property
    def topics(self) -> Topics:
        return self._topics

    # --- Sink ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts paho's thread, which connects in the background: a broker that is down now does
        not hold up the bridge; alerts are refused (NotDeliveredError) until it is reachable."""
        if self._started or self._stopping:
            raise RuntimeError("MqttSink.start(): a sink starts once")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self._cfg.host, self._cfg.port, keepalive=self._cfg.keepalive_s)
        self._client.loop_start()
        log.info(
            "mqtt: publishing under %s/ to %s:%d (QoS %d, acknowledgement timeout %.1f s)",
            self._topics.base,
            self._cfg.host,
            self._cfg.port,
            self._cfg.qos,
            self._ack_timeout_s,
        )

    async def defect(self, d: PlantDefect) -> None:
        """Returns once the broker has the alert (QoS 1/2: acknowledged; QoS 0: paho took it, no
        guarantee); raises NotDeliveredError when not connected, when paho refuses it, or when no
        acknowledgement comes within ``ack_timeout_s``."""
        held, self._held = self._held, None
        if held is not None and held[0] == d.bridge_seq:
            await self._await_held(d, held[1])
            return
        if not self._connected:
            # Not handed to paho: it would keep the alert and send it on reconnect, and the bridge,
            # which offers it again from its journal, would send it a second time.
            raise self._refuse("not connected to the broker")
        qos = self._cfg.qos
        info = self._client.publish(self._topics.alert, encode(d.to_json()), qos=qos, retain=False)
        # NO_CONN with QoS>0: the connection dropped a moment ago and paho keeps the alert for the
        # reconnect; its acknowledgement is awaited like any other.
        if not (info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0)):
            reason = "queue full" if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE else paho.error_string(info.rc)
            raise self._refuse(f"the MQTT client refused it ({reason})")
        if qos == 0:
            self._track(info.mid, qos, None)
            return
        assert self._loop is not None, "defect() before start()"
        fut: asyncio.Future[None] = self._loop.create_future()
        pending = self._track(info.mid, qos, fut)
        if pending is not None:
            await self._await_ack(d, pending, fut)

    async def coil(self, c: PlantCoil) -> None:
        payload = c.to_json()
        self._publish(self._topics.coil, payload, qos=self._cfg.qos, retain=False, what="coil")
        if c.kind == "closed":
            # Retained so that a historian connecting at any time finds the last finished coil.
            self._publish(self._topics.coil_last, payload, qos=self._cfg.qos, retain=True, what="coil")

    async def status(self, s: LineStatus) -> None:
        with self._status_lock:
            self._last_status = s
            # While disconnected only the latest status matters: on_connect publishes it. Queuing
            # each one would fill paho's queue with stale heartbeats during an outage.
            if self._connected:
                self._publish(self._topics.status, status_payload(s), qos=1, retain=True, what="status")

    async def stop(self) -> None:
        """Drains outstanding acknowledgements (up to ``drain_timeout_s``), publishes the offline
        status (the broker sends the will only on an unclean disconnect), then disconnects."""
        if not self._started:
            return
        with self._lock:
            self._stopping = True
            connected = self._connected
        if connected:
            await self._wait(lambda: self._unacked == 0, self._drain_timeout_s)
            self._publish(
                self._topics.status,
                offline_payload(reason="stopped", at=time.time()),
                qos=1,
                retain=True,
                what="status",
            )
            await self._wait(lambda: self._unacked == 0, self._drain_timeout_s)
        if self._unacked:
            log.warning(
                "mqtt: stopping with %d messages the broker has not acknowledged (alerts among them are "
                "offered again from the bridge journal at the next start)",
                self._unacked,
            )
        self._client.disconnect()
        # loop_stop joins paho's thread, which may sit in a reconnect wait (up to 1 s) or a
        # connect attempt: not on the event loop's thread.
        await asyncio.to_thread(self._client.loop_stop)
        with self._lock:
            self._connected = False
        self._started = False

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "connected": int(self._connected),
                "published": self._published,
                "acked": self._acked,
                "unacked": self._unacked,
                "not_delivered": self._not_delivered,
                "ack_timeouts": self._ack_timeouts,
                "dropped": self._dropped,
                "refused": self._refused,
                "connects": self._connects,
                "disconnects": self._disconnects,
                "connect_failures": self._connect_failures,
            }

    # --- the loop's side ----------------------------------------------------------------------

    def _refuse(self, why: str) -> NotDeliveredError:
        with self._lock:
            self._not_delivered += 1
        return NotDeliveredError(f"mqtt: {why}")

    def _track(self, mid: int, qos: int, fut: asyncio.Future[None] | None) -> _Pending | None:
        """Registers a message paho accepted; None when paho has reported it sent already."""
        with self._lock:
            self._published += 1
            if mid in self._early:
                self._early.discard(mid)
                if qos > 0:
                    self._acked += 1
                return None
            pending = _Pending(mid=mid, qos=qos, future=fut)
            self._pending[mid] = pending
            if qos > 0:
                self._unacked += 1
            return pending

    async def _await_ack(self, d: PlantDefect, pending: _Pending, fut: asyncio.Future[None]) -> None:
        try:
            await asyncio.wait_for(fut, self._ack_timeout_s)
        except TimeoutError:
            with self._lock:
                still = self._pending.get(pending.mid) is pending
                if still:
                    self._ack_timeouts += 1
            if not still:
                return  # acknowledged in the instant the wait ran out
            # paho keeps it and may yet deliver it (then resends it after a reconnect): remember it,
            # so the bridge's next offer of this alert waits for it rather than sending a copy.
            self._held = (d.bridge_seq, pending)
            self._ratelog.warning(
                "ack-timeout",
                "mqtt: no acknowledgement of alert %d within %.1f s (broker %s); the bridge offers it again",
                d.bridge_seq,
                self._ack_timeout_s,
                "connected" if self._connected else "not connected",
            )
            raise self._refuse(f"no acknowledgement within {self._ack_timeout_s:g} s") from None
        finally:
            with self._lock:
                if pending.future is fut:
                    pending.future = None

    async def _await_held(self, d: PlantDefect, pending: _Pending) -> None:
        """The bridge offers again an alert whose earlier copy paho still holds: wait for that
        copy's acknowledgement rather than publish a second one."""
        assert self._loop is not None, "defect() before start()"
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            if self._pending.get(pending.mid) is not pending:
                return  # acknowledged after its wait ran out: the broker has it
            connected = self._connected
            if connected:
                pending.future = fut
        if not connected:
            # paho sends that copy after the reconnect; the next offer waits for its acknowledgement.
            self._held = (d.bridge_seq, pending)
            raise self._refuse("not connected to the broker (an earlier copy waits in the client for the reconnect)")
        await self._await_ack(d, pending, fut)

    def _publish(self, topic: str, payload: dict[str, Any], *, qos: int, retain: bool, what: str) -> bool:
        """Hands a coil or status message to paho, not waited for; True when paho has it (sent, or
        kept for the broker). Any thread."""
        info = self._client.publish(topic, encode(payload), qos=qos, retain=retain)
        # NO_CONN with QoS>0: paho keeps it and sends it on reconnect. With QoS 0 paho keeps
        # nothing while disconnected, so the message is gone.
        kept = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0)
        if kept:
            self._track(info.mid, qos, None)
            return True
        with self._lock:
            self._dropped += 1
        reason = "queue full" if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE else paho.error_string(info.rc)
        self._ratelog.warning(
            f"drop-{what}",
            "mqtt: %s to %s dropped (%s; %d unacknowledged, queue %d, broker %s)",
            what,
            topic,
            reason,
            self._unacked,
            self._queue_size,
            "connected" if self._connected else "not connected",
        )
        return False

    async def _wait(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    # --- paho's thread ------------------------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Alerts are small and latency-bound. With Nagle's algorithm a publish written while an
        # earlier segment is still unacknowledged at TCP level waits for that ACK, which a peer may
        # delay by up to 40 ms: it bites in bursts and on links with a real round trip (a single
        # alert on loopback shows no difference).
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            with self._lock:
                self._connect_failures += 1
            self._ratelog.error(
                "refused",
                "mqtt: broker %s:%d refused the connection: %s (retrying)",
                self._cfg.host,
                self._cfg.port,
                reason_code,
            )
            return
        with self._lock:
            self._connected = True
            self._connects += 1
        log.info("mqtt: connected to %s:%d", self._cfg.host, self._cfg.port)
        with self._status_lock:
            # The retained status may be the will ("offline") from the connection just lost.
            if self._last_status is not None:
                self._publish(self._topics.status, status_payload(self._last_status), qos=1, retain=True, what="status")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        with self._lock:
            self._connect_failures += 1
        self._ratelog.warning(
            "connect-fail",
            "mqtt: cannot reach the broker at %s:%d (retrying every %.1f..%.1f s; alerts wait in the bridge journal)",
            self._cfg.host,
            self._cfg.port,
            RECONNECT_MIN_S,
            RECONNECT_MAX_S,
        )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._lock:
            was_connected = self._connected
            self._connected = False
            if was_connected:
                self._disconnects += 1
            stopping = self._stopping
            # QoS 0 messages not yet written are gone (paho empties its send buffer on reconnect)
            # and no on_publish will come for them.
            for mid in [m for m, p in self._pending.items() if p.qos == 0]:
                del self._pending[mid]
        if was_connected and not stopping:
            self._ratelog.warning(
                "disconnect",
                "mqtt: lost the broker at %s:%d (%s); reconnecting, alerts wait in the bridge journal",
                self._cfg.host,
                self._cfg.port,
                reason_code,
            )

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        # QoS 1/2: the broker's PUBACK / PUBCOMP; QoS 0: written to the socket. Called with paho's
        # message lock held: touch only our own state here, never call into paho.
        with self._lock:
            pending = self._pending.pop(mid, None)
            if pending is None:
                self._early.add(mid)  # publish() has not handed the mid back to the loop yet
                return
            if pending.qos > 0:
                self._acked += 1
                self._unacked -= 1
            fut = pending.future
            pending.future = None
            if reason_code.is_failure:  # MQTT 5 brokers only (quota, not authorised); 3.1.1 has no code
                self._refused += 1
        if reason_code.is_failure:
            self._ratelog.warning("refused-publish", "mqtt: the broker refused a message: %s", reason_code)
        if fut is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(_settle, fut)
            except RuntimeError:  # the loop has closed: nobody waits for this acknowledgement any more
                log.debug("mqtt: acknowledgement of mid %d after the event loop closed", mid)
