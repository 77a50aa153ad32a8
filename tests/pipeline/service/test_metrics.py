"""The Prometheus endpoint's names and histograms, scraped from a daemon that ran a short strip."""

from pathlib import Path

import zmq
from prometheus_client import generate_latest

from pipeline.acquisition.sources import SyntheticSource
from pipeline.config import RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.service.daemon import Daemon
from pipeline.service.metrics import metrics_registry
from pipeline.service.stats import LATENCY_BUCKETS_S
from tests.conftest import loopback_daemon_config

WIDTH, FRAME, OVERLAP = 256, 768, 384


def test_metrics_have_one_prefix_base_units_and_latency_histograms(strip_bundle: Path) -> None:
    src = SourceConfig(block_lines=128, strip_lines=OVERLAP + 4 * (FRAME - OVERLAP), first_line=0)
    cfg = loopback_daemon_config(bundle=strip_bundle, frame_lines=FRAME, overlap_lines=OVERLAP, queue_frames=64)
    ctx = zmq.Context()
    daemon = Daemon(
        cfg=cfg,
        runtime=RuntimeConfig(),
        scoring=ScoringConfig(),
        source=SyntheticSource(cfg=src, width=WIDTH, seed=3, frame_lines=FRAME),
        context=ctx,
    )
    daemon.run_until_done()
    ctx.term()
    text = generate_latest(metrics_registry(daemon)).decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(s.startswith("stripinspect_") for s in samples), samples
    assert "stripinspect_frames_total 4.0" in samples and "stripinspect_frames_scored_total 4.0" in samples
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    assert all(name.endswith("_total") for name, kind in types.items() if kind == "counter")
    assert types["stripinspect_stage_latency_seconds"] == "histogram" and "quantile" not in text
    # Buckets from 1 ms to 10 s for every stage; one observation per frame.
    assert (LATENCY_BUCKETS_S[0], LATENCY_BUCKETS_S[-1]) == (0.001, 10.0)
    for stage in ("embed", "knn", "end_to_end"):
        assert f'stripinspect_stage_latency_seconds_bucket{{le="0.001",stage="{stage}"}}' in text
        assert f'stripinspect_stage_latency_seconds_bucket{{le="10.0",stage="{stage}"}}' in text
        assert f'stripinspect_stage_latency_seconds_count{{stage="{stage}"}} 4.0' in samples
    # The heartbeat keeps its percentiles.
    assert set(daemon.stats.snapshot()["latency_seconds"]["embed"]) == {"p50", "p95", "p99"}
