"""The newcomer's first run: synthetic strip -> bundle -> scores and overlays, no data needed."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import Config
from pipeline.synthetic import SyntheticStrip, random_defects


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
        defects = random_defects(rng, first_line=line, lines=s.frame_lines, width=s.width, count=2)
        img, mask = strip.render(line, s.frame_lines, defects)
        name = f"defect_{i:05d}"
        cv2.imwrite(str(root / "test/defect" / f"{name}.png"), img)
        cv2.imwrite(str(root / "ground_truth/defect" / f"{name}.png"), mask.astype(np.uint8) * 255)
        planted.append((name, "+".join(d.kind for d in defects)))
        line += s.frame_lines
    return planted


def run_demo(*, cfg: Config, out: Path, progress: bool = True) -> dict[str, object]:
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
    print(f"overlays: {out / 'overlays'}  metrics: {out / 'metrics.json'}  total {time.perf_counter() - t0:.0f} s")
    return metrics
