"""benchmarks/coil_line.py on a short coil with one camera daemon killed (SIGKILL) and started
again mid-coil: four real daemons, the proxy and the coil service as processes. Nothing a
camera published is missing from the coil record, the outage is an uninspected stretch, the
planted defects and the roll mark are found, and the report's PDF renders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import coil_line


def test_a_killed_camera_loses_nothing_and_leaves_a_marked_stretch(tmp_path: Path) -> None:
    args = coil_line.parser().parse_args(
        ["--length-m", "60", "--kill", "cam1", "--kill-at", "0.3", "--down-s", "3", "--work", str(tmp_path / "w")]
    )
    out = coil_line.run(args)
    assert out["cameras"] == 4
    assert out["lost_alerts"] == 0, out["lost"]
    assert out["published_alerts"] > 0
    killed = [u for u in out["uninspected"] if u["camera"] == "cam1"]
    assert killed and all(u["side"] == "top" for u in killed)
    assert 1.0 < out["uninspected_m"] < 30.0
    assert out["planted"] >= 20
    assert out["recall"] >= 0.95
    assert out["false_alerts"] <= 0.05 * out["planted"]
    assert len(out["periodic_found_m"]) == 1
    assert abs(out["periodic_found_m"][0] - out["periodic_planted_m"]) <= 0.01 * out["periodic_planted_m"]
    assert out["roll_found"] == [out["roll_planted"]]
    pdf = Path(out["report_pdf"])
    assert pdf.is_file() and Path(out["report_png"]).is_file() and Path(out["report_json"]).is_file()
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed: apt-get install poppler-utils")
    subprocess.run(["pdftoppm", "-r", "40", "-png", "-f", "1", "-l", "1", str(pdf), str(tmp_path / "page")], check=True)
    (page,) = tmp_path.glob("page*.png")
    img = cv2.imread(str(page), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.std() > 10
