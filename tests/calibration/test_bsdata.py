"""Real data: a small BSData subset, so that a quality regression fails CI.

BSData: T. Schlagenhauf et al., "Industrial Machine Tool Element Surface Defect Dataset",
arXiv:2103.13003, CC BY-SA 4.0. Read from ../shared; skipped where it is absent.
"""

from pathlib import Path

import pytest

from calibration.evaluate import evaluate
from export.fit import fit_bundle
from pipeline.config import Config
from tests.conftest import BSDATA

pytestmark = pytest.mark.skipif(not (BSDATA / "train" / "good").is_dir(), reason=f"BSData not found at {BSDATA}")


def _subset(tmp: Path) -> Path:
    root = tmp / "bsdata_subset"
    picks = {
        "train/good": sorted((BSDATA / "train/good").glob("*.jpg"))[::12],
        "test/good": sorted((BSDATA / "test/good").glob("*.jpg"))[::8],
        "test/defect": sorted((BSDATA / "test/defect").glob("*.jpg"))[::8],
    }
    for sub, files in picks.items():
        (root / sub).mkdir(parents=True)
        for f in files:
            (root / sub / f.name).symlink_to(f)
    (root / "ground_truth/defect").mkdir(parents=True)
    for f in picks["test/defect"]:
        (root / "ground_truth/defect" / f"{f.stem}.png").symlink_to(BSDATA / "ground_truth/defect" / f"{f.stem}.png")
    return root


def test_bsdata_subset_quality_floor(tmp_path: Path, effnet_model_dir: Path) -> None:
    data = _subset(tmp_path)
    cfg = Config()  # the shipped defaults: full resolution, 1 % coreset
    manifest = fit_bundle(
        data=data / "train/good", out=tmp_path / "b", cfg=cfg, model_dir=effnet_model_dir, progress=False
    )
    assert manifest.fitted_on.images == 41 and manifest.fitted_on.image_sizes == [(460, 1130)]
    m = evaluate(bundle=tmp_path / "b", data=data, out=tmp_path / "e" / "metrics.json", cfg=cfg, progress=False)
    assert m["images_good"] == 20 and m["images_defect"] == 21
    print({k: m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")})
    assert m["image_auroc"] >= FLOOR_IMAGE
    assert m["pixel_auroc"] >= FLOOR_PIXEL
    assert m["pixel_aupro"] >= FLOOR_PRO


# Measured on this subset with the defaults (2026-12-01, per-position statistics from 5 folds,
# map of z-scores): image 0.893, pixel 0.9949, AUPRO 0.849 (2026-11-28, raw scores: 0.883,
# 0.9935, 0.819; before border padding: 0.812, 0.991, 0.785). The floors leave room for
# thread-count and BLAS rounding, not for a real regression.
FLOOR_IMAGE = 0.85
FLOOR_PIXEL = 0.988
FLOOR_PRO = 0.80
