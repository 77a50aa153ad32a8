"""Per-position normal score statistics: cross-fitted at fit time, applied by the scorer."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from export.fit import fit_bundle
from pipeline.acquisition.images import list_images, read_image
from pipeline.config import (
    Config,
    ConfigError,
    CoresetConfig,
    FitConfig,
    KnnConfig,
    RuntimeConfig,
    ScoringConfig,
    parse_config,
)
from pipeline.inference.backends import open_backend
from pipeline.inference.bundle import POSITION_STATS_FILE, BundleError, read_manifest
from pipeline.inference.scoring import anomaly_map
from tests.conftest import FIXED

LEGACY_FLOOR = 0.5  # scoring.mad_floor of a bundle fitted without the choice

EXACT = RuntimeConfig(knn=KnnConfig(index="flat"))


@pytest.fixture(scope="module")
def stats_bundle(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset: Path, effnet_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("stats") / "bundle"
    # A bank of a quarter of the patches, so that a training image's own patches are often in it.
    cfg = Config(fit=FitConfig(position_folds=2, coreset=CoresetConfig(ratio=0.25), choose=FIXED.choose), runtime=EXACT)
    fit_bundle(data=synthetic_dataset / "train/good", out=out, cfg=cfg, model_dir=effnet_model_dir, progress=False)
    return out


def test_fit_writes_cross_fitted_statistics(stats_bundle: Path, synthetic_dataset: Path) -> None:
    m = read_manifest(stats_bundle)
    ps = m.position_stats
    assert ps is not None and ps.folds == 2 and ps.images == 10 and ps.grid == (16, 32) and ps.image_hw == (128, 256)
    assert POSITION_STATS_FILE in m.files
    with np.load(stats_bundle / POSITION_STATS_FILE) as z:
        median, mad = z["median"], z["mad"]
    mad = np.maximum(mad, np.float32(LEGACY_FLOOR * float(np.median(mad))))
    assert median.shape == mad.shape == (16, 32) and (mad > 0).all()
    # Cross-fitting: a training image scored against the bank that holds its own patches scores
    # lower than against a bank chosen without them, which is what the statistics describe.
    scorer = open_backend(stats_bundle, runtime=EXACT, scoring=ScoringConfig(position_normalise="none"))
    own = np.stack([scorer.score(read_image(f, 1)).patch_scores for f in list_images(synthetic_dataset / "train/good")])
    print(f"median patch score: cross-fitted {np.median(median):.3f}, against the full bank {np.median(own):.3f}")
    assert np.median(median) > 1.2 * np.median(own)


def test_scorer_scores_images_by_their_largest_2x2_mean_position_z_score(
    stats_bundle: Path, synthetic_dataset: Path
) -> None:
    image = read_image(next(iter(list_images(synthetic_dataset / "test" / "defect"))), 1)
    with np.load(stats_bundle / POSITION_STATS_FILE) as z:
        median, mad = z["median"], z["mad"]
    mad = np.maximum(mad, np.float32(LEGACY_FLOOR * float(np.median(mad))))
    raw = open_backend(stats_bundle, runtime=EXACT, scoring=ScoringConfig(position_normalise="none"))
    img = open_backend(stats_bundle, runtime=EXACT, scoring=ScoringConfig(position_normalise="image"))
    zmap = open_backend(stats_bundle, runtime=EXACT, scoring=ScoringConfig(position_normalise="map"))
    r_raw, r_img, r_map = raw.score(image), img.score(image), zmap.score(image)
    z = (r_raw.patch_scores - median) / mad
    windows = [z[i : i + 2, j : j + 2].mean() for i in range(z.shape[0] - 1) for j in range(z.shape[1] - 1)]
    assert r_img.score == pytest.approx(float(max(windows)), rel=1e-5)
    np.testing.assert_array_equal(r_img.anomaly_map, r_raw.anomaly_map)  # "image": the map stays raw
    assert r_map.score == pytest.approx(r_img.score)
    want = anomaly_map(z, stride=8, out_hw=image.shape[:2], sigma=ScoringConfig().sigma)
    np.testing.assert_allclose(r_map.anomaly_map, want, rtol=1e-5, atol=1e-5)  # "map": the map of z-scores
    # The line-scan path never uses them, even on a frame of the fitted size: strip rows are not
    # positions (its per-band thresholds are calibrated on raw scores).
    from pipeline.inference.framescore import FrameScorer

    framed = FrameScorer(scorer=zmap, tile=None, margin=0).score(image)
    assert framed.score == pytest.approx(r_raw.score)
    np.testing.assert_allclose(framed.anomaly_map, r_raw.anomaly_map, rtol=1e-5, atol=1e-5)
    # Another size: the statistics do not apply and the raw PatchCore score stands.
    other = np.ascontiguousarray(image[:96])
    assert img.score(other).score == pytest.approx(raw.score(other).score)


def test_fit_skips_statistics_for_mixed_image_sizes(tmp_path: Path, effnet_model_dir: Path) -> None:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(96, 128), (96, 128), (128, 96), (96, 128)]):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 256, (h, w), dtype=np.uint8))
    m = fit_bundle(data=tmp_path, out=tmp_path / "b", cfg=Config(fit=FIXED), model_dir=effnet_model_dir, progress=False)
    assert m.position_stats is None and POSITION_STATS_FILE not in m.files


def test_bad_statistics_and_settings_are_one_clear_error(stats_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from pipeline.inference.bundle import sha256_file, write_manifest

    b = tmp_path / "b"
    shutil.copytree(stats_bundle, b)
    np.savez(b / POSITION_STATS_FILE, median=np.zeros((3, 3), np.float32), mad=np.ones((3, 3), np.float32))
    m = read_manifest(stats_bundle)
    write_manifest(
        b, m.model_copy(update={"files": {**m.files, POSITION_STATS_FILE: sha256_file(b / POSITION_STATS_FILE)}})
    )
    with pytest.raises(BundleError, match=r"statistics of shape \(3, 3\), manifest says \(16, 32\)"):
        open_backend(b, runtime=EXACT, scoring=ScoringConfig())
    with pytest.raises(ConfigError, match="position_folds"):
        parse_config({"fit": {"position_folds": 1}})


def test_a_position_constant_on_normal_images_does_not_decide_the_image_score(
    stats_bundle: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:

    from pipeline.inference.bundle import sha256_file

    # One position whose normal scores never varied (MAD 1e-4, as on a black background).
    bundle = tmp_path / "b"
    shutil.copytree(stats_bundle, bundle)
    with np.load(bundle / POSITION_STATS_FILE) as z:
        median, mad = z["median"].copy(), z["mad"].copy()
    mad[3, 5] = 1e-4
    np.savez(bundle / POSITION_STATS_FILE, median=median, mad=mad)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][POSITION_STATS_FILE] = sha256_file(bundle / POSITION_STATS_FILE)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    image = read_image(next(iter(list_images(synthetic_dataset / "train" / "good"))), 1)
    floored = open_backend(bundle, runtime=EXACT, scoring=ScoringConfig(position_normalise="image"))
    bare = open_backend(bundle, runtime=EXACT, scoring=ScoringConfig(position_normalise="image", mad_floor=0.0))
    assert floored.position_stats is not None and bare.position_stats is not None
    assert floored.position_stats[1][3, 5] == pytest.approx(0.5 * float(np.median(mad)))
    assert bare.position_stats[1][3, 5] == pytest.approx(1e-4)
    # Without the floor a normal image's score is set by that one position's noise.
    assert bare.score(image).score > 10 * floored.score(image).score
