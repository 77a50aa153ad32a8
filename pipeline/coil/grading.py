"""Coil grading: a grade's rules applied to one coil, each with its measured value and limit.

Every rule gives one ``RuleOutcome`` (a sentence a shift leader can read, the measured value, the
limit); the coil's disposition is the worst (``config.DISPOSITIONS`` order) among the rules it
breaks, ``prime`` when it breaks none. A rule is broken when the measured value is above its
limit: the limits read "at most" (a defect exactly at the limit passes).

The same function grades a live coil (``final=False``: the length so far, the defects so far) and
a finished one, so the operator's running disposition and the end-of-coil one cannot disagree on
the same data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipeline.coil.model import CoilDefect, Grading, PeriodicFamily, RuleOutcome, Uninspected
from pipeline.config import (
    DISPOSITIONS,
    DensityRule,
    EdgeRule,
    GradeRule,
    PeriodicRule,
    SizeRule,
    UninspectedRule,
)

# A live coil's first metres divide by almost nothing: a coil shorter than this counts as this
# long for the density rules (one defect in the first centimetre is not 10,000 per 100 m).
MIN_DENSITY_LENGTH_M = 1.0


def grade_coil(
    *,
    grade: str,
    rules: Sequence[GradeRule],
    defects: Sequence[CoilDefect],
    families: Sequence[PeriodicFamily],
    length_m: float,
    width_mm: float | None,
    uninspected: Sequence[Uninspected],
    final: bool,
) -> Grading:
    """Apply ``rules`` (one steel grade's) to a coil: one outcome per rule, in the rules' order.

    ``length_m``: the coil's length, or its length so far while it runs; ``width_mm``: its nominal
    width from Level 2 (None: unknown, the edge rules see only the reference edge at CD 0). An
    outcome's ``disposition`` is the rule's when broken and ``prime`` when not.
    """
    if not (math.isfinite(length_m) and length_m >= 0):
        raise ValueError(f"length_m must be a finite length >= 0, got {length_m}")
    if width_mm is not None and not (math.isfinite(width_mm) and width_mm > 0):
        raise ValueError(f"width_mm must be positive or None, got {width_mm}")
    outcomes = tuple(
        _apply(rule, defects=defects, families=families, length_m=length_m, width_mm=width_mm, uninspected=uninspected)
        for rule in rules
    )
    broken = [o.disposition for o in outcomes if o.broken]
    disposition = max(broken, key=DISPOSITIONS.index, default="prime")
    return Grading(grade=grade, disposition=disposition, outcomes=outcomes, final=final)


def _apply(
    rule: GradeRule,
    *,
    defects: Sequence[CoilDefect],
    families: Sequence[PeriodicFamily],
    length_m: float,
    width_mm: float | None,
    uninspected: Sequence[Uninspected],
) -> RuleOutcome:
    if isinstance(rule, DensityRule):
        text, measured, limit = _density(rule, defects, length_m)
    elif isinstance(rule, EdgeRule):
        text, measured, limit = _edge(rule, defects, width_mm)
    elif isinstance(rule, SizeRule):
        text = f"no defect larger than {rule.max_area_mm2:g} mm²"
        measured, limit = max((d.area_mm2 for d in defects), default=0.0), rule.max_area_mm2
    elif isinstance(rule, PeriodicRule):
        text = "no confirmed periodic defect (roll mark)"
        measured, limit = float(sum(f.confirmed for f in families)), 0.0
    elif isinstance(rule, UninspectedRule):
        text = f"at most {rule.max_m:g} m uninspected (either side)"
        measured, limit = uninspected_m(uninspected, length_m), rule.max_m
    else:
        raise TypeError(f"unknown grading rule {type(rule).__name__}")
    broken = measured > limit
    return RuleOutcome(
        rule=text,
        measured=float(measured),
        limit=float(limit),
        broken=broken,
        disposition=rule.disposition if broken else "prime",
    )


def _density(rule: DensityRule, defects: Sequence[CoilDefect], length_m: float) -> tuple[str, float, float]:
    classes = rule.classes
    counted = sum(1 for d in defects if d.area_mm2 >= rule.min_area_mm2 and (classes is None or d.klass in classes))
    size = f" >= {rule.min_area_mm2:g} mm²" if rule.min_area_mm2 > 0 else ""
    which = "all classes" if classes is None else "classes: " + (", ".join(classes) or "none")
    text = f"at most {rule.max_per_100m:g} defects{size} per 100 m ({which})"
    return text, counted * 100.0 / max(length_m, MIN_DENSITY_LENGTH_M), rule.max_per_100m


def _edge(rule: EdgeRule, defects: Sequence[CoilDefect], width_mm: float | None) -> tuple[str, float, float]:
    # A defect is in an edge zone when its box reaches into it: an edge crack centred just outside
    # the zone still touches the edge.
    def at_edge(d: CoilDefect) -> bool:
        if d.cd_mm - d.width_mm / 2.0 <= rule.edge_mm:
            return True
        return width_mm is not None and d.cd_mm + d.width_mm / 2.0 >= width_mm - rule.edge_mm

    if width_mm is None:
        where = f"within {rule.edge_mm:g} mm of the reference edge (coil width unknown: far edge not checked)"
    else:
        where = f"within {rule.edge_mm:g} mm of either strip edge"
    text = f"no defect larger than {rule.max_area_mm2:g} mm² {where}"
    return text, max((d.area_mm2 for d in defects if at_edge(d)), default=0.0), rule.max_area_mm2


def uninspected_m(stretches: Sequence[Uninspected], length_m: float) -> float:
    """Metres of the coil along MD that a camera outage left unseen, on the worse side.

    Per side, the union of the stretches' MD spans (two cameras down over the same metres count
    once; a stretch of one camera means part of the width there was not seen, so it counts in
    full), clipped to [0, length_m].
    """
    total: dict[str, float] = {}
    for side in {s.side for s in stretches}:
        spans = []
        for s in stretches:
            if s.side != side:
                continue
            if not (math.isfinite(s.md_from_m) and math.isfinite(s.md_to_m) and s.md_to_m >= s.md_from_m):
                raise ValueError(f"uninspected stretch of {s.camera} runs from {s.md_from_m} to {s.md_to_m} m")
            lo, hi = max(s.md_from_m, 0.0), min(s.md_to_m, length_m)
            if hi > lo:
                spans.append((lo, hi))
        covered, reach = 0.0, -math.inf
        for lo, hi in sorted(spans):
            if hi > reach:
                covered += hi - max(lo, reach)
                reach = hi
        total[side] = covered
    return max(total.values(), default=0.0)
