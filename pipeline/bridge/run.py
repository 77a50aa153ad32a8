"""``stripinspect bridge``: the plant protocols beside the daemons, until SIGTERM or SIGINT.

Builds the bridge journal, the enabled protocol servers and the commands to the line, runs
the bridge's asyncio loop, tells systemd when it is ready and that it lives, serves Prometheus
metrics of its own on loopback, and stops in reverse order. A start-up problem (a port taken,
certificates missing, the journal unwritable) raises a StripinspectError of one line."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import zmq
from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.bridge.commands import ZmqCommands
from pipeline.bridge.core import Bridge
from pipeline.bridge.journal import BridgeJournal
from pipeline.bridge.model import PlantCommands, Sink
from pipeline.config import BridgeCameraConfig, Config
from pipeline.errors import StripinspectError
from pipeline.process import logging_to, notify, stop_on_signals

log = logging.getLogger("stripinspect.bridge")
LOG_PERIOD_S = 60.0


class BridgeStartError(StripinspectError):
    """A protocol server could not start; one line."""


def bridge_cameras(cfg: Config) -> dict[str, BridgeCameraConfig]:
    """``bridge.cameras``, or the one daemon of this config."""
    if cfg.bridge.cameras:
        return dict(cfg.bridge.cameras)
    d = cfg.daemon
    return {d.camera_id: BridgeCameraConfig(pub=d.pub_endpoint, control=d.control_endpoint)}


def build_sinks(cfg: Config, commands: PlantCommands) -> list[Sink]:
    """The enabled protocol servers (imported only when enabled: each pulls its library)."""
    b = cfg.bridge
    sinks: list[Sink] = []
    if b.opcua.enabled:
        from pipeline.bridge.opcua import OpcUaSink

        sinks.append(OpcUaSink(cfg=b.opcua, commands=commands))
    if b.modbus.enabled:
        from pipeline.bridge.modbus import ModbusSink

        sinks.append(ModbusSink(cfg=b.modbus, commands=commands, reject=b.reject, cameras=tuple(bridge_cameras(cfg))))
    if b.mqtt.enabled:
        from pipeline.bridge.mqtt import MqttSink

        sinks.append(MqttSink(cfg=b.mqtt, commands=commands))
    if not sinks:
        raise BridgeStartError("bridge: every protocol is disabled (bridge.opcua/modbus/mqtt.enabled)")
    return sinks


class BridgeCollector(Collector):
    """stripinspect_bridge_* from the bridge's counters at scrape time."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[Any]:
        c = self.bridge.counters()
        defects = CounterMetricFamily("stripinspect_bridge_defects", "Defects numbered for the plant.")
        defects.add_metric([], float(c["defects"]))
        yield defects
        for key, help_text in (
            ("delivered", "Defects a protocol delivered."),
            ("dropped", "Messages dropped at a protocol's full queue (defects are caught up from the journal)."),
            ("lost", "Defects a protocol never got (pruned from the journal before it caught up)."),
            ("errors", "Messages a protocol failed on."),
        ):
            m = CounterMetricFamily(f"stripinspect_bridge_{key}", help_text, labels=["protocol"])
            for name, counts in c["protocols"].items():
                m.add_metric([name], float(counts.get(key, 0)))
            yield m
        lost = CounterMetricFamily(
            "stripinspect_bridge_camera_lost", "Alerts a camera's journal no longer held.", labels=["camera"]
        )
        for name, counts in c["followers"].items():
            lost.add_metric([name], float(counts.get("lost", 0)))
        yield lost
        beat = GaugeMetricFamily("stripinspect_bridge_heartbeat", "The bridge's status counter.")
        beat.add_metric([], float(self.bridge.status().heartbeat))
        yield beat


def run_bridge(cfg: Config, *, quiet: bool = False, log_json: bool = False, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    b = cfg.bridge
    with logging_to(sys.stderr, quiet=quiet, log_json=log_json, tty=False), stop_on_signals(stop):
        logging.getLogger("asyncua").setLevel(logging.WARNING)
        logging.getLogger("pymodbus").setLevel(logging.WARNING)
        journal = BridgeJournal(path=b.state_path, keep=b.keep_defects, synchronous=b.synchronous)
        context = zmq.Context()
        try:
            cameras = bridge_cameras(cfg)
            commands = ZmqCommands(
                cameras=cameras, coil_service=b.coil_service, context=context, timeout_s=b.replay_timeout_s
            )
            bridge = Bridge(
                cameras=cameras,
                coil_service=b.coil_service,
                sinks=build_sinks(cfg, commands),
                journal=journal,
                reject=b.reject,
                queue_size=b.queue_size,
                replay_timeout_s=b.replay_timeout_s,
                context=context,
                heartbeat_s=cfg.daemon.heartbeat_s,
            )
            asyncio.run(_serve(bridge, stop, status_port=b.status_port))
        finally:
            context.term()
            journal.close()
    return 0


async def _serve(bridge: Bridge, stop: threading.Event, *, status_port: int | None) -> None:
    astop = asyncio.Event()
    task = asyncio.create_task(bridge.run(astop))
    ready = asyncio.create_task(bridge.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # a protocol that could not start: its error, one line, to the CLI
        return
    if status_port is not None:
        registry = CollectorRegistry()
        registry.register(BridgeCollector(bridge))
        try:
            start_http_server(status_port, addr="127.0.0.1", registry=registry)
        except OSError as err:
            astop.set()
            await task
            raise BridgeStartError(f"bridge.status_port {status_port}: {err}") from None
    notify("READY=1")
    log.info("bridge: %d camera(s), protocols %s", len(bridge.cameras), ", ".join(s.name for s in bridge.sinks))
    last_log = time.monotonic()
    try:
        while not stop.is_set() and not task.done():
            await asyncio.sleep(0.5)
            notify("WATCHDOG=1")
            if time.monotonic() - last_log >= LOG_PERIOD_S:
                last_log = time.monotonic()
                log.info("bridge: %s", bridge.counters())
    finally:
        astop.set()
        await task
    log.info("bridge stopped: %s", bridge.counters())
