import json
import subprocess
import sys
from pathlib import Path

import pytest

from stripinspect.cli import main
from tests.conftest import REPO


def test_check_config_ok_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "config.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("fit:\n  coreset:\n    ratio: 0\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "fit.coreset.ratio = 0" in err and len(err.splitlines()) == 1


def test_presets_validate_and_config_yaml_states_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.config import Config, load_config

    for preset in sorted((REPO / "presets").glob("*.yaml")):
        assert main(["check-config", str(preset)]) == 0, preset
    gpu = load_config(REPO / "presets" / "train-gpu.yaml")
    assert gpu.svdd.device == gpu.msp.device == "cuda" and gpu.msp.iterations > Config().msp.iterations
    # config.yaml documents the defaults: loading it gives the schema's defaults, less the
    # sections the demo points elsewhere.
    assert load_config(REPO / "config.yaml").msp == Config().msp
    assert load_config(REPO / "config.yaml").scoring == Config().scoring
    assert load_config(REPO / "config.yaml").fit == Config().fit


def test_console_script_runs_without_torch_for_runtime_commands(tmp_path: Path) -> None:
    # check-config is a runtime command: the CLI module must not pull in torch to run it.
    code = (
        "import sys; from stripinspect.cli import main; rc = main(['check-config', 'config.yaml']); "
        "print('torch' in sys.modules); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("False")


def test_fit_with_missing_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["fit", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "b"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'none'}: not a directory"


def test_evaluate_with_broken_bundle_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", "--bundle", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "m.json")])
    assert rc == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_export_then_fit_then_evaluate(
    tmp_path: Path, synthetic_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fit:\n  coreset:\n    ratio: 0.02\n")
    assert main(["export", "--config", str(cfg), "--out", str(tmp_path / "m")]) == 0
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--quiet",
                "--data",
                str(synthetic_dataset / "train/good"),
                "--out",
                str(tmp_path / "b"),
                "--model",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--config",
                str(cfg),
                "--quiet",
                "--bundle",
                str(tmp_path / "b"),
                "--data",
                str(synthetic_dataset),
                "--out",
                str(tmp_path / "e" / "metrics.json"),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 8 and printed["image_auroc"] >= 0.9


def test_calibrate_flatfield_then_daemon_applies_it(
    tmp_path: Path, strip_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import cv2
    import numpy as np
    import zmq

    from pipeline.acquisition.sources import SyntheticSource
    from pipeline.acquisition.synthetic import LineCamera, SyntheticStrip, uniform_target
    from pipeline.config import DaemonConfig, RuntimeConfig, ScoringConfig, SourceConfig
    from pipeline.service.daemon import Daemon

    strip = SyntheticStrip(width=256, seed=3)
    cam = LineCamera.random(width=256, seed=5)
    (tmp_path / "dark").mkdir()
    for k in range(2):
        cv2.imwrite(str(tmp_path / "dark" / f"{k}.png"), cam.capture(np.zeros((64, 256), np.float32), seed=k))
    cv2.imwrite(str(tmp_path / "white.png"), cam.capture(uniform_target(strip, lines=128, level=120), seed=7))
    assert (
        main(
            [
                "calibrate",
                "flatfield",
                "--dark",
                str(tmp_path / "dark"),
                "--white",
                str(tmp_path / "white.png"),
                "--out",
                str(tmp_path / "ff"),
            ]
        )
        == 0
    )
    assert "column profile CV" in capsys.readouterr().out
    report = json.loads((tmp_path / "ff" / "flatfield.json").read_text())
    assert report["lines_dark"] == 128 and report["profile_cv_after"] <= 0.01
    # too few lines: refused with one line
    assert (
        main(
            [
                "calibrate",
                "flatfield",
                "--dark",
                str(tmp_path / "white.png"),
                "--white",
                str(tmp_path / "dark" / "0.png"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    src = SourceConfig(block_lines=128, line_rate_hz=None, plant_defects=False, strip_lines=1024, first_line=0)
    cfg = DaemonConfig(
        bundle=strip_bundle,
        frame_lines=512,
        overlap_lines=128,
        threshold=1e9,
        flatfield=tmp_path / "ff" / "flatfield.npz",
        pub_endpoint="tcp://127.0.0.1:*",
        control_endpoint="tcp://127.0.0.1:*",
        source=src,
    )
    ctx = zmq.Context()
    d = Daemon(
        cfg=cfg,
        runtime=RuntimeConfig(),
        scoring=ScoringConfig(),
        source=SyntheticSource(cfg=src, width=256, seed=3, frame_lines=512),
        context=ctx,
    )
    assert d.slot.current.flatfield is not None
    d.run_until_done()
    ctx.term()
    s = d.stats.snapshot()
    assert s["counts"]["frames_scored_total"] >= 2 and "preprocess" in s["latency_seconds"]


def test_calibrate_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cv2
    import numpy as np

    frame = np.full((32, 600), 20, np.uint8)
    frame[:, 150:450] = 210  # a 300 px wide target
    cv2.imwrite(str(tmp_path / "t.png"), frame)
    assert (
        main(
            [
                "calibrate",
                "scale",
                "--target",
                str(tmp_path / "t.png"),
                "--target-width-mm",
                "150",
                "--mm-per-pulse",
                "0.1",
                "--divider",
                "5",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["mm_per_px"] == pytest.approx(0.5, rel=0.01) and result["mm_per_line"] == pytest.approx(0.5)
    png = cv2.imread(str(tmp_path / "s" / "scale.png"))
    assert png is not None
    assert abs(result["target_left_px"] - 149.5) <= 1.5 and abs(result["target_right_px"] - 449.5) <= 1.5
    assert main(["calibrate", "scale", "--line-rate", "1000", "--out", str(tmp_path / "s")]) == 2


def test_calibrate_thresholds_writes_bands_into_the_bundle(
    tmp_path: Path, strip_bundle: Path, synthetic_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from pipeline.inference.bundle import read_manifest

    bundle = tmp_path / "b"
    shutil.copytree(strip_bundle, bundle)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("synthetic:\n  width: 256\n  seed: 3\ndaemon:\n  frame_lines: 512\n  overlap_lines: 128\n")
    assert (
        main(
            [
                "calibrate",
                "thresholds",
                "--config",
                str(cfg),
                "--bundle",
                str(bundle),
                "--frames",
                "6",
                "--bands",
                "2",
                "--alarms-per-km",
                "500",
                "--min-area-mm2",
                "1",
                "--out",
                str(tmp_path / "r"),
                "--labelled",
                str(synthetic_dataset),
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "thresholds" in out and "detected" in out
    labelled = json.loads((tmp_path / "r" / "labelled.json").read_text())
    assert labelled["defect_images"] == 6 and labelled["normal_images"] == 2
    assert labelled["detection_rate"] >= 0.8 and 0 <= labelled["false_positive_rate_per_image"] <= 1
    bands = read_manifest(bundle).band_thresholds
    assert bands is not None and bands.band_edges_px == [0, 128, 256] and len(bands.thresholds) == 2
    assert "synthetic strip seed 3" in bands.calibrated_on and (tmp_path / "r" / "thresholds.png").is_file()


def test_reject_sim_prints_a_json_line_per_alert_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    import threading
    import time

    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)  # sees the subscription arrive, so nothing is sent before it
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    box: dict[str, int] = {}
    args = ["reject-sim", f"tcp://127.0.0.1:{port}", "--speed", "2", "--distance", "3", "--seconds", "10"]
    thread = threading.Thread(target=lambda: box.update(rc=main(args)))
    thread.start()
    try:
        subscribed: set[bytes] = set()
        while subscribed != {b"alert", b"heartbeat"}:
            assert pub.poll(5000), "reject-sim never subscribed"
            subscribed.add(pub.recv()[1:])
        for seq, age in ((1, 0.0), (2, 100.0)):  # the second was captured 100 s ago: too late
            header = {"topic": "alert", "seq": seq, "capture_time": time.time() - age, "capture_md_m": 50.0}
            pub.send_multipart([b"alert", json.dumps({**header, "md_m": 49.5, "cd_mm": 12.0}).encode()])
        pub.send_multipart([b"heartbeat", json.dumps({"topic": "heartbeat", "seq": 1, "state": "stopped"}).encode()])
        thread.join(10.0)
    finally:
        pub.close(0)
        ctx.term()
    assert box["rc"] == 3  # a late alert
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [list(r) for r in lines] == [["seq", "md_m", "cd_mm", "fire_time", "margin_s", "late"]] * 2
    assert [r["late"] for r in lines] == [False, True] and 1.1 < lines[0]["margin_s"] <= 1.23
    assert err.startswith("alerts 2, too late 1, smallest margin -9") and err.strip().endswith("sequence gaps 0")
