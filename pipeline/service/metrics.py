"""Prometheus metrics of the daemon (prefix stripinspect_, base units, _total counters).

A custom collector reads the daemon's own counters at scrape time, so the stage threads keep a
single set of numbers and nothing is counted twice; stage latency is a prometheus_client
Histogram (buckets 1 ms to 10 s) that the stats observe into, so a scraper computes any
quantile over any window (the heartbeat keeps its own p50/p95/p99 of recent frames).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.service.daemon import Daemon

COUNTERS = (
    ("frames_total", "Frames assembled from the camera."),
    ("frames_scored_total", "Frames scored."),
    ("alerts_total", "Defect alerts published."),
    ("lines_total", "Camera lines received."),
    ("camera_offline_total", "Times the camera stopped delivering lines."),
    ("camera_reopens_total", "Successful camera reopens."),
)


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        snap = self.daemon.stats.snapshot()
        counts = snap["counts"]
        for name, help_text in COUNTERS:
            # CounterMetricFamily appends _total itself.
            c = CounterMetricFamily(f"stripinspect_{name.removesuffix('_total')}", help_text)
            c.add_metric([], float(counts.get(name, 0)))
            yield c
        drops = CounterMetricFamily(
            "stripinspect_dropped_frames", "Frames dropped, by stage and reason.", labels=["stage", "reason"]
        )
        for key, n in snap["drops"].items():
            stage, reason = key.split(":", 1)
            drops.add_metric([stage, reason], float(n))
        yield drops
        up = GaugeMetricFamily("stripinspect_running", "1 while the daemon is acquiring.")
        up.add_metric([], 1.0 if self.daemon.state == "running" else 0.0)
        yield up
        online = GaugeMetricFamily("stripinspect_camera_online", "1 while the camera delivers lines.")
        online.add_metric([], 1.0 if self.daemon.camera_online else 0.0)
        yield online


def metrics_registry(daemon: Daemon) -> CollectorRegistry:
    """A registry of its own per daemon: two daemons in one process never share a series."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    registry.register(daemon.stats.histogram)
    return registry


def serve_metrics(daemon: Daemon, *, port: int, addr: str) -> tuple[Any, Any]:
    """Start the /metrics HTTP endpoint; returns (server, thread), server.shutdown() stops it.
    OSError when the port is taken."""
    return start_http_server(port, addr=addr, registry=metrics_registry(daemon))
