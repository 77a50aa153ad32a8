"""MQTT publisher of the plant bridge: defect alerts, coil messages and the line status, as JSON,
to the plant's broker (docs/plant_mqtt.md has the topics and payloads).

A thin shell over paho-mqtt 2.x: paho's network thread (``loop_start``) owns the socket, connects
in the background, reconnects with backoff and keeps QoS 1/2 messages until the broker
acknowledges them; this module only decides topics and payloads and counts what happened. The
bridge core calls the ``Sink`` methods from its asyncio loop; ``publish`` only queues bytes for
paho's thread, so no call here waits on the network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from pipeline.bridge.model import LineStatus, PlantCoil, PlantCommands, PlantDefect
from pipeline.config import MqttConfig
from pipeline.errors import StripinspectError
from pipeline.process import RateLimitedLog

log = logging.getLogger(__name__)

# Reconnect backoff (doubling from the first to the second): a restarted broker is found again
# within 5 s, and a dead one is not hammered.
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
# QoS 1/2 messages on the wire before the broker's PUBACK; more wait in paho's queue. paho's
# default of 20 would hold a burst of alerts behind one loopback round trip per 20 messages.
MAX_INFLIGHT = 100
# How long stop() waits for outstanding acknowledgements and for the offline status's own.
DRAIN_TIMEOUT_S = 2.0
_POLL_S = 0.005


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

    ``queue_size`` bounds paho's queue of QoS>0 messages not yet acknowledged (in flight or
    waiting for the broker); a publish beyond it is dropped and counted. ``commands`` is unused:
    MQTT is output only (the plant's commands come over OPC UA or Modbus).
    """

    name = "mqtt"

    def __init__(
        self,
        *,
        cfg: MqttConfig,
        commands: PlantCommands,
        queue_size: int = 10_000,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        if not 1 <= queue_size <= 10_000_000:
            raise ValueError(f"queue_size must be in 1..10000000, got {queue_size}")
        if not 0 <= drain_timeout_s <= 600:
            raise ValueError(f"drain_timeout_s must be in 0..600, got {drain_timeout_s}")
        self._cfg = cfg
        self._commands = commands
        self._topics = Topics(check_base_topic(cfg.base_topic))
        self._queue_size = queue_size
        self._drain_timeout_s = drain_timeout_s
        self._ratelog = RateLimitedLog(log, interval_s=10.0)

        self._lock = threading.Lock()  # counters and the connected flag (paho's thread and the loop's)
        self._connected = False
        self._stopping = False
        self._started = False
        self._published = 0
        self._dropped = 0
        self._refused = 0
        self._connects = 0
        self._disconnects = 0
        self._connect_failures = 0
        # Infos of QoS>0 messages paho accepted, oldest first; unacknowledged = not is_published().
        # Kept here rather than as mids matched in on_publish, which paho may call (under its own
        # lock) before publish() has even returned the mid.
        self._pending: deque[paho.MQTTMessageInfo] = deque()
        self._pending_qos_total = 0

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
        not hold up the bridge; messages queue (bounded) until it is reachable."""
        if self._started or self._stopping:
            raise RuntimeError("MqttSink.start(): a sink starts once")
        self._started = True
        self._client.connect_async(self._cfg.host, self._cfg.port, keepalive=self._cfg.keepalive_s)
        self._client.loop_start()
        log.info(
            "mqtt: publishing under %s/ to %s:%d (QoS %d, queue %d)",
            self._topics.base,
            self._cfg.host,
            self._cfg.port,
            self._cfg.qos,
            self._queue_size,
        )

    async def defect(self, d: PlantDefect) -> None:
        self._publish(self._topics.alert, d.to_json(), qos=self._cfg.qos, retain=False, what="alert")

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
            # each one would fill the alerts' queue with stale heartbeats during an outage.
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
            await self._wait(lambda: self._unacked() == 0, self._drain_timeout_s)
            info = self._client.publish(
                self._topics.status, encode(offline_payload(reason="stopped", at=time.time())), qos=1, retain=True
            )
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                await self._wait(info.is_published, self._drain_timeout_s)
        unacked = self._unacked()
        if unacked:
            log.warning("mqtt: stopping with %d messages the broker has not acknowledged (lost to MQTT)", unacked)
        self._client.disconnect()
        # loop_stop joins paho's thread, which may sit in a reconnect wait (up to 1 s) or a
        # connect attempt: not on the event loop's thread.
        await asyncio.to_thread(self._client.loop_stop)
        with self._lock:
            self._connected = False
        self._started = False

    def counters(self) -> dict[str, int]:
        unacked = self._unacked()
        with self._lock:
            return {
                "connected": int(self._connected),
                "published": self._published,
                "acked": self._pending_qos_total - unacked,
                "unacked": unacked,
                "dropped": self._dropped,
                "refused": self._refused,
                "connects": self._connects,
                "disconnects": self._disconnects,
                "connect_failures": self._connect_failures,
            }

    # --- the loop's side ----------------------------------------------------------------------

    def _publish(self, topic: str, payload: dict[str, Any], *, qos: int, retain: bool, what: str) -> bool:
        """Hands one message to paho; True when paho has it (sent, or queued for the broker)."""
        info = self._client.publish(topic, encode(payload), qos=qos, retain=retain)
        # NO_CONN with QoS>0: paho keeps it and sends it on reconnect. With QoS 0 paho keeps
        # nothing while disconnected, so the message is gone.
        kept = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0)
        if kept and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # paho leaves rc at NO_CONN for a message it queued and later sends (its resend passes
            # no info), and is_published() raises for any non-zero rc: record it as accepted.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        with self._lock:
            if kept:
                self._published += 1
                if qos > 0:
                    self._pending.append(info)
                    self._pending_qos_total += 1
                    self._prune_pending()
            else:
                self._dropped += 1
        if not kept:
            reason = "queue full" if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE else paho.error_string(info.rc)
            self._ratelog.warning(
                f"drop-{what}",
                "mqtt: %s to %s dropped (%s; %d unacknowledged, queue %d, broker %s)",
                what,
                topic,
                reason,
                self._unacked(),
                self._queue_size,
                "connected" if self._connected else "not connected",
            )
        return kept

    def _prune_pending(self) -> None:
        # Caller holds self._lock. Acknowledged ones leave from the front; a long run of them behind
        # one slow acknowledgement is swept out once the deque is twice the queue (paho never holds
        # more than queue_size unacknowledged, so this bounds the deque).
        while self._pending and self._pending[0].is_published():
            self._pending.popleft()
        if len(self._pending) > 2 * self._queue_size:
            self._pending = deque(i for i in self._pending if not i.is_published())

    def _unacked(self) -> int:
        with self._lock:
            self._prune_pending()
            return sum(1 for i in self._pending if not i.is_published())

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
            "mqtt: cannot reach the broker at %s:%d (retrying every %.1f..%.1f s; %d messages queued)",
            self._cfg.host,
            self._cfg.port,
            RECONNECT_MIN_S,
            RECONNECT_MAX_S,
            self._unacked(),
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
        if was_connected and not stopping:
            self._ratelog.warning(
                "disconnect",
                "mqtt: lost the broker at %s:%d (%s); reconnecting, messages queue up to %d",
                self._cfg.host,
                self._cfg.port,
                reason_code,
                self._queue_size,
            )

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        # Called with paho's message lock held: touch only our own counters here.
        if reason_code.is_failure:  # MQTT 5 brokers only (quota, not authorised); 3.1.1 has no code
            with self._lock:
                self._refused += 1
            self._ratelog.warning("refused-publish", "mqtt: the broker refused a message: %s", reason_code)
