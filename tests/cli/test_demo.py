from pathlib import Path

import pytest

from pipeline.config import Config
from stripinspect.demo import run_demo
from tests.conftest import SMALL_SYNTHETIC


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = run_demo(cfg=Config(synthetic=SMALL_SYNTHETIC), out=tmp_path, progress=False, steps=6)
    out = capsys.readouterr().out
    assert "image AUROC" in out and "defect_00000" in out
    assert "daemon on the synthetic camera" in out and "end_to_end" in out
    daemon = metrics["daemon"]
    assert daemon["frames"] == 6 and daemon["gaps"] == 0  # type: ignore[index]
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    assert len(list((tmp_path / "overlays").glob("defect_*.png"))) >= 1
    assert float(metrics["image_auroc"]) >= 0.9  # type: ignore[arg-type]
