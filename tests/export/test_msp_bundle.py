"""`fit --backend msp` end to end on the synthetic strip; maps summed, max of 8 x 8-window means."""

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.evaluate import evaluate
from pipeline.acquisition.images import list_images, read_image
from pipeline.config import Config, KnnConfig, RuntimeConfig, ScoringConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.scoring import max_window_mean, patch_mean_map


def test_max_window_mean_is_the_largest_mean_of_any_window() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((13, 17)).astype(np.float32)
    brute = max(float(a[y : y + 8, x : x + 8].mean()) for y in range(13 - 7) for x in range(17 - 7))
    assert max_window_mean(a, 8) == pytest.approx(brute, rel=1e-6)
    assert max_window_mean(a, 1) == pytest.approx(float(a.max()))
    # A map thinner than the window: the window shrinks to the map's short side.
    small = a[:5]
    brute_small = max(float(small[:, x : x + 5].mean()) for x in range(17 - 4))
    assert max_window_mean(small, 8) == pytest.approx(brute_small, rel=1e-6)


def test_fit_writes_a_bundle_with_three_summed_scales(msp_bundle: Path, svdd_data: Path, tmp_path: Path) -> None:
    m = json.loads((msp_bundle / "manifest.json").read_text())
    assert m["kind"] == "multiscale_patch" and m["combine"] == "sum" and m["image_score"] == "window_mean"
    assert [(s["patch"], s["stride"]) for s in m["scales"]] == [(64, 16), (32, 8), (16, 4)] and m["window"] == 8
    assert m["training"]["verified_relative_error"] <= 1e-4 and (msp_bundle / "loss.png").is_file()
    curves = json.loads((msp_bundle / "training.json").read_text())
    assert len(curves["cos"]) == len(curves["kmeans"]) == m["training"]["steps"] == m["training"]["iterations"] == 6
    scorer = open_backend(msp_bundle, runtime=RuntimeConfig(knn=KnnConfig(index="flat")), scoring=ScoringConfig())
    image = read_image(list_images(svdd_data / "test" / "defect")[0], 1)
    result = scorer.score(image)
    maps = []
    for spec, index, codes in zip(scorer.manifest.scales, scorer.indexes, scorer.codes(image), strict=True):
        d, _ = index.search_exact(codes.reshape(-1, codes.shape[2]), 1)
        grid = d[:, 0].reshape(codes.shape[:2])
        maps.append(patch_mean_map(grid, patch=spec.patch, stride=spec.stride, out_hw=image.shape[:2]))
    np.testing.assert_allclose(result.anomaly_map, maps[0] + maps[1] + maps[2], rtol=1e-4, atol=1e-6)
    assert result.score == pytest.approx(max_window_mean(result.anomaly_map, 8), rel=1e-6)
    metrics = evaluate(bundle=msp_bundle, data=svdd_data, out=tmp_path / "metrics.json", cfg=Config(), progress=False)
    print({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "seconds_per_image")})
    assert metrics["backbone"] == "multiscale_patch" and metrics["images"] == 8
