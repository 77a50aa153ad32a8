"""The newcomer's first run: synthetic strip -> bundle -> scores and overlays, no data needed."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.acquisition.synthetic import DEFECT_KINDS, PlantedDefect, SyntheticStrip, random_defects
from pipeline.config import Config


def write_synthetic_dataset(cfg: Config, root: Path) -> list[tuple[str, str]]:
    """MVTec-layout folder of the synthetic strip; returns (test image name, defect kinds)."""
    s = cfg.synthetic
    strip = SyntheticStrip(width=s.width, seed=s.seed)
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    line = 0
    for i in range(s.train_frames):
        img, _ = strip.render(line, s.frame_lines)
        cv2.imwrite(str(root / "train/good" / f"frame_{i:05d}.png"), img)
        line += s.frame_lines
    rng = np.random.default_rng(s.seed + 1)
    planted = []
    for i in range(max(2, s.test_frames // 3)):
        img, _ = strip.render(line, s.frame_lines)
        cv2.imwrite(str(root / "test/good" / f"good_{i:05d}.png"), img)
        line += s.frame_lines
    for i in range(s.test_frames):
        kinds = [DEFECT_KINDS[(2 * i) % len(DEFECT_KINDS)], DEFECT_KINDS[(2 * i + 1) % len(DEFECT_KINDS)]]
        defects = random_defects(rng, first_line=line, lines=s.frame_lines, width=s.width, count=2, kinds=kinds)
        img, mask = strip.render(line, s.frame_lines, defects)
        name = f"defect_{i:05d}"
        cv2.imwrite(str(root / "test/defect" / f"{name}.png"), img)
        cv2.imwrite(str(root / "ground_truth/defect" / f"{name}.png"), mask.astype(np.uint8) * 255)
        planted.append((name, "+".join(d.kind for d in defects)))
        line += s.frame_lines
    return planted


def run_demo(*, cfg: Config, out: Path, progress: bool = True, steps: int = 24) -> dict[str, object]:
    from calibration.evaluate import evaluate
    from export.fit import fit_bundle

    t0 = time.perf_counter()
    data = out / "data"
    planted = dict(write_synthetic_dataset(cfg, data))
    print(
        f"synthetic strip: {cfg.synthetic.train_frames} normal frames of {cfg.synthetic.frame_lines} x "
        f"{cfg.synthetic.width} px in {data}"
    )
    manifest = fit_bundle(data=data / "train/good", out=out / "bundle", cfg=cfg, progress=progress)
    print(
        f"bundle {out / 'bundle'}: {manifest.features.backbone}, {manifest.index.rows} bank rows of "
        f"{manifest.features.embedding_dim} dims, fitted in {manifest.fitted_on.fit_seconds:.1f} s"
    )
    metrics = evaluate(bundle=out / "bundle", data=data, out=out / "metrics.json", cfg=cfg, progress=progress)
    with open(out / "scores.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    good = [float(r["score"]) for r in rows if r["label"] == "0"]
    print(f"\n{'frame':<28} {'planted defects':<22} {'image score':>11}  vs max normal")
    for r in rows:
        name = Path(r["image"]).stem
        kinds = planted.get(name, "-")
        score = float(r["score"])
        flag = "ABOVE" if r["label"] == "1" and score > max(good) else ""
        print(f"{r['image']:<28} {kinds:<22} {score:>11.3f}  {flag}")
    ms = 1000 * float(metrics["seconds_per_image"])  # type: ignore[arg-type]
    print(
        f"\nimage AUROC {metrics['image_auroc']:.3f}  pixel AUROC {metrics['pixel_auroc']:.3f}  "
        f"AUPRO {metrics['pixel_aupro']:.3f}  ({ms:.0f} ms per frame)"
    )
    print(
        f"overlays: {out / 'overlays'}  charts: {out / 'scores.png'} {out / 'roc.png'}  metrics: {out / 'metrics.json'}"
    )
    metrics["daemon"] = run_daemon_demo(cfg=cfg, bundle=out / "bundle", steps=steps)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return metrics


def match_alerts(
    planted: list[PlantedDefect],
    alerts: list[dict[str, Any]],
    *,
    mm_per_line: float,
    mm_per_px: float,
    md_tol_m: float,
    cd_tol_mm: float,
) -> tuple[int, int]:
    """(planted defects found, alerts that match no planted defect)."""
    found, matched = 0, set()
    for d in planted:
        md, cd = d.line * mm_per_line / 1000, d.col * mm_per_px
        hits = [
            i for i, a in enumerate(alerts) if abs(a["md_m"] - md) <= md_tol_m and abs(a["cd_mm"] - cd) <= cd_tol_mm
        ]
        found += bool(hits)
        matched.update(hits)
    return found, len(alerts) - len(matched)


def run_daemon_demo(*, cfg: Config, bundle: Path, steps: int = 24) -> dict[str, Any]:
    """The daemon on the synthetic camera with a listener over ZeroMQ on loopback."""
    import zmq

    from calibration.thresholds import threshold_above_normal
    from pipeline.acquisition.sources import SyntheticSource
    from pipeline.config import SourceConfig
    from pipeline.inference.backends import open_frame_scorer
    from pipeline.inference.bundle import read_manifest, write_manifest
    from pipeline.service.daemon import Daemon
    from pipeline.transport.listen import collect_run

    d = cfg.daemon
    step = d.frame_lines - d.overlap_lines
    fs = open_frame_scorer(bundle, runtime=cfg.runtime, scoring=cfg.scoring, tile=d.tile, margin=d.tile_margin)
    strip = SyntheticStrip(width=cfg.synthetic.width, seed=cfg.synthetic.seed)
    normal = (strip.render(2_000_000 + k * d.frame_lines, d.frame_lines)[0][:, :, None] for k in range(6))
    threshold = threshold_above_normal(fs, normal, factor=1.1)
    # Stored in the bundle so that `stripinspect run` on it works as shipped.
    manifest = read_manifest(bundle)
    write_manifest(bundle, manifest.model_copy(update={"thresholds": {"pixel": threshold}}))
    # Unpaced, and no periodic roll mark: the demo matches each planted defect to one alert.
    src = SourceConfig(
        block_lines=128,
        line_rate_hz=None,
        strip_lines=d.overlap_lines + steps * step,
        first_line=1_000_000,
        defects_per_100_frames=100,
        roll_period_lines=None,
    )
    dcfg = d.model_copy(
        update={
            "bundle": bundle,
            "threshold": threshold,
            "source": src,
            "pub_endpoint": "tcp://127.0.0.1:*",
            "control_endpoint": "tcp://127.0.0.1:*",
            "queue_frames": 1000,
            # The demo's alert journal lives beside its other outputs.
            "journal": d.journal.model_copy(update={"path": bundle.parent / "alerts.sqlite"}),
        }
    )
    source = SyntheticSource(cfg=src, width=cfg.synthetic.width, seed=cfg.synthetic.seed, frame_lines=d.frame_lines)
    ctx = zmq.Context()
    daemon = Daemon(cfg=dcfg, runtime=cfg.runtime, scoring=cfg.scoring, source=source, context=ctx)
    daemon.start(acquire=False)
    t0 = time.perf_counter()
    messages, report = collect_run(
        endpoint=daemon.publisher.endpoint, topics=("alert",), start=daemon.start_acquisition, context=ctx
    )
    seconds = time.perf_counter() - t0
    alerts = [h for _, h in messages]
    daemon.join()
    stats = daemon.stats.snapshot()
    ctx.term()
    last = 1_000_000 + d.overlap_lines + steps * step - d.overlap_lines // 2
    planted = [p for p in source.planted if p.line < last - 40]
    found, false_alerts = match_alerts(
        planted,
        alerts,
        mm_per_line=d.mm_per_line,
        mm_per_px=d.mm_per_px,
        md_tol_m=d.overlap_lines * d.mm_per_line / 1000,
        cd_tol_mm=5.0,
    )
    frames = stats["counts"].get("frames_scored_total", 0)
    print(
        f"\ndaemon on the synthetic camera ({cfg.synthetic.width} px x {d.frame_lines} lines per frame, "
        f"{d.overlap_lines} lines overlap), threshold {threshold:.2f}:"
    )
    print(
        f"  frames {frames}, strip {steps * step * d.mm_per_line / 1000:.1f} m in {seconds:.1f} s, "
        f"defects planted {len(planted)}, found {found}, alerts {len(alerts)}, false alerts {false_alerts}, "
        f"sequence gaps {len(report.gaps)}, drops {stats['drops'] or 0}"
    )
    print(f"  {'stage':<12} {'p50 ms':>8} {'p99 ms':>8}")
    for stage, q in stats["latency_seconds"].items():
        print(f"  {stage:<12} {1000 * q['p50']:>8.1f} {1000 * q['p99']:>8.1f}")
    return {
        "frames": frames,
        "planted": len(planted),
        "found": found,
        "alerts": len(alerts),
        "false_alerts": false_alerts,
        "gaps": len(report.gaps),
    }
