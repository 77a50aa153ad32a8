"""The backend registry: every registered kind opens a tiny real bundle through one call, and
what is not registered is refused in one line."""

from pathlib import Path

import numpy as np
import pytest

from calibration.ensemble import make_ensemble
from pipeline.acquisition.images import list_images, read_image
from pipeline.config import Config, KnnConfig, RuntimeConfig, ScoringConfig
from pipeline.errors import StripinspectError
from pipeline.inference.backends import REGISTRY, open_backend, open_frame_scorer, opener
from pipeline.inference.bundle import KINDS, BundleError

EXACT = Config(runtime=RuntimeConfig(knn=KnnConfig(index="flat")))


def test_the_registry_and_the_manifest_schema_name_the_same_kinds() -> None:
    assert KINDS == ("patchcore", "patch_svdd", "multiscale_patch", "ensemble")
    assert set(REGISTRY) == set(KINDS)


@pytest.fixture(scope="module")
def ensemble_bundle(
    tmp_path_factory: pytest.TempPathFactory, svdd_data: Path, svdd_bundle: Path, msp_bundle: Path
) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "e"
    make_ensemble(
        bundles=[svdd_bundle, msp_bundle],
        normal=svdd_data / "train" / "good",
        out=out,
        cfg=EXACT,
        every=4,
        progress=False,
    )
    return out


@pytest.fixture
def bundles(synthetic_bundle: Path, svdd_bundle: Path, msp_bundle: Path, ensemble_bundle: Path) -> dict[str, Path]:
    return {
        "patchcore": synthetic_bundle,
        "patch_svdd": svdd_bundle,
        "multiscale_patch": msp_bundle,
        "ensemble": ensemble_bundle,
    }


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_registered_kind_opens_scores_and_describes_itself(
    kind: str, bundles: dict[str, Path], svdd_data: Path
) -> None:
    backend = open_backend(bundles[kind], runtime=EXACT.runtime, scoring=ScoringConfig())
    assert backend.kind == kind == backend.manifest.kind
    described = backend.describe()
    assert described["kind"] == kind and described["channels"] == backend.channels == 1
    assert {"backbone", "bank_rows", "scale"} <= set(described)
    image = read_image(list_images(svdd_data / "test" / "defect")[0], backend.channels)
    result = backend.score(backend.check_image(image))
    assert result.anomaly_map.shape == image.shape[:2] and np.isfinite(result.score)
    assert backend.manifest.band_thresholds is None  # uncalibrated; thresholds_read_alike covers calibrated ones


# PatchCore frames are embedded in tiles here; the encoders embed whole frames (tile None).
FRAME_TILE = {"patchcore": 128, "patch_svdd": None, "multiscale_patch": None}


@pytest.mark.parametrize("kind", sorted(FRAME_TILE))
def test_every_kind_that_scores_strip_frames_hands_out_the_daemons_frame_scorer(
    kind: str, bundles: dict[str, Path]
) -> None:
    fs = open_frame_scorer(
        bundles[kind], runtime=EXACT.runtime, scoring=ScoringConfig(), tile=FRAME_TILE[kind], margin=32
    )
    assert fs.scorer.kind == kind
    frame = np.random.default_rng(0).integers(0, 256, (256, 256, 1), dtype=np.uint8)
    feats = fs.features(fs.scorer.check_image(frame))
    band, first, score = fs.search_band(feats, valid=(64, 192), lines=256)
    amap = fs.band_map(band, first, out_hw=(256, 256))
    assert amap.shape == (256, 256) and np.isfinite(score)
    np.testing.assert_allclose(amap[64:192], fs.score(frame).anomaly_map[64:192], rtol=1e-5)


def test_an_ensemble_refuses_strip_frames_in_one_line(bundles: dict[str, Path]) -> None:
    assert set(FRAME_TILE) == set(REGISTRY) - {"ensemble"}
    with pytest.raises(StripinspectError, match=r"^\S+: an ensemble scores images \(evaluate\); .*one bundle$"):
        open_frame_scorer(bundles["ensemble"], runtime=EXACT.runtime, scoring=ScoringConfig(), tile=None, margin=0)


def test_an_unknown_kind_is_refused_in_one_line(synthetic_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(
        BundleError,
        match=r"^kind 'gan' is not a registered backend \(known: patchcore, patch_svdd, multiscale_patch, ensemble\)$",
    ):
        opener("gan")
    import json
    import shutil

    b = tmp_path / "b"
    shutil.copytree(synthetic_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({**m, "kind": "gan"}))
    with pytest.raises(BundleError, match=r"^\S+manifest.json: kind 'gan' is not a registered backend \(known: .*\)$"):
        open_backend(b, runtime=EXACT.runtime, scoring=ScoringConfig())
