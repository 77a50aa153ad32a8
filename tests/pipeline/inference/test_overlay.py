"""The overlay beside a bundle: entries written and verified, the cap, undo keeping history,
a tampered file refused; few-shot classification and a defect's region."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.inference.overlay import Overlay, OverlayError, classify, overlay_dir, region_rows

DIM = 8
ALERT = {"camera_id": "cam0", "journal": "j", "seq": 1}


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def test_entries_persist_with_hashes_and_undo_keeps_history(tmp_path: Path) -> None:
    folder = overlay_dir(tmp_path / "bundle")
    assert folder == tmp_path / "bundle.overlay"
    ov = Overlay(folder=folder, dim=DIM, max_rows=100)
    a = ov.add(kind="normal", rows=rows(5), user="anna", alert=ALERT)
    b = ov.add(kind="label", rows=rows(1, 1), user="ben", alert=ALERT, label=" pit ")
    ov.remove(a.id, user="carl")
    again = Overlay(folder=folder, dim=DIM, max_rows=100)
    assert again.version == 3
    assert [(e.id, e.kind, e.user, e.active) for e in again.entries] == [
        (1, "normal", "anna", False),
        (2, "label", "ben", True),
    ]
    assert again.entries[0].removed_by == "carl" and b.label == "pit"
    assert again.normal_rows().shape == (0, DIM)
    ex, labels = again.examples()
    assert ex.shape == (1, DIM) and labels == ["pit"]
    d = again.describe()
    assert d["classes"] == {"pit": 1} and d["rows"] == 0 and len(d["sha256"]) == 64
    with pytest.raises(OverlayError, match="removed already"):
        again.remove(1, user="carl")
    with pytest.raises(OverlayError, match="no overlay entry"):
        again.remove(99, user="carl")


def test_the_cap_and_bad_input_are_refused(tmp_path: Path) -> None:
    ov = Overlay(folder=tmp_path / "o", dim=DIM, max_rows=6)
    ov.add(kind="normal", rows=rows(5), user="anna", alert=ALERT)
    with pytest.raises(OverlayError, match="cap"):
        ov.add(kind="normal", rows=rows(2), user="anna", alert=ALERT)
    with pytest.raises(OverlayError, match="finite"):
        ov.add(kind="normal", rows=np.full((1, DIM), np.nan, np.float32), user="anna", alert=ALERT)
    with pytest.raises(OverlayError, match="user"):
        ov.add(kind="normal", rows=rows(1), user="", alert=ALERT)
    for bad in ("", "unknown", "a/b", "x" * 65, 5):
        with pytest.raises(OverlayError):
            ov.add(kind="label", rows=rows(1), user="anna", alert=ALERT, label=bad)  # type: ignore[arg-type]
    assert ov.version == 1


def test_a_tampered_or_foreign_overlay_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "o"
    ov = Overlay(folder=folder, dim=DIM, max_rows=100)
    e = ov.add(kind="normal", rows=rows(3), user="anna", alert=ALERT)
    np.save(folder / e.file, rows(3, 9))  # same shape, other numbers
    with pytest.raises(OverlayError, match="sha256"):
        Overlay(folder=folder, dim=DIM, max_rows=100)
    doc = json.loads((folder / "overlay.json").read_text())
    (folder / "overlay.json").write_text(json.dumps({**doc, "dim": 4}))
    with pytest.raises(OverlayError, match="dim"):
        Overlay(folder=folder, dim=DIM, max_rows=100)
    (folder / "overlay.json").write_text("{not json")
    with pytest.raises(OverlayError, match="unreadable"):
        Overlay(folder=folder, dim=DIM, max_rows=100)


def test_classify_votes_among_near_examples_and_says_unknown_when_far() -> None:
    e = np.eye(DIM, dtype=np.float32)[:3]
    labels = ["pit", "scratch", "scale"]
    assert classify(np.eye(DIM)[1] + 0.05, e, labels, max_distance=0.35, neighbours=3)[0] == "scratch"
    assert classify(np.eye(DIM)[5], e, labels, max_distance=0.35, neighbours=3) == ("unknown", None)
    assert classify(np.eye(DIM)[0], np.zeros((0, DIM), np.float32), [], max_distance=0.35, neighbours=3)[0] == "unknown"
    label, conf = classify(np.eye(DIM)[0], e, labels, max_distance=0.35, neighbours=3)
    assert label == "pit" and conf is not None and 0.9 < conf <= 1.0


def test_region_rows_cover_the_box_and_its_margin() -> None:
    feats = np.arange(10 * 12 * 2, dtype=np.float32).reshape(10, 12, 2)
    grown, pooled = region_rows(feats, (16, 24, 8, 8), stride=8, margin_px=8)
    assert grown.shape == (3 * 3, 2)  # box patch (3, 2) plus one patch all round
    assert pooled.shape == (1, 2) and np.isclose(np.linalg.norm(pooled), 1.0)
    edge, _ = region_rows(feats, (0, 0, 4, 4), stride=8, margin_px=8)
    assert edge.shape == (2 * 2, 2)  # clipped at the frame's corner


def test_two_daemons_sharing_a_bundle_lose_no_entry(tmp_path: Path) -> None:
    # Cameras of one line often load the same bundle: their overlays share a folder.
    a = Overlay(folder=tmp_path / "o", dim=DIM, max_rows=100)
    b = Overlay(folder=tmp_path / "o", dim=DIM, max_rows=100)
    ea = a.add(kind="normal", rows=rows(2), user="anna", alert=ALERT)
    eb = b.add(kind="normal", rows=rows(3, 1), user="ben", alert=ALERT)
    assert ea.id != eb.id and ea.file != eb.file
    b.remove(ea.id, user="ben")
    fresh = Overlay(folder=tmp_path / "o", dim=DIM, max_rows=100)
    assert [(e.id, e.user, e.active) for e in fresh.entries] == [(1, "anna", False), (2, "ben", True)]
    assert fresh.normal_rows().shape == (3, DIM) and fresh.version == 3
