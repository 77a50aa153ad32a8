"""The MQTT publisher against a real broker (amqtt in a subprocess, 127.0.0.1, random ports) and
real paho subscribers: order and payloads, acknowledged delivery (an alert the broker cannot take
is refused with NotDeliveredError, never queued in the client), retained status and coil, the last
will, outages, a frozen broker, a stalled subscriber, broker authentication, and the real bridge
catching MQTT up from its journal after a broker outage."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from pipeline.bridge.journal import BridgeJournal
from pipeline.bridge.model import NotDeliveredError, PlantCoil
from pipeline.bridge.mqtt import MqttError, MqttSink, Topics, check_base_topic, encode, read_password
from pipeline.config import MqttConfig
from tests.conftest import REPO
from tests.pipeline.bridge.broker import (
    BrokerProcess,
    Subscriber,
    TcpGate,
    running_broker,
    stalled_subscriber,
    start_broker,
)
from tests.pipeline.bridge.conftest import RecordingCommands, free_port, make_defect, make_status
from tests.pipeline.bridge.line import FakeLine
from tests.pipeline.bridge.test_bridge import make_bridge, running, subscribed, wait_for

BASE = "stripinspect/line1"
T = Topics(BASE)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with running_broker(tmp_path / "broker") as b:
        yield b


def make_sink(port: int, *, client_id: str = "bridge-test", **kw: Any) -> MqttSink:
    cfg_kw = {k: kw.pop(k) for k in ("qos", "username", "password_file", "keepalive_s") if k in kw}
    cfg = MqttConfig(port=port, base_topic=BASE, client_id=client_id, **cfg_kw)
    return MqttSink(cfg=cfg, commands=RecordingCommands(), **kw)


async def until(cond: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout_s} s")
        await asyncio.sleep(0.005)


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro_fn())


async def started(sink: MqttSink) -> MqttSink:
    await sink.start()
    await until(lambda: sink.counters()["connected"] == 1, what="sink connected")
    return sink


def subscribe(port: int, *topics: str, client_id: str) -> Subscriber:
    return Subscriber(port=port, topics=topics or (f"{BASE}/#",), client_id=client_id)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- pure parts -------------------------------------------------------------------------------


def test_payloads_are_compact_json_with_sorted_keys() -> None:
    d = make_defect(3, md_m=15.5)
    raw = encode(d.to_json())
    assert raw.decode().startswith('{"area_mm2":71.0,"bridge_seq":3,')
    assert json.loads(raw) == d.to_json()
    assert (T.alert, T.coil, T.coil_last, T.status) == (
        f"{BASE}/alert",
        f"{BASE}/coil",
        f"{BASE}/coil/last",
        f"{BASE}/status",
    )


@pytest.mark.parametrize("bad", ["a/+/b", "a/#", "/a", "a/", "a//b", "$SYS/x"])
def test_base_topic_must_be_publishable(bad: str) -> None:
    with pytest.raises(MqttError, match="base_topic"):
        check_base_topic(bad)
    with pytest.raises(MqttError):
        MqttSink(cfg=MqttConfig(base_topic=bad), commands=RecordingCommands())


def test_password_file_is_read_stripped_and_checked(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("  s3cret\n")
    assert read_password(MqttConfig(username="bridge", password_file=pw)) == "s3cret"
    assert read_password(MqttConfig()) is None
    with pytest.raises(MqttError, match="username"):
        read_password(MqttConfig(password_file=pw))
    with pytest.raises(MqttError, match="cannot read"):
        read_password(MqttConfig(username="bridge", password_file=tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(MqttError, match="empty"):
        read_password(MqttConfig(username="bridge", password_file=tmp_path / "empty"))


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        make_sink(1883, queue_size=0)
    with pytest.raises(ValueError, match="drain_timeout_s"):
        make_sink(1883, drain_timeout_s=-1)
    with pytest.raises(ValueError, match="ack_timeout_s"):
        make_sink(1883, ack_timeout_s=0)


# --- against a broker ------------------------------------------------------------------------


def test_thirty_defects_arrive_in_order_with_their_payloads(broker: BrokerProcess) -> None:
    sub = subscribe(broker.port, T.alert, client_id="plant-a")

    async def body() -> None:
        sink = await started(make_sink(broker.port))
        try:
            sent = [make_defect(i, camera_id=f"cam{i % 2}") for i in range(1, 31)]
            for d in sent:
                await sink.defect(d)
                # defect() returned: the broker has acknowledged it, nothing waits in the client.
                assert sink.counters()["unacked"] == 0
            got = sub.take(30, timeout_s=5)
            assert [m.payload for m in got] == [d.to_json() for d in sent]
            assert {m.payload["camera_id"] for m in got} == {"cam0", "cam1"}
            assert all(m.topic == T.alert and not m.retain and m.qos == 1 for m in got)
            c = sink.counters()
            assert (c["published"], c["acked"], c["dropped"], c["not_delivered"], c["connects"]) == (30, 30, 0, 0, 1)
        finally:
            await sink.stop()
            sub.close()

    run(body)


def test_publish_to_subscriber_latency(broker: BrokerProcess) -> None:
    """publish -> a paho subscriber's on_message, one alert every 5 ms, and how long defect() takes
    (the broker's acknowledgement); the benchmark's figure is p99 <= 50 ms, here only a sanity
    bound, the numbers are printed."""
    sub = subscribe(broker.port, T.alert, client_id="plant-lat")

    async def body() -> None:
        sink = await started(make_sink(broker.port))
        try:
            lat, ack = [], []
            for i in range(1, 201):
                t0 = time.perf_counter()
                await sink.defect(make_defect(i))
                ack.append(time.perf_counter() - t0)
                lat.append(sub.take(1, timeout_s=5)[0].at - t0)
                await asyncio.sleep(0.005)
            p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
            print(
                f"\nmqtt publish->on_message, 200 alerts: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
                f"max {max(lat) * 1e3:.2f} ms; defect() (until PUBACK): p50 {percentile(ack, 0.5) * 1e3:.2f} ms, "
                f"p99 {percentile(ack, 0.99) * 1e3:.2f} ms"
            )
            assert p99 < 1.0 and percentile(ack, 0.99) < 1.0
        finally:
            await sink.stop()
            sub.close()

    run(body)


def test_status_is_retained_for_a_late_subscriber(broker: BrokerProcess) -> None:
    async def body() -> None:
        sink = await started(make_sink(broker.port))
        try:
            await sink.status(make_status(heartbeat=1))
            s2 = make_status(heartbeat=2, state="drift")
            await sink.status(s2)
            await until(lambda: sink.counters()["unacked"] == 0)
            late = subscribe(broker.port, T.status, client_id="historian")
            try:
                m = late.take(1)[0]
                assert m.retain and m.topic == T.status
                assert m.payload == json.loads(json.dumps({**s2.to_json(), "online": True}))
                assert (m.payload["heartbeat"], m.payload["state"], m.payload["online"]) == (2, "drift", True)
            finally:
                late.close()
        finally:
            await sink.stop()

    run(body)


def test_clean_stop_leaves_the_offline_status_retained(broker: BrokerProcess) -> None:
    sub = subscribe(broker.port, T.status, client_id="plant-stop")

    async def body() -> None:
        sink = await started(make_sink(broker.port))
        await sink.status(make_status())
        assert sub.take(1)[0].payload["online"] is True
        for i in range(1, 6):
            await sink.defect(make_defect(i))
        await sink.stop()
        # stop() drained the PUBACKs before saying goodbye.
        assert sink.counters()["unacked"] == 0 and sink.counters()["connected"] == 0
        off = sub.take(1)[0].payload
        assert (off["online"], off["state"], off["reason"]) == (False, "offline", "stopped")
        assert abs(off["time"] - time.time()) < 10

    run(body)
    sub.close()
    late = subscribe(broker.port, T.status, client_id="plant-stop-late")
    try:
        m = late.take(1)[0]
        assert m.retain and m.payload["reason"] == "stopped"
    finally:
        late.close()


_KILLED_SINK = """
import asyncio, sys, time
from pipeline.bridge.mqtt import MqttSink
from pipeline.config import MqttConfig
from tests.pipeline.bridge.conftest import RecordingCommands, make_status

async def main() -> None:
    cfg = MqttConfig(port=int(sys.argv[1]), base_topic=sys.argv[2], client_id="bridge-killed")
    sink = MqttSink(cfg=cfg, commands=RecordingCommands())
    await sink.start()
    while not sink.counters()["connected"]:
        await asyncio.sleep(0.01)
    await sink.status(make_status(heartbeat=5))
    while sink.counters()["unacked"]:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_last_will_says_offline_when_the_bridge_is_killed(broker: BrokerProcess) -> None:
    sub = subscribe(broker.port, T.status, client_id="plant-will")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SINK, str(broker.port), BASE],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "the sink process did not get ready"
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read() if proc.stderr else ""
        online = sub.take(1)[0].payload
        assert (online["online"], online["heartbeat"]) == (True, 5)
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must send the will
        proc.wait(timeout=5)
        will = sub.take(1, timeout_s=5)[0]
        assert will.payload == {"online": False, "state": "offline", "reason": "connection_lost", "time": None}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        sub.close()
    late = subscribe(broker.port, T.status, client_id="plant-will-late")
    try:
        m = late.take(1)[0]
        assert m.retain and m.payload["reason"] == "connection_lost"
    finally:
        late.close()


def test_network_cut_refuses_alerts_and_reconnecting_restores_online_and_delivery(broker: BrokerProcess) -> None:
    gate = TcpGate(target=broker.port)
    gate.open()
    sub = subscribe(broker.port, client_id="plant-cut")

    async def body() -> None:
        sink = await started(make_sink(gate.port))
        try:
            await sink.status(make_status(heartbeat=1))
            assert sub.take(1)[0].payload["online"] is True
            await sink.defect(make_defect(1))
            assert sub.take(1)[0].payload["bridge_seq"] == 1

            gate.close()
            will = sub.wait_for(T.status, lambda p: not p["online"])
            assert will.payload["reason"] == "connection_lost"
            await until(lambda: sink.counters()["connected"] == 0, what="sink sees the cut")
            t0 = time.monotonic()
            with pytest.raises(NotDeliveredError, match="not connected"):
                await sink.defect(make_defect(2))  # the bridge keeps it in its journal, not paho
            assert time.monotonic() - t0 < 0.1
            await sink.status(make_status(heartbeat=2))  # remembered, published on reconnect
            c = sink.counters()
            assert (c["published"], c["unacked"], c["not_delivered"]) == (2, 0, 1)  # status 1, alert 1

            gate.open()
            await until(lambda: sink.counters()["connected"] == 1, timeout_s=10, what="reconnected")
            for i in range(2, 7):  # the bridge offers 2 again, then the next ones
                await sink.defect(make_defect(i))
            got = sub.take(6, timeout_s=10)
            status = [m.payload for m in got if m.topic == T.status]
            alerts = [m.payload["bridge_seq"] for m in got if m.topic == T.alert]
            assert alerts == [2, 3, 4, 5, 6]  # 2 once: the refused offer never reached the client
            assert [(s["online"], s["heartbeat"]) for s in status] == [(True, 2)]
            with pytest.raises(TimeoutError):
                sub.take(1, timeout_s=0.3, topic=T.alert)
            c = sink.counters()
            assert (c["connects"], c["disconnects"], c["dropped"], c["connected"], c["unacked"]) == (2, 1, 0, 1, 0)
        finally:
            await sink.stop()
            sub.close()
            gate.close()

    run(body)


def test_broker_down_at_start_refuses_alerts_at_once_then_delivers(tmp_path: Path) -> None:
    port = free_port()

    async def body() -> None:
        sink = make_sink(port)
        t0 = time.monotonic()
        await sink.start()
        assert time.monotonic() - t0 < 0.5  # start() does not wait for the broker
        b: BrokerProcess | None = None
        try:
            await asyncio.sleep(0.3)
            c = sink.counters()
            assert c["connected"] == 0 and c["connect_failures"] >= 1
            await sink.status(make_status(heartbeat=9))
            closed = PlantCoil(kind="closed", coil_id="24-1", data={"disposition": "prime", "length_m": 812.5})
            await sink.coil(closed)
            t0 = time.monotonic()
            for i in range(1, 4):
                with pytest.raises(NotDeliveredError, match="not connected"):
                    await sink.defect(make_defect(i))
            assert time.monotonic() - t0 < 1.0
            c = sink.counters()
            # coil + coil/last wait in paho for the broker; no alert was handed to it; the status waits.
            assert (c["published"], c["unacked"], c["not_delivered"]) == (2, 2, 3)

            b = start_broker(tmp_path / "late-broker", port=port)
            await until(lambda: sink.counters()["connected"] == 1, timeout_s=10, what="connected to the late broker")
            await until(lambda: sink.counters()["unacked"] == 0, what="the coil messages acknowledged")
            alerts = subscribe(port, T.alert, client_id="plant-late")
            late = subscribe(port, T.status, T.coil_last, client_id="historian-late")
            try:
                for i in range(1, 4):  # offered again from the bridge journal: taken now
                    await sink.defect(make_defect(i))
                assert [m.payload["bridge_seq"] for m in alerts.take(3)] == [1, 2, 3]
                with pytest.raises(TimeoutError):
                    alerts.take(1, timeout_s=0.3)
                got = {m.topic: m for m in late.take(2)}
                assert got[T.status].payload["heartbeat"] == 9 and got[T.status].retain
                assert got[T.coil_last].payload == closed.to_json() and got[T.coil_last].retain
            finally:
                alerts.close()
                late.close()
            c = sink.counters()
            assert (c["published"], c["acked"], c["dropped"], c["not_delivered"]) == (6, 6, 0, 3)
        finally:
            await sink.stop()
            if b is not None:
                b.stop()

    run(body)


def test_coil_messages_queue_while_disconnected_up_to_queue_size(broker: BrokerProcess) -> None:
    gate = TcpGate(target=broker.port)  # not open: nothing listens, as with the broker down
    sub = subscribe(broker.port, T.coil, client_id="plant-overflow")

    async def body() -> None:
        sink = make_sink(gate.port, queue_size=5)
        await sink.start()
        try:
            for i in range(1, 9):
                await sink.coil(PlantCoil(kind="start", coil_id=f"24-{i}", data={"camera_id": "cam0"}))
            c = sink.counters()
            assert (c["published"], c["unacked"], c["dropped"], c["connected"]) == (5, 5, 3, 0)
            gate.open()
            got = sub.take(5, timeout_s=10)
            assert [m.payload["coil_id"] for m in got] == [f"24-{i}" for i in range(1, 6)]
            await until(lambda: sink.counters()["unacked"] == 0)
            with pytest.raises(TimeoutError):
                sub.take(1, timeout_s=0.3)  # the dropped three never come
            assert sink.counters()["dropped"] == 3
        finally:
            await sink.stop()
            sub.close()
            gate.close()

    run(body)


def test_qos0_is_refused_while_disconnected() -> None:
    async def body() -> None:
        sink = make_sink(free_port(), qos=0)
        await sink.start()
        try:
            with pytest.raises(NotDeliveredError):
                await sink.defect(make_defect(1))
            c = sink.counters()
            assert (c["published"], c["not_delivered"], c["dropped"], c["unacked"]) == (0, 1, 0, 0)
        finally:
            await sink.stop()

    run(body)


@pytest.mark.parametrize("qos", [0, 2])
def test_qos0_and_qos2_alerts_arrive_in_order(broker: BrokerProcess, qos: int) -> None:
    sub = subscribe(broker.port, T.alert, client_id=f"plant-qos{qos}")

    async def body() -> None:
        sink = await started(make_sink(broker.port, qos=qos))
        try:
            for i in range(1, 11):
                await sink.defect(make_defect(i))
                assert sink.counters()["unacked"] == 0  # QoS 2: returned after PUBCOMP
            got = sub.take(10)
            assert [m.payload["bridge_seq"] for m in got] == list(range(1, 11))
            c = sink.counters()
            # QoS 0 has nothing to acknowledge: defect() returned once paho took it.
            assert (c["published"], c["acked"], c["not_delivered"]) == (10, 10 if qos else 0, 0)
        finally:
            await sink.stop()
            sub.close()

    run(body)


def test_frozen_broker_refuses_after_the_ack_timeout_and_keeps_one_copy(tmp_path: Path) -> None:
    b = start_broker(tmp_path / "frozen")
    sub = subscribe(b.port, T.alert, client_id="plant-frozen")

    async def body() -> None:
        sink = await started(make_sink(b.port, ack_timeout_s=0.3))
        try:
            await sink.defect(make_defect(1))
            b.proc.send_signal(signal.SIGSTOP)  # the kernel still takes the bytes; nothing answers
            try:
                t0 = time.monotonic()
                with pytest.raises(NotDeliveredError, match="no acknowledgement"):
                    await sink.defect(make_defect(2))
                assert 0.29 <= time.monotonic() - t0 < 1.5
                c = sink.counters()
                assert (c["published"], c["unacked"], c["ack_timeouts"], c["not_delivered"]) == (2, 1, 1, 1)
                # The bridge offers 2 again: the copy paho holds is waited for, no second one sent.
                with pytest.raises(NotDeliveredError):
                    await sink.defect(make_defect(2))
                c = sink.counters()
                assert (c["published"], c["unacked"], c["ack_timeouts"], c["not_delivered"]) == (2, 1, 2, 2)
            finally:
                b.proc.send_signal(signal.SIGCONT)
            await sink.defect(make_defect(2))  # offered again once more: the broker has it now
            await sink.defect(make_defect(3))
            got = sub.take(3, timeout_s=5)
            assert [m.payload["bridge_seq"] for m in got] == [1, 2, 3]
            with pytest.raises(TimeoutError):
                sub.take(1, timeout_s=0.3)  # 2 arrived once
            c = sink.counters()
            assert (c["published"], c["acked"], c["unacked"]) == (3, 3, 0)
        finally:
            await sink.stop()

    try:
        run(body)
    finally:
        b.proc.send_signal(signal.SIGCONT)
        sub.close()
        b.stop()


def _kernel_send_buffer_max() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024  # Linux's default maximum


def test_stalled_subscriber_does_not_hold_up_a_fast_one(broker: BrokerProcess) -> None:
    stalled = stalled_subscriber(port=broker.port, topic=T.alert, client_id="plant-stalled")
    fast = subscribe(broker.port, T.alert, client_id="plant-fast")
    # More than the stalled client's window plus the most the kernel buffers for the broker: the
    # broker itself has to hold (or drop) what the stalled client does not read.
    size = len(encode(make_defect(1).to_json()))
    n = ((_kernel_send_buffer_max() + 1_000_000) // size // 100 + 1) * 100

    async def body() -> None:
        sink = await started(make_sink(broker.port))
        try:
            lat = []
            t_start = time.perf_counter()
            for i in range(1, n + 1):
                t0 = time.perf_counter()
                await sink.defect(make_defect(i))
                if i % 100 == 0:  # every 100th timed, the rest a burst
                    m = fast.take(100, timeout_s=10)[-1]
                    assert m.payload["bridge_seq"] == i
                    lat.append(m.at - t0)
            elapsed = time.perf_counter() - t_start
            print(
                f"\nfast subscriber beside a stalled one, {n} alerts ({n * size / 1e6:.1f} MB) in {elapsed:.2f} s: "
                f"p50 {percentile(lat, 0.5) * 1e3:.2f} ms, max {max(lat) * 1e3:.2f} ms"
            )
            assert max(lat) < 1.0
            await until(lambda: sink.counters()["unacked"] == 0, what="the broker acknowledged everything")
        finally:
            await sink.stop()
            fast.close()
            stalled.close()

    run(body)


def test_closed_coil_is_retained_at_coil_last(broker: BrokerProcess) -> None:
    sub = subscribe(broker.port, T.coil, T.coil_last, client_id="plant-coil")

    async def body() -> None:
        sink = await started(make_sink(broker.port))
        try:
            start = PlantCoil(kind="start", coil_id="24-7", data={"camera_id": "cam0", "time": 1.5})
            closed = PlantCoil(
                kind="closed", coil_id="24-7", data={"disposition": "downgrade", "defects": 12, "length_m": 640.25}
            )
            await sink.coil(start)
            await sink.coil(closed)
            got = sub.take(3)
            assert [(m.topic, m.payload["kind"]) for m in got] == [
                (T.coil, "start"),
                (T.coil, "closed"),
                (T.coil_last, "closed"),
            ]
            assert got[2].payload == closed.to_json()
            await until(lambda: sink.counters()["unacked"] == 0)
        finally:
            await sink.stop()
            sub.close()

    run(body)
    late = subscribe(broker.port, T.coil_last, T.coil, client_id="historian-coil")
    try:
        m = late.take(1)[0]
        assert (m.topic, m.retain, m.payload["coil_id"], m.payload["disposition"]) == (
            T.coil_last,
            True,
            "24-7",
            "downgrade",
        )
        # start/closed on <base>/coil are not retained. (amqtt 0.12 may send coil/last a second
        # time, see tests/pipeline/bridge/broker.py, so only the other topic is checked.)
        with pytest.raises(TimeoutError):
            late.take(1, timeout_s=0.3, topic=T.coil)
    finally:
        late.close()


def test_broker_login_with_the_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("correct horse\n")
    (tmp_path / "bad").write_text("wrong\n")
    with running_broker(tmp_path / "auth", users={"bridge": "correct horse", "plant": "p"}) as b:
        sub = Subscriber(port=b.port, topics=(T.alert,), client_id="plant-auth", username="plant", password="p")

        async def body() -> None:
            good = await started(make_sink(b.port, username="bridge", password_file=tmp_path / "pw"))
            bad = make_sink(b.port, client_id="intruder", username="bridge", password_file=tmp_path / "bad")
            await bad.start()
            try:
                await good.defect(make_defect(1))
                assert sub.take(1)[0].payload["bridge_seq"] == 1
                await until(lambda: bad.counters()["connect_failures"] >= 1, what="refusal of a bad password")
                assert bad.counters()["connected"] == 0
            finally:
                await good.stop()
                await bad.stop()
                sub.close()

        run(body)


# --- with the real bridge ---------------------------------------------------------------------


def test_bridge_catches_mqtt_up_from_its_journal_after_a_broker_outage(tmp_path: Path) -> None:
    """The bridge core (real ZeroMQ intake from a FakeLine, real journal) with this sink: alerts
    published while the broker is stopped reach a plant subscriber once each, in order, from the
    bridge journal once a broker is back. The sink reaches the broker through a TcpGate, opened
    only after the plant's subscriber has subscribed to the new broker, so the test does not race
    the sink's reconnect against the subscription (a new broker has no subscriptions)."""
    ctx = zmq.Context()
    line = FakeLine(tmp=tmp_path / "line", context=ctx)
    journal = BridgeJournal(path=tmp_path / "bridge.sqlite", keep=1000)
    first = start_broker(tmp_path / "broker1")
    second: BrokerProcess | None = None
    gate = TcpGate(target=first.port)
    gate.open()
    before = subscribe(first.port, T.alert, client_id="plant-before")
    after: Subscriber | None = None
    cfg = MqttConfig(port=gate.port, base_topic=BASE, client_id="bridge-outage")
    sink = MqttSink(cfg=cfg, commands=RecordingCommands(), ack_timeout_s=1.0)
    try:
        with running(make_bridge(line, journal, [sink], ctx)) as bridge:
            wait_for(lambda: sink.counters()["connected"] == 1, what="the sink connected")
            subscribed(line, bridge)
            for _ in range(3):
                line.alert()
            assert [m.payload["bridge_seq"] for m in before.take(3)] == [1, 2, 3]
            before.close()

            gate.close()  # the connection reset, as when the broker goes away
            wait_for(lambda: sink.counters()["connected"] == 0, what="the sink sees the outage")
            first.stop()
            sent = [line.alert() for _ in range(10)]
            wait_for(lambda: bridge.counters()["protocols"]["mqtt"]["retries"] >= 2, what="refused offers")
            assert journal.sink_cursor("mqtt") == 3

            second = start_broker(tmp_path / "broker2", port=first.port)
            after = subscribe(second.port, T.alert, client_id="plant-after")
            gate.open()
            got = after.take(10, timeout_s=10)
            assert [m.payload["bridge_seq"] for m in got] == list(range(4, 14))
            assert [m.payload["seq"] for m in got] == [h["seq"] for h in sent]
            line.alert()  # and live again
            assert after.take(1)[0].payload["bridge_seq"] == 14
            with pytest.raises(TimeoutError):
                after.take(1, timeout_s=0.5)  # nothing twice
            wait_for(lambda: journal.sink_cursor("mqtt") == 14, what="the cursor at the end")
            counts = bridge.counters()["protocols"]["mqtt"]
        assert counts["retries"] == counts["not_delivered"] >= 2
        assert (counts["delivered"], counts["errors"], counts["lost"], counts["unacked"]) == (14, 0, 0, 0)
    finally:
        if after is not None:
            after.close()
        gate.close()
        if second is not None:
            second.stop()
        first.stop()
        line.close()
        journal.close()
        ctx.term()
