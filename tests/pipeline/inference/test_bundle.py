import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.acquisition.synthetic import SyntheticStrip
from pipeline.config import RuntimeConfig, ScoringConfig
from pipeline.inference.backends import Backend, open_backend
from pipeline.inference.bundle import (
    INDEX_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    BundleError,
    PatchCoreManifest,
    read_manifest,
    sha256_file,
)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(bundle: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = bundle / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _open(bundle: Path) -> Backend:
    return open_backend(bundle, runtime=RuntimeConfig(), scoring=ScoringConfig())


def test_manifest_describes_the_bundle(synthetic_bundle: Path) -> None:
    m = read_manifest(synthetic_bundle)
    assert isinstance(m, PatchCoreManifest) and m.kind == "patchcore" and m.schema_version == 2
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
    # The verifier reads the bank's header before any session opens.
    with pytest.raises(BundleError, match="index.faiss holds 152 dims, manifest says 64"):
        _open(b)


def test_wrong_row_count_is_refused(synthetic_bundle: Path, tmp_path: Path) -> None:
    b = _copy(synthetic_bundle, tmp_path)
    _edit_manifest(b, lambda d: d["index"].update(rows=d["index"]["rows"] + 1))
    with pytest.raises(BundleError, match=r"index.faiss holds \d+ rows, manifest says \d+$"):
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
    with pytest.raises(ValueError, match="smaller than 8 x 8"):
        scorer.score(np.zeros((4, 64), np.uint8))
    # Under the graph's 48 px minimum an image is enlarged for the network, its map sized back.
    small = scorer.score(np.full((40, 64), 120, np.uint8))
    assert small.anomaly_map.shape == (40, 64) and np.isfinite(small.score)


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


def test_a_bundle_of_another_kind_is_refused_by_the_patchcore_opener_in_one_line(svdd_bundle: Path) -> None:
    # The registry never does this; an opener handed the wrong manifest still says so in one line.
    from pipeline.inference.patchcore import open_bundle

    with pytest.raises(BundleError, match=r"^.*: a 'patch_svdd' bundle is not a PatchCore bundle$"):
        open_bundle(svdd_bundle, read_manifest(svdd_bundle), runtime=RuntimeConfig(), scoring=ScoringConfig())


def test_the_embedding_dim_of_the_model_is_checked_when_the_session_opens(synthetic_bundle: Path) -> None:
    # A manifest and bank agreeing with each other but not with the ONNX graph.
    from pipeline.inference.patchcore import open_bundle

    m = read_manifest(synthetic_bundle)
    assert isinstance(m, PatchCoreManifest)
    wrong = m.model_copy(update={"features": m.features.model_copy(update={"embedding_dim": 64})})
    with pytest.raises(BundleError, match="embeds 152 dims, manifest says 64"):
        open_bundle(synthetic_bundle, wrong, runtime=RuntimeConfig(), scoring=ScoringConfig())


def _v1_patchcore(v2: dict) -> dict:
    """A manifest as the old main wrote it for PatchCore: schema 1, no kind."""
    return {**{k: v for k, v in v2.items() if k != "kind"}, "schema_version": 1}


def _v1_encoder(v2: dict) -> dict:
    """As the old main wrote it for Patch SVDD: schema 1, channels at the top, data in training."""
    old = {k: v for k, v in v2.items() if k not in ("input", "fitted_on")}
    old["training"] = {**v2["training"], "fitted_on": v2["fitted_on"]["data"]}
    return {**old, "schema_version": 1, "channels": v2["input"]["channels"]}


def _member(bundle: str, digest: str) -> dict:
    return {"bundle": bundle, "manifest_sha256": digest, "map_median": 1.0, "map_scale": 1.0} | {
        "score_median": 1.0,
        "score_scale": 1.0,
    }


# As the old main wrote an ensemble: schema 1, members, normal_data and normal_images.
V1_ENSEMBLE = {
    "schema_version": 1,
    "kind": "ensemble",
    "created_utc": "2026-11-30T10:00:00Z",
    "members": [_member("../pc", "0" * 64), _member("../svdd", "1" * 64)],
    "normal_data": "/data/normal",
    "normal_images": 40,
}


@pytest.mark.parametrize("shape", ["patchcore", "patch_svdd", "ensemble"])
def test_a_schema_1_bundle_of_each_old_shape_is_refused_with_how_to_refit_it(
    shape: str, synthetic_bundle: Path, svdd_bundle: Path, tmp_path: Path
) -> None:
    if shape == "patchcore":
        b = _copy(synthetic_bundle, tmp_path)
        data = read_manifest(synthetic_bundle).fitted_on.data
        (b / MANIFEST_FILE).write_text(json.dumps(_v1_patchcore(json.loads((b / MANIFEST_FILE).read_text()))))
        what, want = "a PatchCore bundle", f"'stripinspect fit --data {data} --out {b}'"
    elif shape == "patch_svdd":
        b = _copy(svdd_bundle, tmp_path)
        data = read_manifest(svdd_bundle).fitted_on.data
        (b / MANIFEST_FILE).write_text(json.dumps(_v1_encoder(json.loads((b / MANIFEST_FILE).read_text()))))
        what, want = "a Patch SVDD bundle", f"'stripinspect fit --backend svdd --data {data} --out {b}'"
    else:
        b = tmp_path / "e"
        b.mkdir()
        (b / MANIFEST_FILE).write_text(json.dumps(V1_ENSEMBLE))
        what = "an ensemble"
        want = f"'stripinspect ensemble --bundles ../pc ../svdd --normal /data/normal --out {b}'"
    with pytest.raises(BundleError) as err:
        _open(b)
    assert str(err.value) == (
        f"bundle {b}: manifest schema 1 ({what} written before stripinspect 0.2); refit it with {want}"
    )


def test_an_unknown_kind_or_a_kind_part_that_does_not_fit_is_refused_in_one_line(
    synthetic_bundle: Path, tmp_path: Path
) -> None:
    b = _copy(synthetic_bundle, tmp_path)
    _edit_manifest(b, lambda d: d.update(kind="gan"))
    with pytest.raises(BundleError, match=r"kind 'gan' is not a registered backend \(known: patchcore, .*\)$"):
        _open(b)
    b2 = _copy(synthetic_bundle, tmp_path / "2")
    # A PatchCore manifest that calls itself an encoder lacks the encoder's part.
    _edit_manifest(b2, lambda d: d.update(kind="patch_svdd"))
    with pytest.raises(BundleError, match=r"manifest.json: [a-z_.]+ = .*: .*$"):
        _open(b2)


def test_the_thresholds_are_read_alike_from_every_kind(synthetic_bundle: Path, svdd_bundle: Path) -> None:
    for bundle in (synthetic_bundle, svdd_bundle):
        m = read_manifest(bundle)
        assert m.pixel_threshold == (m.thresholds or {}).get("pixel")
        assert m.files and all(sha256_file(bundle / n) == h for n, h in m.files.items())
