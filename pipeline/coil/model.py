"""Types shared by the coil modules: small frozen dataclasses, units in the names.

Coordinates are the coil's: MD in metres from the coil head (the first line of the coil is
0.0), CD in mm from the strip's reference edge (``daemon.cd_offset_mm`` puts every camera on
it), one map per side (``top`` / ``bottom``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoilInfo:
    """A coil as Level 2 announces it. ``head_line``: the strip line (encoder count) where the
    coil starts; ``tail_line``: the first line after it (None while the coil runs). Nominal
    dimensions are None where Level 2 did not send them."""

    coil_id: str
    grade: str
    head_line: int
    tail_line: int | None = None
    width_mm: float | None = None
    thickness_mm: float | None = None
    length_m: float | None = None


@dataclass(frozen=True)
class CoilDefect:
    """A defect on the coil map: box centre (``md_m``, ``cd_mm``) and extent (``length_mm``
    along MD, ``width_mm`` across). ``cameras``: every camera that saw it (two where neighbours
    overlap); ``sources``: "camera:seq" of each alert merged into it. ``klass`` is None until a
    classifier names it; ``thumbnail`` a PNG path relative to the records' ``thumbs_root``, or None."""

    coil_id: str
    side: str
    md_m: float
    cd_mm: float
    length_mm: float
    width_mm: float
    area_mm2: float
    score: float
    cameras: tuple[str, ...]
    sources: tuple[str, ...]
    klass: str | None = None
    thumbnail: str | None = None
    defect_id: int = 0


@dataclass(frozen=True)
class Uninspected:
    """A stretch of one camera's view that no frame covered (the camera was down or its frames
    were lost): MD [md_from_m, md_to_m) across CD [cd_from_mm, cd_to_mm) on ``side``."""

    coil_id: str
    side: str
    camera: str
    md_from_m: float
    md_to_m: float
    cd_from_mm: float
    cd_to_mm: float
    reason: str


@dataclass(frozen=True)
class PeriodicFamily:
    """Defects of one side and CD lane that repeat along MD every ``period_m`` from ``phase_m``
    (the first print's MD): ``count`` prints on the grid, ``confidence`` in [0, 1] (prints found
    over prints expected between the first and last), ``confirmed`` once ``count`` reaches
    ``periodic.confirm_repeats``; ``roll``: the roll table entry whose circumference matches."""

    side: str
    cd_mm: float
    period_m: float
    phase_m: float
    count: int
    confidence: float
    md_m: tuple[float, ...]
    confirmed: bool
    roll: str | None = None


@dataclass(frozen=True)
class RuleOutcome:
    """One grading rule applied to a coil: what it says, the measured value, its limit, and
    whether the coil breaks it (then ``disposition`` is what the rule gives)."""

    rule: str
    measured: float
    limit: float
    broken: bool
    disposition: str


@dataclass(frozen=True)
class Grading:
    """A coil's disposition (``config.DISPOSITIONS``: prime, secondary, hold, scrap) with the
    outcome of every rule of its grade; ``final`` once the coil has ended."""

    grade: str
    disposition: str
    outcomes: tuple[RuleOutcome, ...]
    final: bool
