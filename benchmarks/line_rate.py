"""The line rate the daemon sustains with a config, and the synthetic camera's default from it.

    python benchmarks/line_rate.py [--config config.yaml] [--frames 60] [--fraction 0.55]

The shipped config's daemon (its bundle, frame size, queues, threads) is fed by the synthetic
camera unpaced, planting as configured (rendering runs in the daemon's acquisition thread, as in
`stripinspect run`), with a frame queue that holds the whole strip so nothing is dropped and the
daemon works at its full speed. Sustained rate = new lines scored per second of wall time from
the first to the last published frame (start-up excluded). Prints a table and the line rate at
``--fraction`` of it, the margin left for a slower or loaded machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import zmq

from pipeline.acquisition.sources import SyntheticSource
from pipeline.config import load_config
from pipeline.service.daemon import Daemon
from pipeline.transport.listen import collect_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("config.yaml"))
    ap.add_argument("--frames", type=int, default=60, help="frames streamed through the daemon")
    ap.add_argument("--fraction", type=float, default=0.55, help="suggested line rate as this share of the sustained")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = load_config(args.config)
    d = cfg.daemon
    step = d.frame_lines - d.overlap_lines
    src = d.source.model_copy(
        update={"kind": "synthetic", "line_rate_hz": None, "strip_lines": d.overlap_lines + args.frames * step}
    )
    dcfg = d.model_copy(
        update={
            "source": src,
            "queue_frames": args.frames + 2,
            "pub_endpoint": "tcp://127.0.0.1:*",
            "control_endpoint": "tcp://127.0.0.1:*",
            "journal": d.journal.model_copy(update={"path": None}),
        }
    )
    source = SyntheticSource(cfg=src, width=cfg.synthetic.width, seed=cfg.synthetic.seed, frame_lines=d.frame_lines)
    ctx = zmq.Context()
    daemon = Daemon(cfg=dcfg, runtime=cfg.runtime, scoring=cfg.scoring, source=source, context=ctx)
    daemon.start(acquire=False)
    messages, report = collect_run(
        endpoint=daemon.publisher.endpoint,
        topics=("frame",),
        start=daemon.start_acquisition,
        context=ctx,
        timeout_s=3600,
    )
    daemon.join()
    ctx.term()
    stats = daemon.stats.snapshot()
    published = [float(h["publish_time"]) for _, h in messages]
    frames = len(published)
    if frames < 2:
        raise SystemExit(f"only {frames} frame(s) published: nothing to time")
    seconds = published[-1] - published[0]
    fps = (frames - 1) / seconds
    lines_per_s = fps * step
    row = {
        "config": str(args.config),
        "width": cfg.synthetic.width,
        "frame_lines": d.frame_lines,
        "new_lines_per_frame": step,
        "frames": frames,
        "seconds": round(seconds, 2),
        "frames_per_s": round(fps, 2),
        "lines_per_s": round(lines_per_s),
        "mpx_per_s": round(lines_per_s * cfg.synthetic.width / 1e6, 3),
        "drops": stats["drops"],
        "gaps": len(report.gaps),
        "suggested_line_rate_hz": round(args.fraction * lines_per_s, -2),
        "fraction": args.fraction,
    }
    print(f"{'frames':>7} {'seconds':>8} {'frames/s':>9} {'lines/s':>8} {'Mpx/s':>6}  suggested at {args.fraction:.0%}")
    print(
        f"{frames:>7} {seconds:>8.1f} {fps:>9.2f} {lines_per_s:>8.0f} {row['mpx_per_s']:>6.2f}  "
        f"{row['suggested_line_rate_hz']:.0f} lines/s"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
