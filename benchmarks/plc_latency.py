"""Alert to PLC: a paced camera daemon with planted defects, the plant bridge, and real clients of
every plant protocol on loopback, each checked for every alert and timed (issue 17).

    python benchmarks/plc_latency.py --json runs/plc_latency.json [--alerts 40]

Processes: ``stripinspect run`` (a synthetic strip with planted defects, paced by the wall
clock), ``stripinspect bridge`` (OPC UA with Basic256Sha256 Sign&Encrypt and a user login,
Modbus TCP, MQTT), and an MQTT broker (amqtt). In this process: an asyncua client subscribed to
the ResultReady events (signed and encrypted, logged in), a pymodbus client polling the defect
ring every ``--modbus-poll-ms``, and a paho subscriber. Before the alerts are counted, the coil
is started through the OPC UA CoilStart method (the daemon's coil tracking), so every alert
carries its coil ID. After the run, an anonymous, a wrong-password, an untrusted-certificate
and an unencrypted OPC UA client each try to connect, and a Modbus client writes out of range.

Latency: from the alert's ``publish_time`` (the daemon's PUB send, journal committed) to the
client's receipt (same clock, one machine). ``alerts_published``: alerts the daemon journaled
after every client was subscribed; a client "received" one when its ``bridge_seq`` arrived.

JSON keys: alerts_published, opcua_received, modbus_received, mqtt_received, latency_ms
({opcua, modbus, mqtt}: {p50, p99, max}), opcua_security, unauthenticated_rejected, plus
refusals (each attempt and its error), coil_id, coil_on_alerts, modbus_write_refused,
bridge_counters, wall_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.coil_line import calibrate_threshold, fit_bundle_for, free_port  # noqa: E402
from pipeline.acquisition.synthetic_coil import coil_cameras  # noqa: E402

COIL = "24-PLC001"
GRADE = "DC04"
USER, PASSWORD = "plc", "correct horse battery staple"


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child keeps it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "stripinspect", *cmd], stdout=out, stderr=out, env=env, cwd=REPO)


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {port} after {timeout_s} s; see {log}") from None
            time.sleep(0.1)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    a = np.asarray(values) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


# --- MQTT ----------------------------------------------------------------------------------


class MqttClient:
    """A paho subscriber on ``<base>/alert``: (bridge_seq, receipt time) per alert."""

    def __init__(self, *, port: int, topic: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.received: dict[int, float] = {}
        self._ready = threading.Event()
        self._c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-historian")
        self._c.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._c.on_subscribe = lambda *_: self._ready.set()
        self._c.on_message = self._on_message
        self._c.connect("127.0.0.1", port, keepalive=30)
        self._c.loop_start()
        if not self._ready.wait(15):
            raise TimeoutError("MQTT subscriber: no SUBACK")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        seq = int(json.loads(msg.payload)["bridge_seq"])
        self.received.setdefault(seq, now)

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


# --- OPC UA --------------------------------------------------------------------------------

NAMESPACE = "http://stripinspect.org/UA/MachineVision/"


def opcua_client(url: str, pki: Path, client: str, *, user: str | None, password: str | None) -> Any:
    """An asyncua client, Basic256Sha256 Sign&Encrypt with ``client``'s certificate from ``pki``
    (None: no security at all), logged in as ``user`` (None: anonymous)."""
    from asyncua import Client
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    c = Client(url, timeout=5)
    c.application_uri = f"urn:stripinspect:opcua:client:{client}"
    if user is not None:
        c.set_user(user)
        c.set_password(password or "")
    c._bench_security = (  # type: ignore[attr-defined]
        None
        if pki is None
        else (SecurityPolicyBasic256Sha256, pki / "clients" / f"{client}_cert.der", pki / "clients" / f"{client}_key.pem")
    )
    return c


async def secure(c: Any, server_cert: Path) -> None:
    sec = c._bench_security
    if sec is not None:
        policy, cert, key = sec
        await c.set_security(policy, str(cert), str(key), server_certificate=str(server_cert))


class OpcUaEvents:
    """A logged-in, encrypted asyncua client subscribed to ResultReady events on VisionSystem,
    on a loop of its own in a thread; also calls the CoilStart method."""

    def __init__(self, *, url: str, pki: Path, interval_ms: int) -> None:
        self.url, self.pki, self.interval_ms = url, pki, interval_ms
        self.received: dict[int, float] = {}
        self.security = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._coil: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("OPC UA client did not subscribe")
        if self._error is not None:
            raise self._error

    def event_notification(self, ev: Any) -> None:
        now = time.time()
        self.received.setdefault(int(ev.BridgeSeq), now)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from asyncua import ua

        self._stop = asyncio.Event()
        try:
            c = opcua_client(self.url, self.pki, "plc", user=USER, password=PASSWORD)
            await secure(c, self.pki / "server_cert.der")
            async with c:
                ns = await c.get_namespace_index(NAMESPACE)
                vs = c.get_node(ua.NodeId("VisionSystem", ns))
                self._coil = (c.get_node(ua.NodeId("VisionSystem.CoilManagement", ns)), ns)
                sub = await c.create_subscription(self.interval_ms, self)
                await sub.subscribe_events(vs, c.get_node(ua.NodeId("ResultReadyEventType", ns)))
                policy = c.security_policy
                self.security = f"{policy.URI.rsplit('#', 1)[-1]} {ua.MessageSecurityMode(policy.Mode).name}, user"
                self._ready.set()
                await self._stop.wait()
        except BaseException as err:  # noqa: BLE001 - reported by the constructor or close()
            self._error = err
            self._ready.set()

    def coil_start(self, coil_id: str, grade: str) -> None:
        async def call() -> None:
            node, ns = self._coil
            await node.call_method(f"{ns}:CoilStart", coil_id, grade, 1250.0, 0.7, 0.0)

        asyncio.run_coroutine_threadsafe(call(), self._loop).result(15)

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


async def try_connect(url: str, pki: Path | None, client: str, *, user: str | None, password: str | None) -> str | None:
    """None when the session was let in (and browsing worked), else the error."""
    c = opcua_client(url, pki, client, user=user, password=password)  # type: ignore[arg-type]
    try:
        if pki is not None:
            await secure(c, pki / "server_cert.der")
        async with c:
            await c.get_namespace_index(NAMESPACE)
        return None
    except Exception as err:  # noqa: BLE001 - a refusal comes as any of asyncua's errors
        return f"{type(err).__name__}: {err}"[:200]


def refusals(url: str, pki: Path, rogue: Path) -> dict[str, str | None]:
    """Each unauthorised client's error (None: it was let in, a failure of the check)."""
    return {
        "anonymous": asyncio.run(try_connect(url, pki, "plc", user=None, password=None)),
        "wrong_password": asyncio.run(try_connect(url, pki, "plc", user=USER, password="not the password")),
        "untrusted_certificate": asyncio.run(try_connect(url, rogue, "rogue", user=USER, password=PASSWORD)),
        "no_encryption": asyncio.run(try_connect(url, None, "plc", user=USER, password=PASSWORD)),
        "authorised": asyncio.run(try_connect(url, pki, "plc", user=USER, password=PASSWORD)),
    }
