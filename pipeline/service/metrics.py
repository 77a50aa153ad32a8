"""Prometheus metrics of the daemon (prefix stripinspect_, base units, _total counters).

A custom collector reads the daemon's own counters at scrape time, so the stage threads keep
a single set of numbers and nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.service.daemon import Daemon


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        snap = self.daemon.stats.snapshot()
        counts = snap["counts"]
        for name, help_text in (
            ("frames_total", "Frames assembled from the camera."),
            ("frames_scored_total", "Frames scored."),
            ("alerts_total", "Defect alerts published."),
            ("lines_total", "Camera lines received."),
        ):
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
        lat = GaugeMetricFamily(
            "stripinspect_stage_latency_seconds", "Recent stage latency quantiles.", labels=["stage", "quantile"]
        )
        for stage, q in snap["latency_seconds"].items():
            for name, value in q.items():
                lat.add_metric([stage, {"p50": "0.5", "p95": "0.95", "p99": "0.99"}[name]], value)
        yield lat
        up = GaugeMetricFamily("stripinspect_running", "1 while the daemon is acquiring.")
        up.add_metric([], 1.0 if self.daemon.state == "running" else 0.0)
        yield up


def serve_metrics(daemon: Daemon, *, port: int, addr: str) -> tuple[Any, Any]:
    """Start the /metrics HTTP endpoint; returns (server, thread), server.shutdown() stops it."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    return start_http_server(port, addr=addr, registry=registry)
