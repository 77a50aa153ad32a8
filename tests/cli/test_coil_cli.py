"""The coil subcommands: a report from the records, and one-line errors at start."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.coil.model import CoilDefect, CoilInfo
from pipeline.coil.records import CoilRecords
from stripinspect.cli import main


def test_coil_report_from_the_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "coils.sqlite"
    with CoilRecords(path=db, synchronous="NORMAL") as records:
        records.open_coil(CoilInfo(coil_id="24-1", grade="DC01", head_line=0, width_mm=1250.0), started_utc=time.time())
        d = CoilDefect(
            coil_id="24-1",
            side="top",
            md_m=12.0,
            cd_mm=300.0,
            length_mm=10.0,
            width_mm=8.0,
            area_mm2=60.0,
            score=4.0,
            cameras=("cam0",),
            sources=("cam0:1",),
        )
        records.add_defect(d, camera="cam0", seq=1, merge_mm=10.0, thumbnail_png=None)
        records.close_coil("24-1", tail_line=50_000, length_m=100.0, ended_utc=time.time())
    assert main(["coil", "report", "--db", str(db), "--coil", "24-1", "--out", str(tmp_path / "r")]) == 0
    files = json.loads(capsys.readouterr().out)
    assert {Path(p).name for p in files.values()} == {"report.pdf", "map.png", "report.json"}
    doc = json.loads(Path(files["json"]).read_text())
    assert doc["coil"]["coil_id"] == "24-1" and len(doc["defects"]) == 1
    assert main(["coil", "report", "--db", str(db), "--coil", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "no coil 'nope'" in capsys.readouterr().err


def test_start_problems_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coil", "report", "--db", str(tmp_path / "none.sqlite"), "--coil", "a", "--out", str(tmp_path)]) == 2
    assert "no coil records database" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"coil: {{db: {{path: {tmp_path / 'db.sqlite'}}}}}\n", encoding="utf-8")
    assert main(["coil-service", "--config", str(cfg), "--quiet"]) == 2
    assert "coil.cameras is empty" in capsys.readouterr().err
    assert main(["proxy", "--config", str(cfg), "--quiet"]) == 2
    assert "no camera PUB endpoints" in capsys.readouterr().err
