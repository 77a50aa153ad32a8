"""Speed of the daemon against a naive PatchCore, side by side in one run (issue 5's benchmark).

    python benchmarks/speed.py [--frames 40] [--naive-frames 4] [--json runs/speed.json]

Workload: 8-bit mono frames of 2048 px x 1024 new lines of the synthetic strip, EfficientNet-
Lite0 features at stride 8 (32,768 patch queries per frame), a 16,384-row bank fitted on the same
synthetic strip (cached under --work).

- stripinspect: the real daemon (threads, bounded queues, ZeroMQ PUB with a subscriber) fed by
  a camera that replays pre-rendered strip, so the simulator's own rendering is not measured.
  Run 1 unpaced gives the sustained throughput; run 2 paces the camera at --pace of it and gives
  the end-to-end latency at that rate (a line cannot run faster than its slowest stage).
- naive: written the way anomalib's PatchCore does it: torch eager backbone on 256 x 256 tiles
  without overlap handling, distances from every patch to the whole bank by one matrix product
  (torch.cdist), map upsampled and smoothed in torch. Same network, same bank.

Both score the same labelled frames (half with planted defects): image AUROC (frame max) and
pixel AUROC. Prints a table; --json writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zmq

from calibration.metrics import auroc
from export.backbones import SPECS, PatchFeatureNet, build_feature_extractor
from pipeline.acquisition.synthetic import SyntheticStrip, random_defects
from pipeline.config import (
    ChooseConfig,
    Config,
    CoresetConfig,
    DaemonConfig,
    FitConfig,
    JournalConfig,
    KnnConfig,
    RuntimeConfig,
    SourceConfig,
    SyntheticConfig,
)
from pipeline.inference.backends import open_backend, open_frame_scorer
from pipeline.inference.framescore import AnyFrameScorer
from pipeline.inference.patchcore import PatchCoreScorer
from pipeline.inference.scoring import gaussian_kernel_size
from pipeline.service.daemon import Daemon
from pipeline.transport.listen import collect_run
from pipeline.transport.messages import LineBlock

CONTEXT = 192  # lines of CNN context above and below each frame (daemon overlap 384)
EVAL_LINE = 30_000_000  # labelled frames, far from the training lines
STREAM_LINE = 40_000_000  # the replayed strip


def ensure_bundle(work: Path, width: int) -> Path:
    bundle = work / f"bundle_{width}"
    if (bundle / "manifest.json").is_file():
        return bundle
    from export.fit import fit_bundle
    from stripinspect.demo import write_synthetic_dataset

    cfg = Config(
        synthetic=SyntheticConfig(width=width, frame_lines=512, seed=7, train_frames=16, test_frames=1),
        # Full-resolution frames, as before the fit-time choice existed: this measures the daemon's
        # speed at one fixed amount of work (a chosen scale of 0.5 would be 4x less of it).
        fit=FitConfig(scale=1.0, coreset=CoresetConfig(max_rows=16_384, ratio=0.1), choose=ChooseConfig(images=0)),
    )
    write_synthetic_dataset(cfg, work / f"data_{width}")
    fit_bundle(data=work / f"data_{width}" / "train" / "good", out=bundle, cfg=cfg, progress=True)
    return bundle


class ReplaySource:
    """A line camera replaying pre-rendered strip; paced at ``line_rate_hz`` when given."""

    def __init__(self, strip: np.ndarray, *, first_line: int, block_lines: int, line_rate_hz: float | None) -> None:
        self.width, self.channels = strip.shape[1], 1
        self._strip, self._first, self._block, self._rate = strip, first_line, block_lines, line_rate_hz
        self._pos = 0
        self._t0: float | None = None

    def read(self, timeout: float) -> LineBlock | None:
        if self._pos >= self._strip.shape[0]:
            raise EOFError("replay ended")
        n = min(self._block, self._strip.shape[0] - self._pos)
        if self._rate is not None:
            self._t0 = time.monotonic() if self._t0 is None else self._t0
            wait = self._t0 + (self._pos + n) / self._rate - time.monotonic()
            if wait > timeout:
                time.sleep(timeout)
                return None
            time.sleep(max(0.0, wait))
        block = LineBlock(
            pixels=self._strip[self._pos : self._pos + n], first_line=self._first + self._pos, capture_time=time.time()
        )
        self._pos += n
        return block

    def close(self) -> None:
        pass


def labelled_frames(width: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frame with CONTEXT lines above and below (1024 + 2 CONTEXT, width), mask of its 1024
    valid lines); every second frame has two to four planted defects."""
    strip = SyntheticStrip(width=width, seed=7)
    rng = np.random.default_rng(11)
    out = []
    for i in range(count):
        first = EVAL_LINE + i * 4096
        defects = (
            []
            if i % 2 == 0
            else random_defects(rng, first_line=first, lines=1024, width=width, count=int(rng.integers(2, 5)))
        )
        img, mask = strip.render(first - CONTEXT, 1024 + 2 * CONTEXT, defects)
        out.append((img, mask[CONTEXT:-CONTEXT].astype(bool)))
    return out


class NaivePatchCore:
    """anomalib-style inference: eager torch, 256 px tiles, cdist to the whole bank."""

    def __init__(self, *, bank: np.ndarray, sigma: float, tile: int = 256, batch: int = 8) -> None:
        extractor = build_feature_extractor("efficientnet_lite0", weights=None, random_weights=False)
        self.net = PatchFeatureNet(
            spec=SPECS["efficientnet_lite0"],
            extractor=extractor,
            aggregation_size=3,
            projection_dim=None,
            border_pad=32,
        ).eval()
        self.bank = torch.from_numpy(bank)
        self.tile, self.batch = tile, batch
        k = gaussian_kernel_size(sigma)
        g = torch.exp(-((torch.arange(k) - k // 2) ** 2) / (2 * sigma**2))
        self.kernel = (g / g.sum()).float()

    @torch.no_grad()
    def score(self, frame: np.ndarray) -> np.ndarray:
        """(H, W) uint8 -> anomaly map (H, W) float32; H, W multiples of the tile."""
        t = self.tile
        h, w = frame.shape
        tiles = torch.from_numpy(frame).reshape(h // t, t, w // t, t).permute(0, 2, 1, 3).reshape(-1, t, t, 1)
        maps = []
        for i in range(0, tiles.shape[0], self.batch):
            feats = self.net(tiles[i : i + self.batch])  # (n, 32, 32, D)
            n, gh, gw, d = feats.shape
            dist = torch.cdist(feats.reshape(-1, d), self.bank).min(dim=1).values.reshape(n, 1, gh, gw)
            up = F.interpolate(dist, size=(t, t), mode="bilinear", align_corners=False)
            k = self.kernel.numel()
            up = F.pad(up, (k // 2,) * 4, mode="reflect")
            up = F.conv2d(up, self.kernel.view(1, 1, 1, -1))
            up = F.conv2d(up, self.kernel.view(1, 1, -1, 1))
            maps.append(up[:, 0])
        m = torch.cat(maps).reshape(h // t, w // t, t, t).permute(0, 2, 1, 3).reshape(h, w)
        return m.numpy()


def ours_score(fs: AnyFrameScorer, frame: np.ndarray) -> np.ndarray:
    """The daemon's scoring of one labelled frame: map of its 1024 valid lines."""
    feats = fs.features(frame[:, :, None])
    h, w = frame.shape
    patch, first, _ = fs.search_band(feats, valid=(CONTEXT, h - CONTEXT), lines=h)
    return fs.band_map(patch, first, out_hw=(h, w))[CONTEXT:-CONTEXT]


def quality(maps: list[np.ndarray], frames: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    labels = np.array([m.any() for _, m in frames])
    image = auroc(np.array([float(a.max()) for a in maps]), labels)
    pixel = auroc(np.concatenate([a.ravel() for a in maps]), np.concatenate([m.ravel() for _, m in frames]))
    return image, pixel


def daemon_run(bundle: Path, strip: np.ndarray, runtime: RuntimeConfig, *, rate: float | None, in_flight: int) -> dict:
    # Unpaced, the replay delivers the whole strip at once: a queue that holds it all makes the
    # daemon work through every frame at its full speed instead of dropping most of them.
    cfg = DaemonConfig(
        bundle=bundle,
        frame_lines=1024 + 2 * CONTEXT,
        overlap_lines=2 * CONTEXT,
        threshold=1e9,
        queue_frames=4 if rate is not None else strip.shape[0] // 1024 + 2,
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        source=SourceConfig(block_lines=256),
        frames_in_flight=in_flight,
        journal=JournalConfig(path=bundle.parent / "alerts.sqlite"),
    )
    ctx = zmq.Context()
    source = ReplaySource(strip, first_line=STREAM_LINE, block_lines=256, line_rate_hz=rate)
    daemon = Daemon(cfg=cfg, runtime=runtime, scoring=Config().scoring, source=source, context=ctx)
    daemon.start(acquire=False)
    cpu0, t0 = time.process_time(), time.perf_counter()
    _, report = collect_run(
        endpoint=daemon.publisher.endpoint,
        topics=("frame",),
        start=daemon.start_acquisition,
        context=ctx,
        timeout_s=3600,
    )
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    daemon.join()
    ctx.term()
    s = daemon.stats.snapshot()
    scored = s["counts"].get("frames_scored_total", 0)
    return {
        "stats": s,
        "frames_scored": scored,
        "mpx_per_s": scored * 1024 * strip.shape[1] / wall / 1e6,
        "cpu_percent": 100 * cpu / wall,
        "wall_s": wall,
        "gaps": len(report.gaps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=40, help="frames streamed through the daemon per run")
    ap.add_argument("--naive-frames", type=int, default=4, help="frames timed through the naive reference")
    ap.add_argument("--eval-frames", type=int, default=8, help="labelled frames scored by both for AUROC")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--knn", default="ivf", choices=["flat", "ivf", "hnsw", "ivfpq"])
    ap.add_argument("--nprobe", type=int, default=KnnConfig().nprobe)
    ap.add_argument("--onnx-threads", type=int, default=RuntimeConfig().onnx_threads)
    ap.add_argument("--faiss-threads", type=int, default=RuntimeConfig().faiss_threads)
    ap.add_argument("--in-flight", type=int, default=DaemonConfig().frames_in_flight, choices=[1, 2])
    ap.add_argument("--pace", type=float, default=0.9, help="paced run at this fraction of the sustained rate")
    ap.add_argument("--work", type=Path, default=Path("runs/bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    bundle = ensure_bundle(args.work, args.width)
    runtime = RuntimeConfig(
        onnx_threads=args.onnx_threads,
        faiss_threads=args.faiss_threads,
        knn=KnnConfig(index=args.knn, nprobe=args.nprobe),
    )
    lines = 2 * CONTEXT + args.frames * 1024
    strip, _ = SyntheticStrip(width=args.width, seed=7).render(STREAM_LINE, lines)
    print(f"daemon, unpaced: {args.frames} frames", flush=True)
    fast = daemon_run(bundle, strip, runtime, rate=None, in_flight=args.in_flight)
    rate = args.pace * fast["mpx_per_s"] * 1e6 / args.width
    print(f"daemon, paced at {args.pace:.0%} of that ({rate:.0f} lines/s)", flush=True)
    paced = daemon_run(bundle, strip, runtime, rate=rate, in_flight=args.in_flight)
    # Peak so far: the daemon, its replay strip and the torch this script imports; the naive
    # reference and the labelled maps come after.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    exact_rt = runtime.model_copy(update={"knn": KnnConfig(index="flat")})
    scorer = open_backend(bundle, runtime=runtime, scoring=Config().scoring)
    if not isinstance(scorer, PatchCoreScorer):
        raise SystemExit(f"{bundle}: a {scorer.kind!r} bundle; the naive reference needs a PatchCore bank")
    fs = scorer.frame_scorer(tile=None, margin=0)
    fs_exact = open_frame_scorer(bundle, runtime=exact_rt, scoring=Config().scoring, tile=None, margin=0)
    naive = NaivePatchCore(bank=scorer.index.vectors, sigma=Config().scoring.sigma)

    print(f"labelled frames: {args.eval_frames} x {args.width} px x 1024 lines", flush=True)
    frames = labelled_frames(args.width, args.eval_frames)
    q_ours = quality([ours_score(fs, f) for f, _ in frames], frames)
    q_exact = quality([ours_score(fs_exact, f) for f, _ in frames], frames)
    q_naive = quality([naive.score(f[CONTEXT:-CONTEXT]) for f, _ in frames], frames)

    print(f"naive reference: {args.naive_frames} frames", flush=True)
    t = time.perf_counter()
    for f, _ in frames[: args.naive_frames]:
        naive.score(f[CONTEXT:-CONTEXT])
    naive_s = (time.perf_counter() - t) / args.naive_frames
    naive_mpx = 1024 * args.width / naive_s / 1e6

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lat = fast["stats"]["latency_seconds"]
    e2e = paced["stats"]["latency_seconds"]["end_to_end"]
    print(
        f"\n`python benchmarks/speed.py --frames {args.frames} --knn {args.knn} --nprobe {args.nprobe} "
        f"--in-flight {args.in_flight} --pace {args.pace}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, commit {commit}, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{args.width} px x 1024 new lines per frame (+{2 * CONTEXT} lines CNN context), "
        f"bank {scorer.index.rows:,} rows, "
        f"kNN {scorer.index.backend} (nprobe {args.nprobe}, exact top {runtime.knn.exact_top:.1%}), "
        f"onnxruntime {args.onnx_threads} threads, faiss {args.faiss_threads} threads, "
        f"{args.in_flight} frame(s) in flight\n"
    )
    print("| stage (unpaced run) | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|")
    for stage in ("acquire", "preprocess", "embed", "knn", "map", "defects", "publish"):
        if stage in lat:
            q = lat[stage]
            print(f"| {stage} | {1000 * q['p50']:.1f} | {1000 * q['p95']:.1f} | {1000 * q['p99']:.1f} |")
    print(
        f"| end to end, paced at {args.pace:.0%} | {1000 * e2e['p50']:.0f} | {1000 * e2e['p95']:.0f} | "
        f"{1000 * e2e['p99']:.0f} |"
    )
    ratio = fast["mpx_per_s"] / naive_mpx
    print("\n| | stripinspect | naive reference | stripinspect, exact kNN |\n|---|---|---|---|")
    print(f"| sustained Mpx/s | {fast['mpx_per_s']:.2f} | {naive_mpx:.2f} | |")
    print(f"| image AUROC ({args.eval_frames} frames) | {q_ours[0]:.4f} | {q_naive[0]:.4f} | {q_exact[0]:.4f} |")
    print(f"| pixel AUROC | {q_ours[1]:.4f} | {q_naive[1]:.4f} | {q_exact[1]:.4f} |")
    print(
        f"\nthroughput ratio {ratio:.1f}x the naive reference; p99/p50 end to end {e2e['p99'] / e2e['p50']:.2f} at "
        f"{paced['mpx_per_s']:.2f} Mpx/s; CPU {fast['cpu_percent']:.0f} % of one core; peak RSS {rss:.0f} MiB "
        f"(daemon runs, with the replayed strip and torch imported); frames {fast['frames_scored']} "
        f"+ {paced['frames_scored']} scored, drops {fast['stats']['drops'] or 'none'} / "
        f"{paced['stats']['drops'] or 'none'}, "
        f"sequence gaps {fast['gaps'] + paced['gaps']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "commit": commit,
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "args": {k: str(v) for k, v in vars(args).items()},
            "unpaced": fast,
            "paced": paced,
            "naive_mpx_per_s": naive_mpx,
            "ratio": ratio,
            "quality": {"ours": q_ours, "naive": q_naive, "ours_exact_knn": q_exact},
            "peak_rss_mib": rss,
        }
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
