"""Counters, drops by stage and reason, and stage latency: windows for the heartbeat's
percentiles and a Prometheus histogram for scrapes (written by the stage threads)."""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import numpy as np
from prometheus_client import Histogram

STAGES = ("acquire", "preprocess", "embed", "knn", "map", "defects", "publish", "end_to_end")
# 1 ms to 10 s: from one kNN band on a small frame to a frame stuck behind a slow consumer.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Stats:
    """Thread-safe; ``snapshot()`` is what heartbeats, status replies and metrics report."""

    def __init__(self, *, window: int = 2048) -> None:
        if window < 1:
            raise ValueError(f"latency window must be >= 1, got {window}")
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.drops: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STAGES}
        # Not registered anywhere: each metrics endpoint registers it in its own registry, so
        # two daemons in one process (tests, benchmarks) never share a series.
        self.histogram = Histogram(
            "stripinspect_stage_latency_seconds",
            "Stage latency per frame.",
            labelnames=["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=None,
        )

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def drop(self, stage: str, reason: str) -> None:
        with self.lock:
            self.drops[(stage, reason)] += 1

    def time(self, seconds: dict[str, float]) -> None:
        with self.lock:
            for k, v in seconds.items():
                self.latency[k].append(v)
        for k, v in seconds.items():
            self.histogram.labels(stage=k).observe(v)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            windows = {k: list(v) for k, v in self.latency.items() if v}
            counts = dict(self.counts)
            drops = {f"{s}:{r}": n for (s, r), n in self.drops.items()}
        lat = {k: {f"p{q}": float(np.percentile(v, q)) for q in (50, 95, 99)} for k, v in windows.items()}
        return {"counts": counts, "drops": drops, "latency_seconds": lat}
