"""benchmarks/operator_feedback.py, short: a real daemon taught through the station's own
functions. The benign stamp stops alerting on a stretch the operator never saw, defects are
still found, the taught classes name later defects, and the overlay is on disk."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import operator_feedback


def test_the_taught_daemon_stops_the_false_alarms_and_names_the_defects(tmp_path: Path) -> None:
    args = operator_feedback.parser().parse_args(
        ["--phase-lines", "12288", "--line-rate", "2000", "--work", str(tmp_path / "w")]
    )
    out = operator_feedback.run(args)
    assert out["refused"] == []
    assert out["false_alarms_marked"] == 5
    assert out["stamp_alerts_before"] >= 5 and out["stamp_alerts_after"] == 0
    assert out["false_alarms_after"] <= 0.25 * out["false_alarms_before"]
    assert out["recall_after"] >= out["recall_before"] - 0.05
    assert out["feedback_apply_s"] < 2.0
    fs = out["few_shot"]
    assert len(fs["classes"]) >= 3 and fs["scored"] >= 10 and fs["accuracy"] >= 0.7
    assert out["overlay"]["entries"] == {"normal": 5, "label": 5 * len(fs["classes"])}
    assert out["live_after"]["stamp_alerts_B"] == 0 < out["live_after"]["stamp_alerts_A"]
