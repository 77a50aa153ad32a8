"""What the end-of-coil report shows, computed: the ``CoilSummary`` the coil service fills,
the numbers the drawings need (bins, spans, scales, sizes, labels) and the ``report.json``
document (docs/coil_report.md). Pure functions, no files, no matplotlib: ``report`` draws.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.coil.model import CoilDefect, CoilInfo, Grading, PeriodicFamily, Uninspected
from pipeline.errors import StripinspectError

SCHEMA_VERSION = 1
SIDES = ("top", "bottom")
UNCLASSIFIED = "unclassified"
WORST_N = 12
FILES = {"pdf": "report.pdf", "png": "map.png", "json": "report.json"}
# tab10 without its grey, which is unclassified's.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


class ReportError(StripinspectError):
    """The report cannot be built or written; one line."""


@dataclass(frozen=True, kw_only=True)
class CoilSummary:
    """Everything the report shows; the coil service builds it from its records. ``length_m``:
    measured (MD of the last inspected line); times in Unix seconds; ``cameras``: camera_id ->
    {"side", "cd_from_mm", "cd_to_mm"}; ``CoilDefect.thumbnail`` paths are relative to ``thumbs_root``."""

    info: CoilInfo
    length_m: float
    started_utc: float | None
    ended_utc: float | None
    defects: tuple[CoilDefect, ...]
    uninspected: tuple[Uninspected, ...]
    families: tuple[PeriodicFamily, ...]
    grading: Grading | None
    cameras: dict[str, dict[str, Any]]
    thumbs_root: Path | None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.length_m) and self.length_m >= 0):
            raise ReportError(f"coil {self.info.coil_id}: measured length must be >= 0 m, got {self.length_m}")
        for what, items in (("defect", self.defects), ("uninspected", self.uninspected), ("family", self.families)):
            bad = [item.side for item in items if item.side not in SIDES]
            if bad:
                raise ReportError(f"coil {self.info.coil_id}: {what} side must be top or bottom, got {bad[0]!r}")
        if any(not f.period_m > 0 for f in self.families):
            raise ReportError(f"coil {self.info.coil_id}: a periodic family needs a period above 0 m")
        for cam, c in self.cameras.items():
            if c.get("side") not in SIDES or not float(c.get("cd_from_mm", 0)) < float(c.get("cd_to_mm", 0)):
                raise ReportError(f"coil {self.info.coil_id}: camera {cam} needs side and cd_from_mm < cd_to_mm: {c}")


def class_name(d: CoilDefect) -> str:
    return d.klass if d.klass is not None else UNCLASSIFIED


def map_length_m(s: CoilSummary) -> float:
    """MD extent of the map: the measured length, stretched to anything recorded past it."""
    far = max([s.length_m] + [d.md_m for d in s.defects] + [u.md_to_m for u in s.uninspected])
    return far if far > 0 else (s.info.length_m or 1.0)


def strip_span_mm(s: CoilSummary) -> tuple[float, float]:
    """CD extent of the strip: the nominal width, else the cameras' span, else the defects'."""
    if s.info.width_mm:
        return 0.0, float(s.info.width_mm)
    spans = [(float(c["cd_from_mm"]), float(c["cd_to_mm"])) for c in s.cameras.values()]
    spans += [(min(0.0, d.cd_mm), d.cd_mm + 1.0) for d in s.defects] if not spans else []
    if spans:
        return min(a for a, _ in spans), max(b for _, b in spans)
    return 0.0, 1000.0  # nothing tells the width: a nominal metre so that the map still draws


def _nice_step(x: float) -> float:
    e = 10.0 ** math.floor(math.log10(x))
    return next(m * e for m in (1.0, 2.0, 5.0, 10.0) if m * e >= x * (1 - 1e-9))


def density_bin_m(length_m: float) -> float:
    """10 m bins, as a mill counts defects, unless that gives under 10 or over 100 bins."""
    if 100.0 <= length_m <= 1000.0:
        return 10.0
    return _nice_step(length_m / (10.0 if length_m < 100.0 else 100.0))


def density(defects: tuple[CoilDefect, ...], side: str, length_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges (m) and defect counts per bin of one side along MD."""
    step = density_bin_m(length_m)
    edges = np.arange(max(1, math.ceil(length_m / step - 1e-9)) + 1) * step
    md = np.array([d.md_m for d in defects if d.side == side], dtype=float)
    counts, _ = np.histogram(np.clip(md, 0.0, edges[-1]), bins=edges)
    return edges, counts


def merged_length_m(stretches: list[tuple[float, float]]) -> float:
    """Length of the union of MD intervals (two cameras down over one stretch count once)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(stretches):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def uninspected_m(s: CoilSummary) -> dict[str, float]:
    stretches = {side: [(u.md_from_m, u.md_to_m) for u in s.uninspected if u.side == side] for side in SIDES}
    return {side: merged_length_m(v) for side, v in stretches.items()}


def worst_defects(defects: tuple[CoilDefect, ...], n: int = WORST_N) -> list[CoilDefect]:
    return sorted(defects, key=lambda d: (-d.score, d.defect_id))[:n]


def marker_size(area_mm2: np.ndarray) -> np.ndarray:
    """Scatter size (points²) ~ the defect's linear size, clipped so that 1 mm² stays visible
    and 1 dm² does not hide its neighbours."""
    return np.clip(4.0 * np.sqrt(np.maximum(area_mm2, 0.0)), 6.0, 300.0)


def score_alpha(scores: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Opacity by score within the coil: faint = the coil's lowest, solid = its highest."""
    if not hi > lo:
        return np.full(scores.shape, 0.9)
    return 0.3 + 0.7 * np.clip((scores - lo) / (hi - lo), 0.0, 1.0)


def class_colours(defects: tuple[CoilDefect, ...]) -> dict[str, str]:
    """Named classes in alphabetical order on tab10 (its grey left out); unclassified grey."""
    named = sorted({d.klass for d in defects if d.klass is not None})
    colours = {k: _PALETTE[i % len(_PALETTE)] for i, k in enumerate(named)}
    if any(d.klass is None for d in defects):
        colours[UNCLASSIFIED] = "#8c8c8c"
    return colours


def cd_exaggeration(length_m: float, span_mm: float, width_in: float, height_in: float) -> float:
    """How much more paper a mm of CD gets than a mm of MD on a panel of that size."""
    return (length_m * 1000.0 / width_in) / (span_mm / height_in)


def family_grid(f: PeriodicFamily) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each print's MD and its offset from the nearest grid point (mm), and the grid points
    between the first and last print where no print was found."""
    md = np.asarray(f.md_m, dtype=float)
    k = np.rint((md - f.phase_m) / f.period_m).astype(int)
    offset_mm = (md - f.phase_m - k * f.period_m) * 1000.0
    missing = np.setdiff1d(np.arange(k.min(), k.max() + 1), k) if k.size else np.zeros(0, int)
    return md, offset_mm, f.phase_m + missing * f.period_m


def merge_labels(points: list[tuple[float, float, str]], dx: float, dy: float) -> list[tuple[float, float, str]]:
    """Labels at (x, y): one closer than (dx, dy) to a label already placed, left to right,
    joins it ("#5,7") instead of printing over it."""
    placed: list[tuple[float, float, str]] = []
    for x, y, text in sorted(points):
        near = next((i for i, (px, py, _) in enumerate(placed) if abs(px - x) < dx and abs(py - y) < dy), None)
        if near is None:
            placed.append((x, y, text))
        else:
            placed[near] = (*placed[near][:2], f"{placed[near][2]},{text.lstrip('#')}")
    return placed


def iso_utc(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _finite(obj: Any) -> Any:
    # JSON has no NaN/inf (a rule over a zero-length coil can measure inf): such a value is null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _counts(defects: list[CoilDefect]) -> dict[str, int]:
    return dict(sorted(Counter(map(class_name, defects)).items(), key=lambda kv: (-kv[1], kv[0])))


def report_json(summary: CoilSummary) -> dict[str, Any]:
    """The JSON document (report.json); every field is in docs/coil_report.md."""
    s, g = summary, summary.grading
    per_side = {side: [d for d in s.defects if d.side == side] for side in SIDES}
    duration = None if s.started_utc is None or s.ended_utc is None else s.ended_utc - s.started_utc
    grading = None if g is None else {"grade": g.grade, "final": g.final, "rules": [asdict(o) for o in g.outcomes]}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "coil": asdict(s.info),
        "length_m": s.length_m,
        "times": {"started_utc": iso_utc(s.started_utc), "ended_utc": iso_utc(s.ended_utc), "duration_s": duration},
        "disposition": g.disposition if g else None,
        "grading": grading,
        "counts": {
            "defects": len(s.defects),
            "per_side": {side: len(ds) for side, ds in per_side.items()},
            "per_class": _counts(list(s.defects)),
            "per_side_class": {side: _counts(ds) for side, ds in per_side.items()},
            "families": len(s.families),
            "confirmed_families": sum(f.confirmed for f in s.families),
            "uninspected_m": uninspected_m(s),
        },
        "cameras": s.cameras,
        "families": [{"id": f"F{i}", **asdict(f)} for i, f in enumerate(s.families, 1)],
        "uninspected": [asdict(u) for u in s.uninspected],
        "defects": [asdict(d) for d in s.defects],
        "files": dict(FILES),
    }
    return dict(_finite(doc))
