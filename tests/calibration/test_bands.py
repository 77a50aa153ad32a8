"""Per-band thresholds from normal strip only hold the false-alarm budget on held-out strip."""

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.bands import band_edges
from calibration.thresholds import calibrate_thresholds, normal_maps_from_strip, synthetic_normal_frames
from pipeline.acquisition.sources import SyntheticSource
from pipeline.acquisition.synthetic import SyntheticStrip
from pipeline.config import DaemonConfig, RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.framescore import FrameScorer
from pipeline.postprocess.defects import extract_defects, per_column
from pipeline.service.daemon import Daemon
from pipeline.transport.messages import Frame

FRAME, OVERLAP, MM_PX, MM_LINE = 768, 384, 0.5, 5.0
TARGET = 1000.0  # alarms per km: high enough to measure on a test-sized run (about 75 alarms)


def test_bands_are_equal_and_cover_the_width() -> None:
    assert band_edges(256, 4) == [0, 64, 128, 192, 256]
    np.testing.assert_array_equal(per_column([0, 2, 5], [1.0, 3.0]), [1, 1, 3, 3, 3])


def test_calibrated_rate_holds_on_held_out_strip(strip_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(strip_bundle, bundle)
    fs = FrameScorer(scorer=open_backend(bundle, runtime=RuntimeConfig(), scoring=ScoringConfig()), tile=None, margin=0)
    strip = SyntheticStrip(width=256, seed=3)

    def run(first_line: int) -> list[np.ndarray]:
        frames = synthetic_normal_frames(strip, first_line=first_line, frames=40, frame_lines=FRAME, overlap=OVERLAP)
        return normal_maps_from_strip(fs, frames)

    cal_maps = run(400_000)
    metres = sum(m.shape[0] for m in cal_maps) * MM_LINE / 1000
    result = calibrate_thresholds(
        bundle=bundle,
        maps=cal_maps,
        metres=metres,
        n_bands=4,
        target_per_km=TARGET,
        min_area_mm2=5.0,
        mm_per_px=MM_PX,
        mm_per_line=MM_LINE,
        calibrated_on="synthetic seed 3 lines 400000+",
        out_dir=tmp_path / "report",
    )
    assert len(result.thresholds) == 4 and metres > 70
    # Held-out normal strip, alarms counted exactly as the daemon counts them.
    held = run(900_000)
    cols = per_column(result.band_edges_px, result.thresholds)
    alarms = 0
    for m in held:
        frame = Frame(
            frame_id=0,
            camera_id="c",
            pixels=np.zeros((m.shape[0], 256, 1), np.uint8),
            first_line=0,
            valid_from=0,
            valid_to=m.shape[0],
            capture_time=0.0,
            md_m=0.0,
        )
        alarms += len(
            extract_defects(m, frame=frame, threshold=cols, min_area_px=2, mm_per_px=MM_PX, mm_per_line=MM_LINE)
        )
    held_metres = sum(m.shape[0] for m in held) * MM_LINE / 1000
    rate = alarms / held_metres * 1000
    print(f"held-out normal strip: {alarms} alarms on {held_metres:.1f} m = {rate:.0f}/km (target {TARGET:.0f})")
    assert TARGET / 2 <= rate <= 2 * TARGET, f"{alarms} alarms on {held_metres:.0f} m = {rate:.0f}/km"
    report = json.loads((tmp_path / "report" / "thresholds.json").read_text())
    assert report["thresholds"] == result.thresholds and report["min_area_px"] == 2
    png = cv2.imread(str(tmp_path / "report" / "thresholds.png"))
    assert png is not None and (png.std(axis=2) > 40).sum() > 200  # coloured curves were drawn
    # The daemon takes the bands from the bundle when the config sets no threshold.
    src = SourceConfig(strip_lines=10)
    d = Daemon(
        cfg=DaemonConfig(
            bundle=bundle, pub_endpoint="tcp://127.0.0.1:*", control_endpoint="tcp://127.0.0.1:*", source=src
        ),
        runtime=RuntimeConfig(),
        scoring=ScoringConfig(),
        source=SyntheticSource(cfg=src, width=256, seed=3, frame_lines=1024),
    )
    assert d.slot.threshold_json() == pytest.approx(result.thresholds, rel=1e-6)
    d.join(1)


def test_drift_is_reported_against_the_calibration(strip_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(strip_bundle, bundle)
    fs = FrameScorer(scorer=open_backend(bundle, runtime=RuntimeConfig(), scoring=ScoringConfig()), tile=None, margin=0)
    strip = SyntheticStrip(width=256, seed=3)
    maps = normal_maps_from_strip(
        fs, synthetic_normal_frames(strip, first_line=400_000, frames=12, frame_lines=FRAME, overlap=OVERLAP)
    )
    calibrate_thresholds(
        bundle=bundle,
        maps=maps,
        metres=20.0,
        n_bands=2,
        target_per_km=100.0,
        min_area_mm2=5.0,
        mm_per_px=MM_PX,
        mm_per_line=MM_LINE,
        calibrated_on="test",
        out_dir=tmp_path / "r",
    )

    class AgedLamp:
        """The same strip under a lamp that lost 30 % of its light."""

        def __init__(self, inner: SyntheticSource) -> None:
            self.inner, self.width, self.channels = inner, inner.width, inner.channels

        def read(self, timeout: float):  # type: ignore[no-untyped-def]
            b = self.inner.read(timeout)
            return None if b is None else replace(b, pixels=(b.pixels * 0.7).astype(np.uint8))

        def close(self) -> None:
            self.inner.close()

    def run(seed: int, aged: bool = False) -> dict:
        src = SourceConfig(
            block_lines=384,
            line_rate_hz=None,
            plant_defects=False,
            strip_lines=OVERLAP + 10 * (FRAME - OVERLAP),
            first_line=700_000,
        )
        cfg = DaemonConfig(
            bundle=bundle,
            frame_lines=FRAME,
            overlap_lines=OVERLAP,
            queue_frames=64,
            drift_bound=0.03,  # scores move less than the light: a 30 % dimmer lamp raised them about 6 %
            pub_endpoint="tcp://127.0.0.1:*",
            control_endpoint="tcp://127.0.0.1:*",
            source=src,
        )
        source = SyntheticSource(cfg=src, width=256, seed=seed, frame_lines=FRAME)
        d = Daemon(
            cfg=cfg,
            runtime=RuntimeConfig(),
            scoring=ScoringConfig(),
            source=AgedLamp(source) if aged else source,
        )
        d.run_until_done()
        return d.drift()

    same = run(3)
    assert same["drifting"] is False and abs(same["drift_ratio"] - 1) < 0.03
    aged = run(3, aged=True)
    print(f"drift ratio: same lamp {same['drift_ratio']:.3f}, aged lamp {aged['drift_ratio']:.3f}")
    assert aged["drifting"] is True and aged["drift_ratio"] > 1.03


def test_reload_picks_up_recalibrated_band_thresholds(strip_bundle: Path, tmp_path: Path) -> None:
    import zmq

    bundle = tmp_path / "b"
    shutil.copytree(strip_bundle, bundle)
    fs = FrameScorer(scorer=open_backend(bundle, runtime=RuntimeConfig(), scoring=ScoringConfig()), tile=None, margin=0)
    strip = SyntheticStrip(width=256, seed=3)
    maps = normal_maps_from_strip(
        fs, synthetic_normal_frames(strip, first_line=400_000, frames=8, frame_lines=FRAME, overlap=OVERLAP)
    )

    def calibrate(target: float) -> list[float]:
        return calibrate_thresholds(
            bundle=bundle,
            maps=maps,
            metres=20.0,
            n_bands=2,
            target_per_km=target,
            min_area_mm2=5.0,
            mm_per_px=MM_PX,
            mm_per_line=MM_LINE,
            calibrated_on="test",
            out_dir=tmp_path / "r",
        ).thresholds

    loose = calibrate(1000.0)
    src = SourceConfig(block_lines=384, line_rate_hz=4000, plant_defects=False, strip_lines=None, first_line=0)
    ctx = zmq.Context()
    d = Daemon(
        cfg=DaemonConfig(
            bundle=bundle,
            frame_lines=FRAME,
            overlap_lines=OVERLAP,
            queue_frames=64,
            pub_endpoint="tcp://127.0.0.1:*",
            control_endpoint="tcp://127.0.0.1:*",
            source=src,
        ),
        runtime=RuntimeConfig(),
        scoring=ScoringConfig(),
        source=SyntheticSource(cfg=src, width=256, seed=3, frame_lines=FRAME),
        context=ctx,
    )
    assert d.slot.threshold_json() == pytest.approx(loose, rel=1e-6)
    d.start()
    strict = calibrate(50.0)  # rewrites the bundle's manifest while the daemon runs
    assert strict != loose
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 20_000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(d.control_endpoint)
    req.send_json({"cmd": "reload"})
    assert req.recv_json()["ok"] is True
    for _ in range(80):
        if d.slot.threshold_json() == pytest.approx(strict, rel=1e-6):
            break
        threading.Event().wait(0.25)
    req.close(0)
    d.stop()
    d.join()
    ctx.term()
    assert d.slot.threshold_json() == pytest.approx(strict, rel=1e-6)
