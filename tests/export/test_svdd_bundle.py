"""`fit --backend svdd` end to end on the synthetic strip; the map rule of Patch SVDD sec. 3.4."""

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.evaluate import evaluate
from export.svdd_fit import fit_svdd
from pipeline.bundle import BundleError
from pipeline.config import Config, KnnConfig, RuntimeConfig, SvddConfig, SyntheticConfig
from pipeline.images import read_image
from pipeline.svdd import SvddScorer, patch_mean_map
from stripinspect.demo import write_synthetic_dataset
from tests.conftest import loopback_daemon_config


def test_each_pixel_gets_the_mean_of_the_patches_covering_it() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((5, 7)).astype(np.float32)
    patch, stride, H, W = 16, 4, 38, 47
    got = patch_mean_map(scores, patch=patch, stride=stride, out_hw=(H, W))
    total, count = np.zeros((H, W)), np.zeros((H, W))
    for i in range(5):
        for j in range(7):
            total[i * stride : i * stride + patch, j * stride : j * stride + patch] += scores[i, j]
            count[i * stride : i * stride + patch, j * stride : j * stride + patch] += 1
    covered = count > 0
    np.testing.assert_allclose(got[covered], (total / np.maximum(count, 1))[covered], rtol=1e-5)
    assert got.shape == (H, W) and np.isfinite(got).all()


@pytest.fixture(scope="module")
def svdd_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Frames of 256 x 256: room for the 3 x 3 grid of 64 px patches the SSL loss samples.
    root = tmp_path_factory.mktemp("svdd_data")
    write_synthetic_dataset(
        Config(synthetic=SyntheticConfig(width=256, frame_lines=256, seed=7, train_frames=8, test_frames=6)), root
    )
    return root


@pytest.fixture(scope="module")
def svdd_bundle(tmp_path_factory: pytest.TempPathFactory, svdd_data: Path) -> Path:
    out = tmp_path_factory.mktemp("svdd") / "bundle"
    cfg = Config(svdd=SvddConfig(dim=16, iterations=40, batch=8, lr=1e-3, bank_rows=512))
    fit_svdd(data=svdd_data / "train" / "good", out=out, cfg=cfg, progress=False)
    return out


def test_fit_writes_a_bundle_that_evaluate_scores(svdd_bundle: Path, svdd_data: Path, tmp_path: Path) -> None:
    m = json.loads((svdd_bundle / "manifest.json").read_text())
    assert m["kind"] == "patch_svdd" and [s["patch"] for s in m["scales"]] == [64, 32]
    assert m["training"]["verified_relative_error"] <= 1e-4 and (svdd_bundle / "loss.png").is_file()
    metrics = evaluate(bundle=svdd_bundle, data=svdd_data, out=tmp_path / "metrics.json", cfg=Config(), progress=False)
    print({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "seconds_per_image")})
    assert metrics["backbone"] == "patch_svdd" and metrics["images"] == 8
    # The map is the product of the two scales' patch-mean maps; the image score is its max.
    scorer = SvddScorer.open(svdd_bundle, runtime=RuntimeConfig(knn=KnnConfig(index="flat")))
    image = read_image(next((svdd_data / "test" / "defect").iterdir()), 1)
    result = scorer.score(image)
    maps = []
    for spec, index, codes in zip(scorer.manifest.scales, scorer.indexes, scorer.codes(image), strict=True):
        d, _ = index.search_exact(codes.reshape(-1, codes.shape[2]), 1)
        maps.append(
            patch_mean_map(
                d[:, 0].reshape(codes.shape[:2]), patch=spec.patch, stride=spec.stride, out_hw=image.shape[:2]
            )
        )
    np.testing.assert_allclose(result.anomaly_map, maps[0] * maps[1], rtol=1e-3)
    assert result.score == pytest.approx(float(result.anomaly_map.max()))


def test_a_tampered_svdd_bundle_is_one_clear_error(svdd_bundle: Path, tmp_path: Path) -> None:
    import shutil

    b = tmp_path / "b"
    shutil.copytree(svdd_bundle, b)
    with open(b / "index32.faiss", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="index32.faiss does not match its sha256"):
        SvddScorer.open(b, runtime=RuntimeConfig())


def test_the_daemon_refuses_an_svdd_bundle_with_one_line(svdd_bundle: Path) -> None:
    import zmq

    from pipeline.config import ScoringConfig, SourceConfig
    from pipeline.daemon import Daemon
    from pipeline.errors import StripinspectError
    from pipeline.sources import SyntheticSource

    src = SourceConfig(block_lines=128, strip_lines=768)
    cfg = loopback_daemon_config(
        bundle=svdd_bundle, threshold=1.0, pub_endpoint="tcp://127.0.0.1:*", control_endpoint="tcp://127.0.0.1:*"
    )
    with pytest.raises(StripinspectError, match="Patch SVDD bundle; the daemon serves PatchCore bundles only"):
        Daemon(
            cfg=cfg,
            runtime=RuntimeConfig(),
            scoring=ScoringConfig(),
            source=SyntheticSource(cfg=src, width=256, seed=1, frame_lines=1024),
            context=zmq.Context(),
        )
