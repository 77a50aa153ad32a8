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

With ``--kill-bridge-after N`` the bridge is SIGKILLed after N alerts and started again
``--down-s`` later (the alerts meanwhile are only in the daemon's journal): the MQTT subscriber,
connected to the broker throughout, must still get every alert once (``mqtt_duplicates``); the
OPC UA and Modbus sessions die with the bridge and are not counted in that mode.

JSON keys: alerts_published, opcua_received, modbus_received, mqtt_received, latency_ms
({opcua, modbus, mqtt}: {p50, p99, max}), opcua_security, unauthenticated_rejected, plus
refusals (each attempt and its error), coil_id, coil_on_alerts, modbus_write_refused,
modbus_missed, mqtt_duplicates, bridge_killed, missing_at_bridge, wall_s.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from coil_line import calibrate_threshold, fit_bundle_for, free_port, stop_all  # noqa: E402

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
        self.duplicates = 0
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
        if seq in self.received:
            self.duplicates += 1
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
        else (
            SecurityPolicyBasic256Sha256,
            pki / "clients" / f"{client}_cert.der",
            pki / "clients" / f"{client}_key.pem",
        )
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
                vs = c.get_node(ua.NodeId(ua.String("VisionSystem"), ns))
                self._coil = (c.get_node(ua.NodeId(ua.String("VisionSystem.CoilManagement"), ns)), ns)
                sub = await c.create_subscription(self.interval_ms, self)
                await sub.subscribe_events(vs, c.get_node(ua.NodeId(ua.String("ResultReadyEventType"), ns)))
                policy = c.security_policy
                self.security = f"{policy.URI.rsplit('#', 1)[-1]} {ua.MessageSecurityMode(policy.Mode).name}, user"
                self._ready.set()
                await self._stop.wait()
        except BaseException as err:
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


async def try_connect(
    url: str, pki: Path | None, client: str, *, server_cert: Path, user: str | None, password: str | None
) -> str | None:
    """None when the session was let in (and browsing worked), else the error. ``pki``: where the
    client's own certificate and key are (None: no security)."""
    c = opcua_client(url, pki, client, user=user, password=password)  # type: ignore[arg-type]
    try:
        if pki is not None:
            await secure(c, server_cert)
        async with c:
            await c.get_namespace_index(NAMESPACE)
        return None
    except Exception as err:
        return f"{type(err).__name__}: {err}"[:200]


def refusals(url: str, pki: Path, rogue: Path) -> dict[str, str | None]:
    """Each unauthorised client's error (None: it was let in, a failure of the check)."""
    server = pki / "server_cert.der"
    return {
        "anonymous": asyncio.run(try_connect(url, pki, "plc", server_cert=server, user=None, password=None)),
        "wrong_password": asyncio.run(
            try_connect(url, pki, "plc", server_cert=server, user=USER, password="not the password")
        ),
        "untrusted_certificate": asyncio.run(
            try_connect(url, rogue, "rogue", server_cert=server, user=USER, password=PASSWORD)
        ),
        "no_encryption": asyncio.run(try_connect(url, None, "plc", server_cert=server, user=USER, password=PASSWORD)),
        "authorised": asyncio.run(try_connect(url, pki, "plc", server_cert=server, user=USER, password=PASSWORD)),
    }


# --- Modbus --------------------------------------------------------------------------------


class ModbusPoller:
    """A PLC's polling loop on its own thread: the ring header every ``poll_ms``, then every new
    slot by sequence number (docs/plant_modbus.md), each checked for the seq asked for."""

    def __init__(self, *, port: int, unit: int, poll_ms: float) -> None:
        from pymodbus.client import ModbusTcpClient

        self.received: dict[int, float] = {}
        self.missed = 0
        self.polls = 0
        self._c = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
        if not self._c.connect():
            raise ConnectionError(f"Modbus: cannot connect to 127.0.0.1:{port}")
        self.unit, self.poll_s = unit, poll_ms / 1000.0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self, address: int, count: int) -> list[int]:
        r = self._c.read_input_registers(address, count=count, device_id=self.unit)
        if r.isError():
            raise RuntimeError(f"Modbus read {address}+{count}: {r}")
        return list(r.registers)

    def _run(self) -> None:
        from pipeline.bridge import registers as rm

        ring = self._read(rm.IR_RING_SIZE, 1)[0]
        last = rm.regs_u32(self._read(rm.IR_NEWEST_SEQ, 2))  # a PLC starts from what is there now
        while not self._halt.wait(self.poll_s):
            self.polls += 1
            newest = rm.regs_u32(self._read(rm.IR_NEWEST_SEQ, 2))
            seqs, missed = rm.ring_reads(last, newest, ring)
            self.missed += missed
            for s in seqs:
                slot = rm.decode_slot(self._read(rm.slot_address(s, ring), rm.SLOT_SIZE))
                if slot.seq == s:
                    self.received.setdefault(s, time.time())
                else:
                    self.missed += 1
            if seqs:
                last = newest

    def write_out_of_range(self) -> str | None:
        """A PLC writing a width of 0 mm: the exception it gets (None: accepted, a failure)."""
        from pipeline.bridge import registers as rm

        r = self._c.write_register(rm.HR_WIDTH_MM, 0, device_id=self.unit)
        return str(r) if r.isError() else None

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)
        self._c.close()


# --- the run -------------------------------------------------------------------------------


def daemon_alerts(journal: Path, since: float) -> list[tuple[int, float, dict[str, Any]]]:
    """(seq, publish_time, header) of the alerts the daemon journaled from ``since`` on."""
    if not journal.exists():
        return []
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT seq, header FROM alerts ORDER BY seq").fetchall()
    out = []
    for seq, raw in rows:
        h = json.loads(raw)
        if float(h["publish_time"]) >= since:
            out.append((int(seq), float(h["publish_time"]), h))
    return out


def bridge_numbers(state: Path) -> dict[int, int]:
    """The daemon's alert seq -> bridge_seq, from the bridge journal (one camera)."""
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT bridge_seq, body FROM defects").fetchall()
    return {int(json.loads(b)["seq"]): int(s) for s, b in rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.bridge.certs import create_opcua_keys
    from pipeline.config import Config
    from pipeline.transport.users import add_user
    from tests.pipeline.bridge.broker import start_broker

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for old in [*work.glob("*.sqlite*"), *work.glob("bridge/*.sqlite*")]:
        old.unlink()
    cam = coil_cameras(
        seed=args.seed,
        strip_width=args.width,
        cameras_per_side=1,
        overlap_px=0,
        mm_per_px=args.mm_per_px,
        mm_per_line=args.mm_per_line,
        rolls=Config().coil.rolls,
    )[0]
    bundle = fit_bundle_for(work, [cam], frame_lines=args.frame_lines, strip_width=args.width)
    threshold = calibrate_threshold(bundle, [cam], frame_lines=args.frame_lines, strip_width=args.width)
    pki, rogue = work / "pki", work / "rogue"
    if not (pki / "server_cert.der").exists():
        create_opcua_keys(pki, clients=["plc"])
    if not (rogue / "server_cert.der").exists():
        create_opcua_keys(rogue, clients=["rogue"])  # a client the bridge has never trusted
    users = work / "users.txt"
    add_user(users, USER, PASSWORD)
    ports = {k: free_port() for k in ("pub", "control", "opcua", "modbus", "mqtt")}
    url = f"opc.tcp://127.0.0.1:{ports['opcua']}/stripinspect/"
    base_topic = "stripinspect/bench"
    cfg = {
        "synthetic": {"width": cam.width, "seed": cam.seed},
        "runtime": {"onnx_threads": 1, "faiss_threads": 1},
        "daemon": {
            "bundle": str(bundle),
            "camera_id": "cam0",
            "side": cam.side,
            "strip_edge_px": 0.0,
            "frame_lines": args.frame_lines,
            "overlap_lines": args.overlap_lines,
            "mm_per_px": args.mm_per_px,
            "mm_per_line": args.mm_per_line,
            "threshold": threshold,
            "min_area_px": 8,
            "thumbnail_px": 0,
            "heartbeat_s": 0.5,
            "metrics_port": None,
            "pub_endpoint": f"tcp://127.0.0.1:{ports['pub']}",
            "control_endpoint": f"tcp://127.0.0.1:{ports['control']}",
            "journal": {"path": str(work / "journal_cam0.sqlite"), "synchronous": "NORMAL"},
            "source": {
                "kind": "synthetic",
                "block_lines": 128,
                "line_rate_hz": args.line_rate,
                "strip_width": args.width,
                "defects_per_100_frames": args.defects_per_100_frames,
            },
        },
        "bridge": {
            "state_path": str(work / "bridge" / "bridge.sqlite"),
            "status_port": None,
            "reject": {"min_area_mm2": 50.0, "distance_m": 6.0},
            "opcua": {
                "endpoint": url,
                "certs_dir": str(pki),
                "users_file": str(users),
                "publishing_interval_ms": args.opcua_interval_ms,
            },
            "modbus": {"port": ports["modbus"]},
            "mqtt": {"port": ports["mqtt"], "base_topic": base_topic},
        },
    }
    cfg_path = work / "plc.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    clients: list[Any] = []
    broker = start_broker(work / "broker", port=ports["mqtt"])
    t0 = time.monotonic()
    try:
        procs["daemon"] = start(["run", "--config", str(cfg_path), "--quiet"], logs / "daemon.log")
        wait_port(ports["control"], procs["daemon"], logs / "daemon.log")
        procs["bridge"] = start(["bridge", "--config", str(cfg_path), "--quiet"], logs / "bridge.log")
        wait_port(ports["opcua"], procs["bridge"], logs / "bridge.log")
        wait_port(ports["modbus"], procs["bridge"], logs / "bridge.log")
        mqtt = MqttClient(port=ports["mqtt"], topic=f"{base_topic}/alert")
        clients.append(mqtt)
        opc = OpcUaEvents(url=url, pki=pki, interval_ms=args.opcua_interval_ms)
        clients.append(opc)
        modbus = ModbusPoller(port=ports["modbus"], unit=1, poll_ms=args.modbus_poll_ms)
        clients.append(modbus)
        opc.coil_start(COIL, GRADE)  # the plant starts the coil through OPC UA
        time.sleep(1.0)  # the coil start reaches the daemon's next frame
        ready = time.time()
        journal = work / "journal_cam0.sqlite"
        deadline = time.monotonic() + args.timeout_s
        killed = False
        while len(daemon_alerts(journal, ready)) < args.alerts:
            kill_now = args.kill_bridge_after is not None and not killed
            if kill_now and len(daemon_alerts(journal, ready)) >= args.kill_bridge_after:
                # kill -9 mid-stream: the MQTT subscriber (on the broker) stays; the OPC UA and
                # Modbus sessions die with the bridge and are not counted in this mode.
                for c in (opc, modbus):
                    c.close()
                    clients.remove(c)
                procs["bridge"].send_signal(signal.SIGKILL)
                procs["bridge"].wait()
                time.sleep(args.down_s)  # alerts go on into the daemon's journal meanwhile
                procs["bridge"] = start(["bridge", "--config", str(cfg_path), "--quiet"], logs / "bridge.log")
                wait_port(ports["modbus"], procs["bridge"], logs / "bridge.log")
                killed = True
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {args.alerts} alerts within {args.timeout_s} s; see {logs}")
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {logs / (name + '.log')}")
            time.sleep(0.5)
        stop_at = time.time()
        procs["daemon"].send_signal(signal.SIGTERM)  # no alerts after this; the clients settle
        procs["daemon"].wait(30)
        time.sleep(args.settle_s)
        for c in clients:
            c.close()
        clients.clear()
        wall = time.monotonic() - t0
        refused = refusals(url, pki, rogue)
        modbus_refused = ModbusPoller(port=ports["modbus"], unit=1, poll_ms=1000)
        write_refused = modbus_refused.write_out_of_range()
        modbus_refused.close()
    finally:
        for c in clients:
            c.close()
        stop_all(procs.values())
        broker.stop()

    published = [a for a in daemon_alerts(work / "journal_cam0.sqlite", ready) if a[1] <= stop_at]
    numbers = bridge_numbers(work / "bridge" / "bridge.sqlite")
    want = {numbers.get(seq, -seq): t for seq, t, _ in published}  # -seq: never reached the bridge
    out: dict[str, Any] = {"alerts_published": len(published), "latency_ms": {}}
    for name, client in (("opcua", opc), ("modbus", modbus), ("mqtt", mqtt)):
        if killed and name != "mqtt":
            out[f"{name}_received"], out["latency_ms"][name] = None, percentiles([])
            continue
        got = [b for b in want if b in client.received]
        out[f"{name}_received"] = len(got)
        # After a kill, latency includes the bridge's down time for what it caught up.
        out["latency_ms"][name] = percentiles([client.received[b] - want[b] for b in got])
    bad = {k: v for k, v in refused.items() if k != "authorised"}
    out.update(
        {
            "opcua_security": opc.security,
            "unauthenticated_rejected": all(v is not None for v in bad.values()) and refused["authorised"] is None,
            "refusals": refused,
            "modbus_write_refused": write_refused,
            "modbus_missed": modbus.missed,
            "mqtt_duplicates": mqtt.duplicates,
            "bridge_killed": killed,
            "missing_at_bridge": sorted(-b for b in want if b < 0),
            "modbus_poll_ms": args.modbus_poll_ms,
            "opcua_interval_ms": args.opcua_interval_ms,
            "coil_id": COIL,
            "coil_on_alerts": sum(1 for _, _, h in published if h.get("coil_id") == COIL),
            "bridge_log_tail": (logs / "bridge.log").read_text(encoding="utf-8", errors="replace")[-2000:],
            "wall_s": wall,
        }
    )
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--work", type=Path, default=Path("/tmp/plc_latency"), help="bundle, journals, certificates, logs")
    ap.add_argument("--alerts", type=int, default=40, help="alerts to publish once every client is subscribed")
    ap.add_argument("--width", type=int, default=256, help="camera pixels across")
    ap.add_argument("--mm-per-px", type=float, default=2.0)
    ap.add_argument("--mm-per-line", type=float, default=2.0)
    ap.add_argument("--frame-lines", type=int, default=512)
    ap.add_argument("--overlap-lines", type=int, default=128)
    ap.add_argument("--line-rate", type=float, default=1000.0, help="lines per second (wall clock)")
    ap.add_argument("--defects-per-100-frames", type=float, default=150.0)
    ap.add_argument("--modbus-poll-ms", type=float, default=5.0, help="the PLC's polling period")
    ap.add_argument("--opcua-interval-ms", type=int, default=10, help="OPC UA publishing interval")
    ap.add_argument("--settle-s", type=float, default=2.0, help="wait after the last alert before counting")
    ap.add_argument(
        "--kill-bridge-after",
        type=int,
        default=None,
        help="SIGKILL the bridge after this many alerts and start it again --down-s later (MQTT counted only)",
    )
    ap.add_argument("--down-s", type=float, default=3.0, help="seconds the killed bridge stays down")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    return ap


def main() -> None:
    import logging

    logging.getLogger("asyncua").setLevel(logging.ERROR)  # its per-connection warnings are not results
    args = parser().parse_args()
    out = run(args)
    print(f"\n`python benchmarks/plc_latency.py {' '.join(sys.argv[1:])}`\n")
    print("| client | received | of | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|")
    for name in ("opcua", "modbus", "mqtt"):
        lat = out["latency_ms"][name]
        cells = [f"{lat[k]:.1f}" if lat[k] is not None else "-" for k in ("p50", "p99", "max")]
        print(f"| {name} | {out[name + '_received']} | {out['alerts_published']} | {' | '.join(cells)} |")
    if out["bridge_killed"]:
        print(f"\nbridge killed and restarted: MQTT duplicates {out['mqtt_duplicates']}")
    print(f"\nOPC UA security: {out['opcua_security']}; unauthenticated rejected: {out['unauthenticated_rejected']}")
    for k, v in out["refusals"].items():
        print(f"- {k}: {v or 'let in'}")
    print(f"Modbus out-of-range write: {out['modbus_write_refused'] or 'ACCEPTED'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
