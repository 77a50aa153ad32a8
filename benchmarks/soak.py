"""Soak: the daemon for --minutes on synthetic strip at the highest sustainable rate (issue 6).

    python benchmarks/soak.py [--minutes 10] [--width 2048]

First measures the sustained rate (an unpaced run, as benchmarks/speed.py), then paces a
camera at --pace of it for --minutes: 2048 px x 1024 new lines per frame of pre-rendered strip
with planted defects (looped, line numbers running on), alerts journaled, a subscriber on
alerts and frames that checks sequence numbers. Prints RSS over time, its growth after the
warm-up (bar: at most 5 %), sequence gaps end to end (bar: none) and the counts of frames,
alerts and drops.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from speed import CONTEXT, ReplaySource, daemon_run, ensure_bundle

from calibration.thresholds import threshold_above_normal
from pipeline.acquisition.synthetic import SyntheticStrip, random_defects
from pipeline.config import Config, DaemonConfig, JournalConfig, SourceConfig
from pipeline.inference.backends import open_frame_scorer
from pipeline.service.daemon import Daemon
from pipeline.transport.listen import listen
from pipeline.transport.messages import LineBlock


class LoopSource(ReplaySource):
    """The replayed strip, over and over, line numbers running on, paced."""

    def read(self, timeout: float) -> LineBlock | None:
        if self._pos + self._block > self._strip.shape[0]:
            # Start the next pass: line numbers run on, and the pacing clock (which counts lines
            # since its origin) moves its origin by the pass.
            self._first += self._pos
            if self._t0 is not None and self._rate is not None:
                self._t0 += self._pos / self._rate
            self._pos = 0
        return super().read(timeout)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--pace", type=float, default=0.9)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--work", type=Path, default=Path("runs/bench"))
    args = ap.parse_args()
    bundle = ensure_bundle(args.work, args.width)
    runtime = Config().runtime
    strip, _ = SyntheticStrip(width=args.width, seed=7).render(50_000_000, 2 * CONTEXT + 12 * 1024)
    fast = daemon_run(bundle, strip, runtime, rate=None, in_flight=1)
    rate = args.pace * fast["mpx_per_s"] * 1e6 / args.width
    print(f"sustained {fast['mpx_per_s']:.2f} Mpx/s; soaking at {args.pace:.0%}: {rate:.0f} lines/s", flush=True)

    # Eight frames of strip with two defects each, looped.
    rng = np.random.default_rng(3)
    first = 60_000_000
    defects = [
        d
        for k in range(8)
        for d in random_defects(rng, first_line=first + k * 1024, lines=1024, width=args.width, count=2)
    ]
    loop, _ = SyntheticStrip(width=args.width, seed=7).render(first, 8 * 1024, defects)
    work = args.work / "soak"
    work.mkdir(parents=True, exist_ok=True)
    (work / "alerts.sqlite").unlink(missing_ok=True)
    # A pixel threshold above the normal strip (as the demo sets one), so that alerts flow.
    fs = open_frame_scorer(bundle, runtime=runtime, scoring=Config().scoring, tile=None, margin=0)
    normal = (strip[k * 1024 : k * 1024 + 1024 + 2 * CONTEXT, :, None] for k in range(3))
    threshold = threshold_above_normal(fs, normal, factor=1.1)
    del fs
    cfg = DaemonConfig(
        bundle=bundle,
        frame_lines=1024 + 2 * CONTEXT,
        overlap_lines=2 * CONTEXT,
        threshold=threshold,
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        source=SourceConfig(block_lines=256),
        journal=JournalConfig(path=work / "alerts.sqlite"),
    )
    ctx = zmq.Context()
    source = LoopSource(loop, first_line=first, block_lines=256, line_rate_hz=rate)
    daemon = Daemon(cfg=cfg, runtime=runtime, scoring=Config().scoring, source=source, context=ctx)
    stop_listen = threading.Event()
    box: dict = {}
    received = {"alert": 0, "frame": 0}

    def on(topic: str, header: dict) -> None:
        received[topic] = received.get(topic, 0) + 1

    lt = threading.Thread(
        target=lambda: box.update(
            r=listen(
                endpoint=daemon.publisher.endpoint,
                topics=("alert", "frame"),
                on_message=on,
                stop=stop_listen.is_set,
                context=ctx,
                until_state=None,
            )
        )
    )
    lt.start()
    time.sleep(0.5)
    daemon.start()
    t0 = time.monotonic()
    samples: list[tuple[float, float]] = []
    while time.monotonic() - t0 < args.minutes * 60 and daemon.failed is None:
        samples.append((time.monotonic() - t0, rss_mib()))
        time.sleep(5.0)
    daemon.stop()
    daemon.join()
    time.sleep(1.0)
    stop_listen.set()
    lt.join()
    ctx.term()
    s = daemon.stats.snapshot()
    report = box["r"]
    after = [r for t, r in samples if t >= args.warmup_s]
    base = after[0] if after else float("nan")
    growth = 100 * (max(after) - base) / base if after else float("nan")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    e2e = s["latency_seconds"].get("end_to_end", {})
    print(
        f"\n`python benchmarks/soak.py --minutes {args.minutes:g}` commit {commit}, {time.strftime('%Y-%m-%d')}: "
        f"{args.width} px x 1024 new lines per frame at {rate:.0f} lines/s ({rate * args.width / 1e6:.2f} Mpx/s)\n"
    )
    print("| minute | RSS MiB |\n|---|---|")
    for t, r in samples[:: max(1, len(samples) // 10)]:
        print(f"| {t / 60:.1f} | {r:.0f} |")
    print(
        f"\nRSS after {args.warmup_s:.0f} s warm-up {base:.0f} MiB, peak after it {max(after):.0f} MiB: "
        f"growth {growth:.1f} % (bar 5 %)"
    )
    print(
        f"frames acquired {s['counts'].get('frames_total', 0)}, scored {s['counts'].get('frames_scored_total', 0)}; "
        f"alerts published {s['counts'].get('alerts_total', 0)}, received {received['alert']}; frame messages "
        f"received {received['frame']}; drops {s['drops'] or 'none'}; sequence gaps end to end {len(report.gaps)}; "
        f"end-to-end latency p50 {1000 * e2e.get('p50', float('nan')):.0f} ms, "
        f"p99 {1000 * e2e.get('p99', float('nan')):.0f} ms; daemon failed: {daemon.failed!r}"
    )


if __name__ == "__main__":
    main()
