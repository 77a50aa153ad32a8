"""Ensemble of PatchCore and Patch SVDD bundles: normalised by normal statistics, averaged."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from calibration.ensemble import EnsembleError, make_ensemble
from calibration.evaluate import evaluate
from export.fit import fit_bundle
from pipeline.acquisition.images import list_images, read_image
from pipeline.config import Config, KnnConfig, RuntimeConfig, ScoringConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.bundle import BundleError
from tests.conftest import FIXED

EXACT = Config(runtime=RuntimeConfig(knn=KnnConfig(index="flat")))


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory, svdd_data: Path, svdd_bundle: Path, effnet_model_dir: Path):
    pc = tmp_path_factory.mktemp("pc") / "bundle"
    fit_bundle(
        data=svdd_data / "train" / "good", out=pc, cfg=Config(fit=FIXED), model_dir=effnet_model_dir, progress=False
    )
    return pc, svdd_bundle


def test_ensemble_averages_the_normalised_member_maps(members, svdd_data: Path, tmp_path: Path) -> None:
    pc, svdd = members
    m = make_ensemble(
        bundles=[pc, svdd], normal=svdd_data / "train" / "good", out=tmp_path / "e", cfg=EXACT, progress=False
    )
    assert m.fitted_on.images == 8 and len(m.members) == 2
    assert all(s.map_scale > 0 and s.score_scale > 0 for s in m.members)
    scorer = open_backend(tmp_path / "e", runtime=EXACT.runtime, scoring=ScoringConfig())
    image = read_image(list_images(svdd_data / "test" / "defect")[0], 1)
    got = scorer.score(image)
    want_maps, want_scores = [], []
    for spec, bundle in zip(m.members, (pc, svdd), strict=True):
        r = open_backend(bundle, runtime=EXACT.runtime, scoring=ScoringConfig()).score(image)
        want_maps.append((r.anomaly_map - spec.map_median) / spec.map_scale)
        want_scores.append((r.score - spec.score_median) / spec.score_scale)
    np.testing.assert_allclose(got.anomaly_map, np.mean(want_maps, axis=0), rtol=1e-5, atol=1e-6)
    assert got.score == pytest.approx(float(np.mean(want_scores)))
    metrics = evaluate(
        bundle=tmp_path / "e", data=svdd_data, out=tmp_path / "m" / "metrics.json", cfg=EXACT, progress=False
    )
    print({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")})
    assert metrics["backbone"] == "ensemble" and metrics["images"] == 8


def test_a_changed_member_or_bad_request_is_one_clear_error(members, svdd_data: Path, tmp_path: Path) -> None:
    pc, svdd = members
    with pytest.raises(EnsembleError, match="at least 2 bundles"):
        make_ensemble(bundles=[pc], normal=svdd_data / "train" / "good", out=tmp_path / "x", cfg=EXACT, progress=False)
    pc2 = tmp_path / "pc2"
    shutil.copytree(pc, pc2)
    make_ensemble(
        bundles=[pc2, svdd], normal=svdd_data / "train" / "good", out=tmp_path / "e", cfg=EXACT, every=2, progress=False
    )
    manifest = json.loads((pc2 / "manifest.json").read_text())
    manifest["created_utc"] = "2000-01-01T00:00:00Z"
    (pc2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="changed since the ensemble was made"):
        open_backend(tmp_path / "e", runtime=EXACT.runtime, scoring=ScoringConfig())
