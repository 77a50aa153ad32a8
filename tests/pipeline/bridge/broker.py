"""A real MQTT broker for the tests, and the clients that watch it.

``start_broker`` runs amqtt (pure Python, a dev dependency, so CI needs nothing from apt) through
its own ``amqtt`` command line in a subprocess, on 127.0.0.1 at a free port, with a YAML config in
amqtt 0.12's format (``listeners`` and a ``plugins`` map; older releases spelt auth differently),
and waits until it accepts connections. A subprocess rather than a thread: the test can SIGKILL or
restart it (a broker outage), and its event loop does not share the GIL with the code under test.

``Subscriber`` is a paho client recording what it receives; ``TcpGate`` is a relay that can be
closed and opened to cut the network between a client and the broker; ``stalled_subscriber`` is a
client that subscribes and then never reads.

Two amqtt 0.12 quirks the tests allow for: at connect it replays the retained messages matching
every topic filter any client has ever subscribed (not only the new client's, and at QoS 0), so a
retained message can arrive twice and on topics the client never asked for; ``Subscriber`` drops
the latter, and tests do not count retained duplicates. (MQTT 3.1.1 sends retained messages only
for the new subscription's own filter, MQTT-3.3.1-6.)
"""

from __future__ import annotations

import contextlib
import json
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.pipeline.bridge.conftest import free_port

HOST = "127.0.0.1"


class BrokerProcess:
    """A running amqtt broker; ``stop`` (SIGTERM, then SIGKILL) or ``kill`` (SIGKILL) ends it."""

    def __init__(self, *, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.host = HOST
        self.port = port
        self.log_path = log_path

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError as err:
            return f"(no broker log: {err})"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


def _config_yaml(port: int, password_file: Path | None) -> str:
    # amqtt 0.12: plugins are a map of dotted class path -> its Config fields.
    if password_file is None:
        auth = "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
    else:
        auth = f"  amqtt.plugins.authentication.FileAuthPlugin:\n    password_file: {json.dumps(str(password_file))}\n"
    return f"listeners:\n  default:\n    type: tcp\n    bind: {HOST}:{port}\nplugins:\n{auth}"


def _password_file(workdir: Path, users: Mapping[str, str]) -> Path:
    # FileAuthPlugin verifies argon2 hashes (pwdlib, an amqtt dependency).
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    hasher = PasswordHash((Argon2Hasher(),))
    path = workdir / "broker_users.txt"
    path.write_text("".join(f"{u}:{hasher.hash(p)}\n" for u, p in users.items()))
    return path


def wait_accepting(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing accepts on {HOST}:{port} after {timeout_s} s") from None
            time.sleep(0.02)


def start_broker(
    workdir: Path, *, port: int | None = None, users: Mapping[str, str] | None = None, timeout_s: float = 15.0
) -> BrokerProcess:
    """amqtt on ``HOST:port`` (a free port when None); ``users`` (name -> password) turns off
    anonymous access."""
    port = free_port() if port is None else port
    workdir.mkdir(parents=True, exist_ok=True)
    password_file = _password_file(workdir, users) if users else None
    cfg = workdir / f"broker_{port}.yaml"
    cfg.write_text(_config_yaml(port, password_file))
    log_path = workdir / f"broker_{port}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    broker = BrokerProcess(proc=proc, port=port, log_path=log_path)
    try:
        wait_accepting(port, timeout_s, proc)
    except (RuntimeError, TimeoutError) as err:
        broker.kill()
        raise RuntimeError(f"{err}; broker log:\n{broker.log_tail()}") from err
    return broker


@contextlib.contextmanager
def running_broker(
    workdir: Path, *, port: int | None = None, users: Mapping[str, str] | None = None
) -> Iterator[BrokerProcess]:
    broker = start_broker(workdir, port=port, users=users)
    try:
        yield broker
    finally:
        broker.stop()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: dict[str, Any]
    retain: bool
    qos: int
    at: float  # time.perf_counter() in this process when on_message ran


class Subscriber:
    """A paho client subscribed to ``topics`` (``#`` wildcards allowed) that records every message.

    The constructor returns once the broker has granted the subscriptions."""

    def __init__(
        self,
        *,
        port: int,
        topics: tuple[str, ...],
        client_id: str,
        qos: int = 1,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self._subscribed = threading.Event()
        self._client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._topics = topics
        self._qos = qos
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(HOST, port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.close()
            raise TimeoutError(f"subscriber {client_id}: no SUBACK within {timeout_s} s")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe([(t, self._qos) for t in self._topics])

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        at = time.perf_counter()
        if not any(paho.topic_matches_sub(t, msg.topic) for t in self._topics):
            return  # amqtt's replay of other clients' retained topics (see the module docstring)
        self.messages.put(Received(msg.topic, json.loads(msg.payload), bool(msg.retain), msg.qos, at))

    def take(self, n: int, timeout_s: float = 5.0, topic: str | None = None) -> list[Received]:
        """The next ``n`` messages (on ``topic`` only, when given; others are discarded)."""
        out: list[Received] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            left = deadline - time.monotonic()
            try:
                m = self.messages.get(timeout=max(left, 0.0))
            except queue.Empty:
                raise TimeoutError(f"got {len(out)} of {n} messages within {timeout_s} s") from None
            if topic is None or m.topic == topic:
                out.append(m)
        return out

    def wait_for(self, topic: str, pred: Any, timeout_s: float = 5.0) -> Received:
        """The first message on ``topic`` whose payload satisfies ``pred``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                m = self.messages.get(timeout=max(left, 0.0))
            except queue.Empty:
                raise TimeoutError(f"no matching message on {topic} within {timeout_s} s") from None
            if m.topic == topic and pred(m.payload):
                return m

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class TcpGate:
    """A TCP relay ``HOST:port`` -> ``HOST:target``: ``open()`` listens, ``close()`` stops listening
    and resets every relayed connection (to both ends: a network cut, not an MQTT DISCONNECT)."""

    def __init__(self, *, target: int, port: int | None = None) -> None:
        self.port = free_port() if port is None else port
        self._target = target
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(8)
        listener.settimeout(0.05)
        with self._lock:
            self._listener = listener
        t = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection((HOST, self._target), timeout=5)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
            t = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 0.1)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except (OSError, ValueError):  # the gate closed the sockets under us
            return

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for s in conns:
            # SO_LINGER 0: close sends RST, as a cable pulled and a peer timing out would end it.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        for t in self._threads:
            t.join(timeout=2)
        self._threads = []


def _mqtt_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            return bytes([first]) + length + body


def stalled_subscriber(*, port: int, topic: str, client_id: str, rcvbuf: int = 4096) -> socket.socket:
    """A client that subscribes to ``topic`` (QoS 0) and then never reads: its receive window
    fills and the broker's writes to it back up. Hand-written MQTT 3.1.1 packets, since a paho
    client would keep reading in its network thread. Close the socket to end it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect((HOST, port))
    # CONNECT: protocol "MQTT" level 4, clean session, keepalive 120 s (no PINGREQ will come).
    s.sendall(_packet(0x10, _mqtt_string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 120) + _mqtt_string(client_id)))
    connack = s.recv(4)
    if connack[:1] != b"\x20" or connack[3:4] != b"\x00":
        raise RuntimeError(f"stalled subscriber: bad CONNACK {connack!r}")
    s.sendall(_packet(0x82, struct.pack("!H", 1) + _mqtt_string(topic) + b"\x00"))
    suback = s.recv(5)
    if suback[:1] != b"\x90":
        raise RuntimeError(f"stalled subscriber: bad SUBACK {suback!r}")
    return s
