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
