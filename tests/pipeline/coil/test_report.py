"""The end-of-coil report (pipeline/coil/report.py, report_data.py) on a synthetic 300 m coil:
real files in tmp dirs, the PDF read back with poppler (pdfinfo, pdftoppm) where it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.coil.model import CoilDefect, CoilInfo, Grading, PeriodicFamily, RuleOutcome, Uninspected
from pipeline.coil.report import CoilSummary, ReportError, report_json, write_report
from pipeline.coil.report_data import (
    cd_exaggeration,
    density,
    density_bin_m,
    family_grid,
    merge_labels,
    merged_length_m,
    strip_span_mm,
    worst_defects,
)
from tests.conftest import REPO

COIL = "C240117-0042"
CAMERAS: dict[str, dict[str, Any]] = {
    "top-1": {"side": "top", "cd_from_mm": 0.0, "cd_to_mm": 780.0},
    "top-2": {"side": "top", "cd_from_mm": 720.0, "cd_to_mm": 1500.0},
    "bottom-1": {"side": "bottom", "cd_from_mm": 0.0, "cd_to_mm": 780.0},
    "bottom-2": {"side": "bottom", "cd_from_mm": 720.0, "cd_to_mm": 1500.0},
}
PERIOD_M, PHASE_M, FAMILY_CD = 1.7593, 40.25, 400.0
FAMILY_K = (0, 1, 2, 3, 5, 6, 7, 8)  # k = 4: a print the search did not find


def _cams(cd: float, side: str) -> tuple[str, ...]:
    return tuple(c for c, s in CAMERAS.items() if s["side"] == side and s["cd_from_mm"] <= cd <= s["cd_to_mm"])


def _synthetic(root: Path) -> CoilSummary:
    """~300 m coil, 2 cameras a side, 40 defects of scratch / inclusion / unclassified (8 of
    them a roll mark on the top side), a bottom camera down for 15 m; thumbnails as PNGs in
    ``root``, one of them missing on disk and one never taken."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    defects = []
    for i in range(40):
        fam = i < len(FAMILY_K)
        side = "top" if fam or i % 2 else "bottom"
        md = PHASE_M + FAMILY_K[i] * PERIOD_M + rng.normal(0, 0.004) if fam else float(rng.uniform(0, 300))
        cd = FAMILY_CD if fam else float(rng.uniform(10, 1490))
        length, width = (float(v) for v in rng.uniform(2, 60, size=2))
        thumb: str | None = f"thumbs/{i}.png"
        if i == 9:
            thumb = "thumbs/lost.png"  # recorded but gone from disk
        elif i == 10:
            thumb = None
        else:
            img = np.full((48, 64, 3), 200, np.uint8)
            cv2.circle(img, (32, 24), 6 + i % 10, (40, 40, 200), -1)
            (root / "thumbs").mkdir(exist_ok=True)
            assert cv2.imwrite(str(root / "thumbs" / f"{i}.png"), img)
        defects.append(
            CoilDefect(
                coil_id=COIL, side=side, md_m=md, cd_mm=cd, length_mm=length, width_mm=width,
                area_mm2=length * width * 0.6, score=9.0 if i in (9, 10) else float(rng.uniform(1, 8)),
                cameras=_cams(cd, side), sources=(f"{_cams(cd, side)[0]}:{i + 1}",),
                klass=("scratch", "inclusion", None)[i % 3], thumbnail=thumb, defect_id=i + 1,
            )
        )  # fmt: skip
    family = PeriodicFamily(
        side="top", cd_mm=FAMILY_CD, period_m=PERIOD_M, phase_m=PHASE_M, count=len(FAMILY_K),
        confidence=len(FAMILY_K) / 9, md_m=tuple(d.md_m for d in defects[: len(FAMILY_K)]),
        confirmed=True, roll="work roll top",
    )  # fmt: skip
    gap = Uninspected(
        coil_id=COIL, side="bottom", camera="bottom-2", md_from_m=120.0, md_to_m=135.0,
        cd_from_mm=720.0, cd_to_mm=1500.0, reason="camera offline",
    )  # fmt: skip
    outcomes = (
        RuleOutcome(rule="density <= 2 per 100 m", measured=13.3, limit=2.0, broken=True, disposition="secondary"),
        RuleOutcome(rule="size <= 500 mm2", measured=2016.0, limit=500.0, broken=True, disposition="scrap"),
        RuleOutcome(rule="edge 30 mm: <= 20 mm2", measured=0.0, limit=20.0, broken=False, disposition="secondary"),
        RuleOutcome(rule="no confirmed periodic family", measured=1.0, limit=0.0, broken=True, disposition="hold"),
        RuleOutcome(rule="uninspected <= 1 m", measured=15.0, limit=1.0, broken=True, disposition="hold"),
    )
    return CoilSummary(
        info=CoilInfo(coil_id=COIL, grade="DC04", head_line=1000, tail_line=301000, width_mm=1500.0,
                      thickness_mm=0.8, length_m=300.0),
        length_m=301.2, started_utc=1_705_500_000.0, ended_utc=1_705_500_301.0,
        defects=tuple(defects), uninspected=(gap,), families=(family,),
        grading=Grading(grade="DC04", disposition="scrap", outcomes=outcomes, final=True),
        cameras=CAMERAS, thumbs_root=root,
    )  # fmt: skip


def _empty(root: Path | None) -> CoilSummary:
    return CoilSummary(
        info=CoilInfo(coil_id="EMPTY-1", grade="DC01", head_line=0),
        length_m=0.0, started_utc=None, ended_utc=None, defects=(), uninspected=(), families=(),
        grading=None, cameras={}, thumbs_root=root,
    )  # fmt: skip


def _pdf_pages(pdf: Path) -> int:
    # matplotlib writes its page objects uncompressed: one "/Type /Page" each ("/Pages" is the tree).
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf.read_bytes()))


def _poppler(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} (poppler-utils) is not installed: apt-get install poppler-utils")
    return path


def _render(pdf: Path, page: int, out: Path, dpi: int = 50) -> np.ndarray:
    subprocess.run(
        [_poppler("pdftoppm"), "-r", str(dpi), "-f", str(page), "-l", str(page), "-png", "-singlefile", str(pdf),
         str(out)], check=True, timeout=60,
    )  # fmt: skip
    img = cv2.imread(f"{out}.png", cv2.IMREAD_GRAYSCALE)
    assert img is not None
    return img


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[CoilSummary, Any]:
    base = tmp_path_factory.mktemp("report")
    summary = _synthetic(base / "records")
    return summary, write_report(summary, base / "out" / COIL)


def _documented_fields() -> list[str]:
    doc = (REPO / "docs" / "coil_report.md").read_text().split("## report.json", 1)[1]
    return re.findall(r"^\| `([a-z_.\[\]]+)` \|", doc, flags=re.M)


def test_three_files_and_no_temp_files_left(written: tuple[CoilSummary, Any]) -> None:
    _, files = written
    assert files.pdf.name == "report.pdf" and files.png.name == "map.png" and files.json.name == "report.json"
    assert sorted(p.name for p in files.pdf.parent.iterdir()) == ["map.png", "report.json", "report.pdf"]
    assert files.pdf.read_bytes().startswith(b"%PDF")
    png = cv2.imread(str(files.png))
    assert png is not None and 1500 <= png.shape[1] <= 1700


def test_json_has_the_documented_keys_and_right_counts(written: tuple[CoilSummary, Any]) -> None:
    summary, files = written
    doc = json.loads(files.json.read_text())
    assert doc == json.loads(json.dumps(report_json(summary)))
    documented = _documented_fields()
    top = {f.split(".")[0].split("[")[0] for f in documented}
    assert set(doc) == top
    for field in documented:  # every documented path exists (lists: in their first element)
        node: Any = doc
        for part in field.replace("[]", ".0").split("."):
            if node is None:
                break
            node = node[int(part)] if isinstance(node, list) else node[part]
    c = doc["counts"]
    assert c["defects"] == 40 and len(doc["defects"]) == 40
    assert c["per_side"] == {"top": 24, "bottom": 16}
    assert c["per_class"] == {"scratch": 14, "inclusion": 13, "unclassified": 13}
    assert list(c["per_class"]) == ["scratch", "inclusion", "unclassified"]  # most first
    assert sum(c["per_side_class"]["top"].values()) == 24
    assert c["families"] == 1 and c["confirmed_families"] == 1
    assert c["uninspected_m"] == {"top": 0.0, "bottom": 15.0}
    assert doc["disposition"] == "scrap" and len(doc["grading"]["rules"]) == 5
    times = {"started_utc": "2024-01-17T14:00:00Z", "ended_utc": "2024-01-17T14:05:01Z", "duration_s": 301.0}
    assert doc["times"] == times
    assert doc["coil"]["width_mm"] == 1500.0 and doc["length_m"] == 301.2
    assert doc["families"][0]["id"] == "F1" and doc["families"][0]["roll"] == "work roll top"
    assert doc["defects"][0]["thumbnail"] == "thumbs/0.png" and doc["defects"][10]["thumbnail"] is None
    assert doc["files"] == {"pdf": "report.pdf", "png": "map.png", "json": "report.json"}


def test_pdf_has_three_pages_and_page_one_is_drawn(written: tuple[CoilSummary, Any], tmp_path: Path) -> None:
    _, files = written
    assert _pdf_pages(files.pdf) == 3
    info = subprocess.run([_poppler("pdfinfo"), str(files.pdf)], capture_output=True, text=True, check=True)
    assert re.search(r"^Pages:\s+3$", info.stdout, flags=re.M)
    assert re.search(r"^Page size:\s+841\.\d+ x 595\.\d+ pts \(A4\)", info.stdout, flags=re.M)  # A4 landscape
    page1 = _render(files.pdf, 1, tmp_path / "p1")
    assert page1.shape[1] > page1.shape[0]
    assert page1.std() > 20 and (page1 < 128).mean() > 0.01  # ink, not a blank page


def test_an_empty_coil_renders_with_none_texts(tmp_path: Path) -> None:
    summary = _empty(None)
    files = write_report(summary, tmp_path / "empty")
    doc = json.loads(files.json.read_text())
    assert doc["counts"]["defects"] == 0 and doc["counts"]["per_class"] == {}
    assert doc["disposition"] is None and doc["grading"] is None and doc["families"] == []
    assert doc["times"]["started_utc"] is None
    assert _pdf_pages(files.pdf) == 3
    assert _render(files.pdf, 1, tmp_path / "e1").std() > 10


def test_many_families_take_more_pages_and_rewriting_replaces_the_files(tmp_path: Path) -> None:
    summary = _synthetic(tmp_path / "records")
    fams = tuple(replace(summary.families[0], cd_mm=100.0 + 50 * i, roll=None) for i in range(7))
    out = tmp_path / "out"
    write_report(summary, out)
    files = write_report(replace(summary, families=fams, grading=None), out)
    assert _pdf_pages(files.pdf) == 4  # 6 families per page
    assert json.loads(files.json.read_text())["counts"]["families"] == 7
    assert sorted(p.name for p in out.iterdir()) == ["map.png", "report.json", "report.pdf"]


def test_unwritable_folder_and_bad_side_are_one_line_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ReportError, match="cannot write coil EMPTY-1 report") as err:
        write_report(_empty(None), blocker / "out")
    assert "\n" not in str(err.value)
    summary = _synthetic(tmp_path / "records")
    bad = replace(summary.defects[0], side="left")
    with pytest.raises(ReportError, match="side must be top or bottom, got 'left'"):
        replace(summary, defects=(bad,))
    with pytest.raises(ReportError, match="period above 0 m"):
        replace(summary, families=(replace(summary.families[0], period_m=0.0),))
    with pytest.raises(ReportError, match="camera top-1 needs side"):
        replace(summary, cameras={"top-1": {"side": "top", "cd_from_mm": 5.0, "cd_to_mm": 5.0}})


def test_density_bins_follow_the_coil_length() -> None:
    assert density_bin_m(300.0) == 10.0 and density_bin_m(1000.0) == 10.0
    assert density_bin_m(50.0) == 5.0 and density_bin_m(2000.0) == 20.0 and density_bin_m(3.0) == 0.5
    summary = _synthetic(Path("records"))
    edges, counts = density(summary.defects, "top", 301.2)
    assert edges[0] == 0.0 and edges[-1] == 310.0 and len(counts) == 31
    assert counts.sum() == 24 and counts[4] >= 6  # the roll mark's prints at 40-54 m
    assert counts.sum() + density(summary.defects, "bottom", 301.2)[1].sum() == 40


def test_uninspected_union_and_family_grid() -> None:
    assert merged_length_m([(10.0, 20.0), (15.0, 30.0), (40.0, 41.0)]) == 21.0
    assert merged_length_m([]) == 0.0
    fam = _synthetic(Path("records")).families[0]
    md, offset_mm, missing = family_grid(fam)
    assert np.all(np.abs(offset_mm) < 15.0) and len(md) == 8
    assert missing == pytest.approx([PHASE_M + 4 * PERIOD_M])


def test_worst_defects_by_score_then_id() -> None:
    summary = _synthetic(Path("records"))
    worst = worst_defects(summary.defects)
    assert len(worst) == 12 and [d.defect_id for d in worst[:2]] == [10, 11]
    assert [d.score for d in worst] == sorted((d.score for d in summary.defects), reverse=True)[:12]


def test_near_labels_join_and_the_map_scale() -> None:
    labels = merge_labels([(100.0, 50.0, "#7"), (10.0, 50.0, "#3"), (90.0, 52.0, "#5"), (90.0, 80.0, "#9")], 22, 8)
    assert labels == [(10.0, 50.0, "#3"), (90.0, 52.0, "#5,7"), (90.0, 80.0, "#9")]
    # 300 m on 10 in against 1.5 m on 2 in: a mm of CD gets 40 times the paper of a mm of MD.
    assert cd_exaggeration(300.0, 1500.0, 10.0, 2.0) == pytest.approx(40.0)
    summary = _synthetic(Path("records"))
    assert strip_span_mm(summary) == (0.0, 1500.0)
    no_width = replace(summary, info=replace(summary.info, width_mm=None), cameras={"t": {**CAMERAS["top-2"]}})
    assert strip_span_mm(no_width) == (720.0, 1500.0)  # the cameras' span when Level 2 sent no width
    assert strip_span_mm(_empty(None)) == (0.0, 1000.0)
