"""Calibrated thresholds on real data: false positives on normal images, detection on defects.

    python benchmarks/bsdata_thresholds.py --bundle B --data ../shared/datasets/bsdata [--every 2]

Thresholds are calibrated on one half of test/good (normal images only, per-band, a budget of
false alarms per image), then the other half of test/good gives the per-image false-positive
rate and test/defect the detection rate (an alarm region touching the ground truth). Also the
single image-level threshold that would maximise F1, for reference only.

BSData: T. Schlagenhauf et al., "Industrial Machine Tool Element Surface Defect Dataset",
arXiv:2103.13003, CC BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from calibration.bands import band_edges, calibrate_bands
from calibration.evaluate import find_test_images
from calibration.thresholds import labelled_report
from pipeline.acquisition.images import read_image
from pipeline.config import Config
from pipeline.inference.backends import open_backend
from pipeline.postprocess.defects import per_column


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--every", type=int, default=1, help="use every n-th image")
    ap.add_argument("--fp-per-image", type=float, default=0.05, help="false-alarm budget per normal image")
    ap.add_argument("--bands", type=int, default=4)
    ap.add_argument("--min-area-px", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = Config()
    scorer = open_backend(args.bundle, runtime=cfg.runtime, scoring=cfg.scoring)
    items = find_test_images(args.data)
    good = [i for i in items if i.defect_type == "good"][:: args.every]
    bad = [i for i in items if i.defect_type != "good"][:: args.every]
    calib, held = good[0::2], good[1::2]

    cal_maps = [scorer.score(read_image(it.path, scorer.channels)).anomaly_map for it in calib]
    width = cal_maps[0].shape[1]
    # One image counts as one metre, so "per km" is "per 1,000 images".
    cal = calibrate_bands(
        cal_maps,
        edges=band_edges(width, args.bands),
        metres=float(len(cal_maps)),
        target_per_km=1000.0 * args.fp_per_image,
        min_area_px=args.min_area_px,
    )
    cols = per_column(cal.edges, cal.thresholds)

    min_area_px = args.min_area_px
    report = labelled_report(scorer, held + bad, columns=cols, min_area_px=min_area_px)
    fp, detected = report["false_positive_rate_per_image"], report["detection_rate"]
    best = (report["best_f1"], report["best_f1_image_threshold"])
    n_held, n_bad = report["normal_images"], report["defect_images"]
    result = {
        "calibration_images": len(cal_maps),
        "held_out_normal_images": n_held,
        "defect_images": n_bad,
        "fp_budget_per_image": args.fp_per_image,
        "band_thresholds": cal.thresholds,
        "false_positive_rate_per_image": fp,
        "detection_rate": detected,
        "best_f1_image_threshold": best[1],
        "best_f1": best[0],
    }
    print(f"\n`python benchmarks/bsdata_thresholds.py --every {args.every}` on {args.data}")
    print("| calibrated on | held-out normal | FP rate / image (budget) | defect images | detected | best F1 (thr) |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {len(cal_maps)} normal | {n_held} | {fp:.3f} ({args.fp_per_image}) | {n_bad} | "
        f"{detected:.3f} | {best[0]:.3f} ({best[1]:.2f}) |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
