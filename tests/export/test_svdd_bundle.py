"""`fit --backend svdd` end to end on the synthetic strip; the map rule of Patch SVDD sec. 3.4."""

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.evaluate import evaluate
from pipeline.acquisition.images import read_image
from pipeline.config import Config, KnnConfig, RuntimeConfig, ScoringConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.bundle import BundleError
from pipeline.inference.scoring import patch_mean_map
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


def test_fit_writes_a_bundle_that_evaluate_scores(svdd_bundle: Path, svdd_data: Path, tmp_path: Path) -> None:
    m = json.loads((svdd_bundle / "manifest.json").read_text())
    assert m["kind"] == "patch_svdd" and [s["patch"] for s in m["scales"]] == [64, 32]
    assert m["training"]["verified_relative_error"] <= 1e-4 and (svdd_bundle / "loss.png").is_file()
    metrics = evaluate(bundle=svdd_bundle, data=svdd_data, out=tmp_path / "metrics.json", cfg=Config(), progress=False)
    print({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "seconds_per_image")})
    assert metrics["backbone"] == "patch_svdd" and metrics["images"] == 8
    # The map is the product of the two scales' patch-mean maps; the image score is its max.
    scorer = open_backend(svdd_bundle, runtime=RuntimeConfig(knn=KnnConfig(index="flat")), scoring=ScoringConfig())
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
    with pytest.raises(BundleError, match=r"index32.faiss sha256 .* does not match manifest"):
        open_backend(b, runtime=RuntimeConfig(), scoring=ScoringConfig())


def test_band_maps_equal_the_whole_frame_map_on_the_valid_rows(svdd_bundle: Path) -> None:
    from pipeline.acquisition.synthetic import SyntheticStrip
    from pipeline.inference.framescore import EncoderFrameScorer

    scorer = open_backend(svdd_bundle, runtime=RuntimeConfig(knn=KnnConfig(index="flat")), scoring=ScoringConfig())
    fs = EncoderFrameScorer(scorer=scorer, tile=None)
    frame = SyntheticStrip(width=256, seed=5).render(3000, 768)[0][:, :, None]
    whole = fs.score(frame).anomaly_map
    feats = fs.features(frame)
    for valid in [(192, 576), (0, 384), (400, 768)]:
        band, first, _ = fs.search_band(feats, valid=valid, lines=768)
        got = fs.band_map(band, first, out_hw=(768, 256))
        # faiss computes L2 as |a|^2 + |b|^2 - 2ab, whose rounding depends on the batch: equal
        # up to float32 cancellation, relative to the frame's largest score.
        np.testing.assert_allclose(
            got[valid[0] : valid[1]], whole[valid[0] : valid[1]], rtol=1e-4, atol=1e-3 * float(whole.max())
        )
        assert not got[: band.rows[0]].any() and not got[band.rows[1] :].any()
    with pytest.raises(ValueError, match="tile: null"):
        EncoderFrameScorer(scorer=scorer, tile=256)


def test_the_daemon_serves_an_svdd_bundle(svdd_bundle: Path) -> None:
    import zmq

    from calibration.thresholds import threshold_above_normal
    from pipeline.acquisition.sources import SyntheticSource
    from pipeline.acquisition.synthetic import SyntheticStrip
    from pipeline.config import SourceConfig
    from pipeline.inference.framescore import EncoderFrameScorer
    from pipeline.service.daemon import Daemon
    from pipeline.transport.listen import collect_run

    fs = EncoderFrameScorer(
        scorer=open_backend(svdd_bundle, runtime=RuntimeConfig(), scoring=ScoringConfig()), tile=None
    )
    strip = SyntheticStrip(width=256, seed=1)
    threshold = threshold_above_normal(fs, (strip.render(50_000 + k * 768, 768)[0][:, :, None] for k in range(4)))
    frames = 8
    src = SourceConfig(
        block_lines=128,
        line_rate_hz=None,
        strip_lines=384 + frames * 384,
        defects_per_100_frames=200,
        roll_period_lines=None,
    )
    cfg = loopback_daemon_config(
        bundle=svdd_bundle,
        threshold=threshold,
        frame_lines=768,
        overlap_lines=384,
        queue_frames=1000,  # the synthetic camera is unpaced: keep every frame
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        source=src,
    )
    ctx = zmq.Context()
    source = SyntheticSource(cfg=src, width=256, seed=1, frame_lines=768)
    daemon = Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source, context=ctx)
    daemon.start(acquire=False)
    messages, report = collect_run(
        endpoint=daemon.publisher.endpoint,
        topics=("frame", "alert"),
        start=daemon.start_acquisition,
        context=ctx,
        timeout_s=120,
    )
    daemon.join()
    stats = daemon.stats.snapshot()
    ctx.term()
    frame_msgs = [h for t, h in messages if t == "frame"]
    alerts = [h for t, h in messages if t == "alert"]
    print(f"frames {len(frame_msgs)}, alerts {len(alerts)}, planted {len(source.planted)}, drops {stats['drops']}")
    assert len(frame_msgs) == frames and not stats["drops"] and not report.gaps
    assert all(np.isfinite(f["max_score"]) for f in frame_msgs)
    assert alerts, "planted defects on a strip the encoder never saw should raise alerts"


def test_thresholds_calibrated_for_an_encoder_bundle_drive_the_daemon(
    svdd_bundle: Path, svdd_data: Path, tmp_path: Path
) -> None:
    import shutil

    import zmq

    from pipeline.acquisition.sources import SyntheticSource
    from pipeline.config import SourceConfig
    from pipeline.inference.bundle import read_manifest
    from pipeline.postprocess.defects import per_column
    from pipeline.service.daemon import Daemon
    from stripinspect.cli import main

    bundle = tmp_path / "b"
    shutil.copytree(svdd_bundle, bundle)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("synthetic:\n  width: 256\n  seed: 1\ndaemon:\n  frame_lines: 768\n  overlap_lines: 384\n")
    args = ["calibrate", "thresholds", "--config", str(cfg_file), "--bundle", str(bundle), "--frames", "4"]
    args += ["--bands", "2", "--alarms-per-km", "500", "--min-area-mm2", "1", "--out", str(tmp_path / "r")]
    assert main([*args, "--labelled", str(svdd_data), "--quiet"]) == 0
    bands = read_manifest(bundle).band_thresholds
    assert bands is not None and bands.band_edges_px == [0, 128, 256] and len(bands.thresholds) == 2
    assert all(t > 0 for t in bands.thresholds) and (tmp_path / "r" / "labelled.json").is_file()
    open_backend(bundle, runtime=RuntimeConfig(), scoring=ScoringConfig())  # the rewritten manifest still verifies
    src = SourceConfig(block_lines=128, line_rate_hz=None, plant_defects=False, strip_lines=2000)
    cfg = loopback_daemon_config(bundle=bundle, threshold=None, frame_lines=768, overlap_lines=384, source=src)
    ctx = zmq.Context()
    daemon = Daemon(
        cfg=cfg,
        runtime=RuntimeConfig(),
        scoring=ScoringConfig(),
        source=SyntheticSource(cfg=src, width=256, seed=1, frame_lines=768),
        context=ctx,
    )
    try:
        np.testing.assert_array_equal(daemon.threshold, per_column(bands.band_edges_px, bands.thresholds))
    finally:
        daemon.join()
        ctx.term()
