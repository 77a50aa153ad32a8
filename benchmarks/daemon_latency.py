"""Per-stage and end-to-end latency of the running daemon on 2048 px x 1024 line frames.

    python benchmarks/daemon_latency.py [--frames 40] [--width 2048] [--json out.json]

Fits a bank on normal synthetic strip of the same width (once, cached in --work), then streams
the synthetic camera through the real daemon (threads, bounded queues, ZeroMQ PUB on loopback
with a subscriber attached) as fast as it will go and prints p50/p95/p99 per stage, sustained
megapixels per second, CPU use and drop counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import zmq

from pipeline.config import Config, CoresetConfig, DaemonConfig, FitConfig, SourceConfig, SyntheticConfig
from pipeline.daemon import Daemon
from pipeline.listen import collect_run
from pipeline.sources import SyntheticSource


def ensure_bundle(work: Path, width: int) -> Path:
    bundle = work / f"bundle_{width}"
    if (bundle / "manifest.json").is_file():
        return bundle
    from export.fit import fit_bundle
    from stripinspect.demo import write_synthetic_dataset

    cfg = Config(
        synthetic=SyntheticConfig(width=width, frame_lines=512, seed=7, train_frames=16, test_frames=1),
        fit=FitConfig(coreset=CoresetConfig(max_rows=16_384, ratio=0.1)),
    )
    write_synthetic_dataset(cfg, work / f"data_{width}")
    fit_bundle(data=work / f"data_{width}" / "train" / "good", out=bundle, cfg=cfg, progress=True)
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--lines", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=384)
    ap.add_argument("--work", type=Path, default=Path("runs/bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    bundle = ensure_bundle(args.work, args.width)
    step = args.lines - args.overlap
    src = SourceConfig(
        block_lines=256, strip_lines=args.overlap + args.frames * step, first_line=5_000_000, defects_per_100_frames=50
    )
    cfg = DaemonConfig(
        bundle=bundle,
        frame_lines=args.lines,
        overlap_lines=args.overlap,
        threshold=1e9,
        queue_frames=4,
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        source=src,
    )
    full = Config()
    ctx = zmq.Context()
    source = SyntheticSource(cfg=src, width=args.width, seed=7, frame_lines=args.lines)
    daemon = Daemon(cfg=cfg, runtime=full.runtime, scoring=full.scoring, source=source, context=ctx)
    daemon.start(acquire=False)
    cpu0, t0 = time.process_time(), time.perf_counter()
    _, report = collect_run(
        endpoint=daemon.publisher.endpoint,
        topics=("frame",),
        start=daemon.start_acquisition,
        context=ctx,
        timeout_s=1800,
    )
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    daemon.join()
    ctx.term()
    s = daemon.stats.snapshot()
    scored = s["counts"].get("frames_scored_total", 0)
    # New strip pixels per second: each frame adds `step` lines; the overlap is context.
    mpx = scored * step * args.width / wall / 1e6
    print(
        f"\n`python benchmarks/daemon_latency.py --frames {args.frames} --width {args.width}` "
        f"({args.width} px x {args.lines} lines, overlap {args.overlap}, 2-thread onnxruntime, flat faiss)"
    )
    print("\n| stage | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|")
    for stage, q in s["latency_seconds"].items():
        print(f"| {stage} | {1000 * q['p50']:.1f} | {1000 * q['p95']:.1f} | {1000 * q['p99']:.1f} |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nframes acquired {s['counts'].get('frames_total', 0)}, scored {scored}, drops {s['drops'] or 'none'}, "
        f"sequence gaps {len(report.gaps)}"
    )
    print(
        f"sustained {mpx:.2f} Mpx/s of new strip ({scored / wall:.2f} frames/s), CPU {100 * cpu / wall:.0f} % "
        f"of one core, peak RSS {rss:.0f} MiB, wall {wall:.1f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"stats": s, "mpx_per_s": mpx, "wall_s": wall, "cpu_s": cpu}, indent=2))


if __name__ == "__main__":
    main()
