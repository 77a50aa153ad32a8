import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.acquisition.synthetic import SyntheticStrip
from pipeline.config import RuntimeConfig, ScoringConfig
from pipeline.inference.bundle import INDEX_FILE, MANIFEST_FILE, MODEL_FILE, BundleError, read_manifest, sha256_file
from pipeline.inference.patchcore import PatchCoreScorer


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(bundle: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = bundle / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _open(bundle: Path) -> PatchCoreScorer:
    return PatchCoreScorer.open(bundle, runtime=RuntimeConfig(), scoring=ScoringConfig())


def test_manifest_describes_the_bundle(synthetic_bundle: Path) -> None:
    m = read_manifest(synthetic_bundle)
    assert m.features.backbone == "efficientnet_lite0"
    assert m.features.layers == ("_blocks.4", "_blocks.10")
    assert m.features.embedding_dim == 152
    assert m.input.channels == 1 and m.input.mean == (127.0, 127.0, 127.0) and m.input.std == (128.0,) * 3
    assert m.index.type == "flat" and m.index.rows == m.coreset.rows
    assert m.fitted_on.images == 10
    assert set(m.files) >= {MODEL_FILE, INDEX_FILE}
    for name, digest in m.files.items():
        assert sha256_file(synthetic_bundle / name) == digest


def test_tampered_index_is_refused(synthetic_bundle: Path, tmp_path: Path) -> None:
    b = _copy(synthetic_bundle, tmp_path)
    with open(b / INDEX_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"index.faiss sha256 .* does not match"):
        _open(b)


def test_missing_model_is_refused(synthetic_bundle: Path, tmp_path: Path) -> None:
    b = _copy(synthetic_bundle, tmp_path)
    (b / MODEL_FILE).unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        _open(b)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle"):
        _open(tmp_path)


def test_wrong_embedding_dim_is_refused(synthetic_bundle: Path, tmp_path: Path) -> None:
    b = _copy(synthetic_bundle, tmp_path)
    _edit_manifest(b, lambda d: d["features"].update(embedding_dim=64))
    with pytest.raises(BundleError, match="embeds 152 dims, manifest says 64"):
        _open(b)


def test_wrong_row_count_is_refused(synthetic_bundle: Path, tmp_path: Path) -> None:
    b = _copy(synthetic_bundle, tmp_path)
    _edit_manifest(b, lambda d: d["index"].update(rows=d["index"]["rows"] + 1))
    with pytest.raises(BundleError, match="rows, manifest says"):
        _open(b)


def test_unknown_schema_and_garbage_manifest(synthetic_bundle: Path, tmp_path: Path) -> None:
    b = _copy(synthetic_bundle, tmp_path)
    _edit_manifest(b, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99 not supported"):
        _open(b)
    (b / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        _open(b)


def test_manifest_with_extra_field_or_path_in_file_name(synthetic_bundle: Path, tmp_path: Path) -> None:
    b = _copy(synthetic_bundle, tmp_path)
    _edit_manifest(b, lambda d: d.update(pickle="x"))
    with pytest.raises(BundleError, match="pickle"):
        _open(b)
    b2 = _copy(synthetic_bundle, tmp_path / "2")
    _edit_manifest(b2, lambda d: d["files"].update({"../etc/passwd": "0" * 64}))
    with pytest.raises(BundleError, match="must not contain a path"):
        _open(b2)


def test_scorer_checks_images(synthetic_bundle: Path) -> None:
    scorer = _open(synthetic_bundle)
    with pytest.raises(ValueError, match="channel"):
        scorer.score(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="smaller"):
        scorer.score(np.zeros((8, 64), np.uint8))


def test_scorer_finds_a_planted_pit(synthetic_bundle: Path) -> None:
    from pipeline.acquisition.synthetic import PlantedDefect

    scorer = _open(synthetic_bundle)
    strip = SyntheticStrip(width=256, seed=3)
    clean, _ = strip.render(5000, 128)
    bad, mask = strip.render(5000, 128, [PlantedDefect(kind="pit", line=5060, col=120, size=10, seed=1)])
    r_clean, r_bad = scorer.score(clean), scorer.score(bad)
    assert r_bad.score > 1.2 * r_clean.score
    assert r_bad.anomaly_map.shape == (128, 256)
    y, x = np.unravel_index(np.argmax(r_bad.anomaly_map), r_bad.anomaly_map.shape)
    assert abs(y - 60) <= 10 and abs(x - 120) <= 10
    assert r_bad.anomaly_map[mask].mean() > np.percentile(r_bad.anomaly_map[~mask], 99)


def test_a_learned_encoder_bundle_is_refused_by_patchcore_tools_in_one_line(svdd_bundle: Path) -> None:
    # calibrate thresholds and the other PatchCore-only tools read the manifest this way.
    with pytest.raises(BundleError, match=r"^.*: a 'patch_svdd' bundle; this needs a PatchCore bundle$"):
        read_manifest(svdd_bundle)
