"""Periodic defects (roll marks): defects of one side and CD lane that repeat along MD.

A damaged or dirty roll prints a mark once per revolution at the same CD, so its prints sit on
a grid ``md = phase + n * period`` (n integer) in one lane. Some prints are missing (below the
threshold, under an uninspected stretch), and the lane also holds unrelated defects. The search,
per side, is pure numpy on the coil map:

1. Lanes. Defects are grouped by single linkage on CD with a gap of ``2 * lane_mm``: a family's
   prints all lie within ``lane_mm`` of its CD, so no group boundary can split one (fixed lane
   boundaries could). Groups only bound the work; inside one a family's prints must still lie
   within ``lane_mm`` of its CD.
2. Candidate periods from pairwise MD differences: each defect and its nearest few successors in
   its lane at a distance d in [min_period, max_period] propose d / k, k = 1..3 (k > 1 finds a
   family whose consecutive prints happen to be missing, e.g. prints 0, 2, 5, 7). Only pairs within
   max_period are formed (sorted MD and searchsorted), so the cost grows with the lane density,
   not with the square of the defect count.
3. Local grid fit, all candidates at once: the nearest lane defect at slots around the anchor
   (looked up in the defects sorted by CD band and MD, so a transverse mark's dozens of defects
   at one MD do not hide the lane's), first within windows widened by the seed's period
   uncertainty (two prints, each within md_tolerance, fix k periods to 2 * md_tolerance), fitted
   by Theil-Sen (median of pairwise slopes: a defect in a wide window but off the grid must not
   tilt it), then looked at again at slots -8..8. Differences that are multiples of the period
   support it; a missing print or a defect between prints costs one slot, nothing more.
4. Growth of the most significant local fits, a few per round, in different lanes: over the lane,
   doubling the slot window at each robust refit (the period error from a span of s slots is at
   most 2 * md_tolerance / s, so the window's far slots stay in reach); then members within
   md_tolerance of a least-squares grid, one per slot (the closest), over their most significant
   run (a chance defect on the grid far from the family would stretch it; a camera outage with
   prints on both sides is bridged).
5. Harmonics. Score = count * confidence = count^2 / slots: the true period p beats 2p (half the
   prints on the same span) and p / 2 (half the confidence), and a chance defect on a half-way
   slot does not tip it; so the shortest period whose grid the members fill wins. Locally a
   complete grid of 5p looks as good as p, so every grown family's sub-multiples (down to
   min_period) and its double and triple are scored on the lane, the better ones grown, and so
   on from the best (1.5p leads to p / 2, and that to p).
6. Significance, a-contrario (Desolneux, Moisan & Morel, "Meaningful alignments", IJCV 2000): a
   family is kept only when its number of false alarms, tests x P[Binomial(slots - 2, q) >=
   count - 2], is at most 1: q is the chance that a slot's +-md_tolerance window holds one of
   the lane's defects were they scattered at random (the two prints that fix the grid are free),
   tests the grids and runs the side's defects could have offered. So a lane crowded with random
   defects needs more prints before a family counts, and a clean one needs three.
7. The members of kept families leave the group and the search goes on (two rolls at one CD);
   only the candidates near them are fitted again. It ends at a round that keeps no family.

Measured while writing it (2 shared cores): 40 seeded random maps each of 200, 1,000 and 3,000
defects over 300 m x 1,500 mm gave no family; 3,000 random defects take about 0.25 s, six long
roll marks among 3,500 defects 0.4 s, 30 full-width transverse lines of 100 defects each (135
families) 1.1 s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.coil.model import CoilDefect, PeriodicFamily
from pipeline.config import PeriodicConfig, RollConfig

MIN_PRINTS = 3  # two prints define a grid; the third is the first evidence of one
SEED_PARTNERS = 5  # nearest successors per defect that propose a period: the next print, a few missing
SEED_SUBMULTIPLES = 3  # d / 1, d / 2, d / 3
LOCAL_SLOTS = 8  # slots each side of a candidate's anchor in the local fit
LOOKUP = 4  # defects of one CD band within one slot's MD window looked at
GROWN_PER_ROUND = 8  # candidates (distinct anchors) grown over the whole lane per round
MAX_SUBMULTIPLE = 64  # a grown family is checked against period / 2 .. period / 64 (down to min_period)
MULTIPLES = 3  # and against 2 and 3 periods (a local fit seeded on a chance defect half-way)
HARMONIC_GROWS = 2  # of those that fill their grid better, the best few are grown
HARMONIC_STEPS = 3  # and from the best of those again
MAX_NFA = 1.0  # a-contrario: fewer than one such family expected by chance on this side
LOCAL_NFA = 1e4  # a local window this far from significant is not grown (a sparse family may still grow to it)


@dataclass(frozen=True)
class _Fit:
    """A family found in one group: ``members`` index the group's arrays, ``slots`` their grid slots."""

    members: np.ndarray
    slots: np.ndarray
    phase: float  # MD of slot 0
    period: float
    cd: float
    nfa: float

    @property
    def count(self) -> int:
        return int(self.members.size)

    @property
    def expected(self) -> int:
        return int(self.slots[-1] - self.slots[0]) + 1

    @property
    def score(self) -> float:
        return self.count * self.count / self.expected


def find_families(
    defects: Sequence[CoilDefect],
    *,
    cfg: PeriodicConfig,
    rolls: Sequence[RollConfig],
    roll_tolerance: float,
) -> list[PeriodicFamily]:
    """The periodic families of ``defects`` (any coil map, live or finished), by the module's method.

    Sorted by side, then confidence (highest first). ``phase_m`` is the fitted grid position of the
    first member (within md_tolerance of that print's MD); ``md_m`` the members' MD in order.
    """
    if not roll_tolerance > 0:
        raise ValueError(f"roll_tolerance must be positive, got {roll_tolerance}")
    if cfg.max_period_m <= cfg.min_period_m:
        raise ValueError(f"max_period_m ({cfg.max_period_m}) must be above min_period_m ({cfg.min_period_m})")
    if 2.0 * cfg.md_tolerance_mm / 1000.0 >= cfg.min_period_m:
        # Slot windows would touch: every defect would sit on every grid of the shortest periods.
        raise ValueError(
            f"md_tolerance_mm ({cfg.md_tolerance_mm}) must be below half of min_period_m ({cfg.min_period_m} m)"
        )
    families: list[PeriodicFamily] = []
    for side in sorted({d.side for d in defects}):
        mine = [d for d in defects if d.side == side]
        md = np.array([d.md_m for d in mine], dtype=np.float64)
        cd = np.array([d.cd_mm for d in mine], dtype=np.float64)
        if not (np.isfinite(md).all() and np.isfinite(cd).all()):
            raise ValueError(f"{side} side: a defect has a non-finite md_m or cd_mm")
        # The chance model spreads a lane's defects over the MD this side has seen so far.
        extent = max(float(md.max() - md.min()), cfg.md_tolerance_mm / 1000.0)
        tests = _grid_count(cd, extent, cfg)
        for group in _cd_groups(cd, 2.0 * cfg.lane_mm):
            g = group[np.argsort(md[group], kind="stable")]
            for fit in _search_group(md[g], cd[g], extent, tests, cfg):
                count, expected = fit.count, fit.expected
                period = fit.period
                families.append(
                    PeriodicFamily(
                        side=side,
                        cd_mm=fit.cd,
                        period_m=period,
                        phase_m=fit.phase + float(fit.slots[0]) * period,
                        count=count,
                        confidence=count / expected,
                        md_m=tuple(float(v) for v in md[g][fit.members]),
                        confirmed=count >= cfg.confirm_repeats,
                        roll=match_roll(period, side, rolls, roll_tolerance),
                    )
                )
    families.sort(key=lambda f: (f.side, -f.confidence, -f.count, f.cd_mm, f.phase_m))
    return families


def match_roll(period_m: float, side: str, rolls: Sequence[RollConfig], tolerance: float) -> str | None:
    """The name of the roll of ``side`` (or "both") whose circumference matches ``period_m`` within
    the relative ``tolerance``, the closest one if several; None if none.

    The tolerance is symmetric on purpose: a worn or reground roll prints a shorter period (its
    diameter is below nominal, by up to a few per cent over its life), but a roll in a reducing
    stand prints a longer one (forward slip, and the strip's elongation in later stands stretches
    the mark spacing), so neither sign can be ruled out for a roll table in general. A mill whose
    rolls only wear sets the tolerance to cover the wear; the closest match wins either way.
    """
    if not period_m > 0:
        raise ValueError(f"period_m must be positive, got {period_m}")
    best: tuple[float, str] | None = None
    for roll in rolls:
        if roll.side not in (side, "both"):
            continue
        circumference_m = roll.circumference_mm / 1000.0
        err = abs(period_m - circumference_m) / circumference_m
        if err <= tolerance and (best is None or err < best[0]):
            best = (err, roll.name)
    return None if best is None else best[1]


def _grid_count(cd: np.ndarray, extent: float, cfg: PeriodicConfig) -> float:
    """The number of tests of the a-contrario count: the grids that pairs of one side's lane defects
    can define. A pair D apart is a grid for every m with D / m in [min_period, max_period], about
    D * (1 / min_period - 1 / max_period) of them; D is taken as extent / 3, the mean distance of
    two points scattered at random over the extent (the pairs themselves are not formed: a dense
    lane would hold millions)."""
    s = np.sort(cd)
    pairs = float((np.searchsorted(s, s + cfg.lane_mm, side="right") - np.arange(1, s.size + 1)).sum())
    per_pair = 1.0 + extent / 3.0 * (1.0 / cfg.min_period_m - 1.0 / cfg.max_period_m)
    return max(pairs, 1.0) * per_pair


def _cd_groups(cd: np.ndarray, gap: float) -> list[np.ndarray]:
    """Indices of ``cd`` by single linkage: sorted neighbours at most ``gap`` apart share a group."""
    if cd.size == 0:
        return []
    order = np.argsort(cd, kind="stable")
    breaks = np.flatnonzero(np.diff(cd[order]) > gap) + 1
    return [g for g in np.split(order, breaks) if g.size >= MIN_PRINTS]


@dataclass(frozen=True)
class _Local:
    """Candidates and their local fits (``_local_fit``), indices into the group's arrays; ``members``
    (C, slots) holds -1 for an empty slot."""

    anchor: np.ndarray
    cd0: np.ndarray
    phase: np.ndarray
    period: np.ndarray
    span: np.ndarray
    count: np.ndarray
    members: np.ndarray

    def take(self, rows: np.ndarray) -> _Local:
        return _Local(*(getattr(self, f)[rows] for f in _LOCAL_FIELDS))

    def join(self, other: _Local) -> _Local:
        return _Local(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in _LOCAL_FIELDS))


_LOCAL_FIELDS = ("anchor", "cd0", "phase", "period", "span", "count", "members")


def _search_group(md: np.ndarray, cd: np.ndarray, extent: float, tests: float, cfg: PeriodicConfig) -> list[_Fit]:
    """Families in one CD group (``md`` ascending), round by round until a round finds none.

    A kept family's prints leave the group: their CD becomes NaN, in no lane. Only the candidates
    near them (their seeds or local fits could change) are fitted again; the others, and the
    candidates that failed to grow, carry over.
    """
    tol = cfg.md_tolerance_mm / 1000.0
    cd = cd.copy()
    local = _local_candidates(md, cd, np.ones(md.size, dtype=bool), tol, cfg)
    failed = np.zeros(local.anchor.size, dtype=bool)
    found: list[_Fit] = []
    while True:
        fits = _round(md, cd, local, failed, extent, tests, cfg)
        if not fits:
            return found
        found += fits
        taken = np.concatenate([f.members for f in fits])
        gone = np.sort(cd[taken])
        cd[taken] = np.nan
        # Anchors within 2 lanes of a print that left: their lanes lost it.
        near = np.searchsorted(gone, cd + 2.0 * cfg.lane_mm, side="right") > np.searchsorted(
            gone, cd - 2.0 * cfg.lane_mm, side="left"
        )
        stale = near[local.anchor] | np.isnan(cd[local.anchor])
        stale |= ((local.members >= 0) & np.isnan(cd[np.maximum(local.members, 0)])).any(axis=1)
        keep = np.flatnonzero(~stale)
        local = local.take(keep).join(_local_candidates(md, cd, near & ~np.isnan(cd), tol, cfg))
        failed = np.concatenate([failed[keep], np.zeros(local.anchor.size - keep.size, dtype=bool)])


def _local_candidates(md: np.ndarray, cd: np.ndarray, anchors: np.ndarray, tol: float, cfg: PeriodicConfig) -> _Local:
    """Seeds of the defects where ``anchors``, and their local fits."""
    seeds = _seeds(md, cd, tol, cfg)
    if seeds is not None:
        anchor, period, delta, cd0 = seeds
        mine = anchors[anchor]
        seeds = (anchor[mine], period[mine], delta[mine], cd0[mine])
    if seeds is None or seeds[0].size == 0:
        none, no_ints = np.empty(0), np.empty(0, dtype=np.int64)
        return _Local(no_ints, none, none, none, none, no_ints, np.empty((0, 2 * LOCAL_SLOTS + 1), dtype=np.int64))
    anchor, period, delta, cd0 = seeds
    count, span, phase, period, members = _local_fit(md, cd, anchor, period, delta, cd0, tol, cfg.lane_mm)
    return _Local(anchor, cd0, phase, period, span, count, members)


def _round(
    md: np.ndarray,
    cd: np.ndarray,
    local: _Local,
    failed: np.ndarray,
    extent: float,
    tests: float,
    cfg: PeriodicConfig,
) -> list[_Fit]:
    """One search round: the most significant local fits not tried yet are grown (``failed`` marks
    those that did not make a significant family); the significant disjoint families."""
    tol = cfg.md_tolerance_mm / 1000.0
    # The local window's own significance: the most significant first, and none that is hopeless.
    cs = np.sort(cd)  # NaN (prints gone) sort last and are never counted
    lane_count = np.searchsorted(cs, local.cd0 + cfg.lane_mm, side="right") - np.searchsorted(
        cs, local.cd0 - cfg.lane_mm
    )
    rate = lane_count / extent * 2.0 * tol
    log_nfa = math.log(tests) + _log_tail(local.span.astype(np.int64) - 2, local.count - 2, rate)
    ok = (local.count >= MIN_PRINTS) & (log_nfa <= math.log(LOCAL_NFA)) & ~failed
    if not ok.any():
        return []
    # Among equal ones the shorter period first (a complete 2p grid is as significant as p locally).
    order = np.lexsort((local.period, log_nfa))
    order = order[ok[order]]
    claimed = np.zeros(md.size, dtype=bool)
    grown: list[_Fit] = []
    tried = 0
    for c in order:
        # A candidate next to a family grown this round would mostly share its prints: it waits
        # for the next round, and the tries go to other lanes.
        if claimed[local.anchor[c]] or any(abs(local.cd0[c] - f.cd) <= 2.0 * cfg.lane_mm for f in grown):
            continue
        mem = local.members[c]
        claimed[mem[mem >= 0]] = True
        best = _grow_with_harmonics(
            md,
            cd,
            int(local.anchor[c]),
            float(local.phase[c]),
            float(local.period[c]),
            float(local.span[c]),
            tol,
            extent,
            tests,
            cfg,
        )
        if best is not None and best.nfa <= MAX_NFA:
            # Its other prints would only grow it again. (A family that failed claims only the
            # prints near its anchor: a bad start must not hide a real family's other anchors.)
            claimed[best.members] = True
            grown.append(best)
        else:
            failed[c] = True
        tried += 1
        if tried >= GROWN_PER_ROUND:
            break
    # Disjoint families, best first; one that shares a print with a better one waits for the next round.
    grown.sort(key=lambda f: (-f.score, -f.count, f.period))
    kept: list[_Fit] = []
    used = np.zeros(md.size, dtype=bool)
    for fit in grown:
        if used[fit.members].any():
            continue
        used[fit.members] = True
        kept.append(fit)
    return kept


def _seeds(
    md: np.ndarray, cd: np.ndarray, tol: float, cfg: PeriodicConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Candidate (anchor, period, period uncertainty, CD) from each defect's nearest lane successors."""
    n = md.size
    lo = np.maximum(np.searchsorted(md, md + cfg.min_period_m - tol, side="left"), np.arange(1, n + 1))
    hi = np.searchsorted(md, md + cfg.max_period_m + tol, side="right")
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    if total == 0:
        return None
    i = np.repeat(np.arange(n), counts)
    j = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)
    near = np.abs(cd[j] - cd[i]) <= cfg.lane_mm
    i, j = i[near], j[near]
    if i.size == 0:
        return None
    # i is sorted: a pair's rank among its anchor's lane successors, nearest in MD first.
    rank = np.arange(i.size) - np.searchsorted(i, i, side="left")
    keep = rank < SEED_PARTNERS
    i, j = i[keep], j[keep]
    d = md[j] - md[i]
    anchors, periods, deltas, cds = [], [], [], []
    for k in range(1, SEED_SUBMULTIPLES + 1):
        p = d / k
        fits = (p >= cfg.min_period_m - tol) & (p <= cfg.max_period_m + tol)
        anchors.append(i[fits])
        periods.append(p[fits])
        # Each print is within tol of the grid: the pair fixes k periods to 2 tol.
        deltas.append(np.full(int(fits.sum()), 2.0 * tol / k))
        cds.append((cd[i[fits]] + cd[j[fits]]) / 2.0)
    anchor = np.concatenate(anchors)
    if anchor.size == 0:
        return None
    period, delta, cd0 = np.concatenate(periods), np.concatenate(deltas), np.concatenate(cds)
    # One candidate per anchor and period (to within tol): prints of a transverse mark a few mm
    # apart in CD, or d / 2 of one pair and d of the next, would only repeat the same local fit.
    # The one measured over the most slots stays.
    q = np.rint(period / tol).astype(np.int64)
    order = np.lexsort((delta, q, anchor))
    a, qq = anchor[order], q[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (qq[1:] != qq[:-1])
    keep = order[first]
    return anchor[keep], period[keep], delta[keep], cd0[keep]


@dataclass(frozen=True)
class _LaneIndex:
    """The defects sorted by (CD band, MD): the ones of one lane near an MD are a few searchsorted
    calls away, even where a transverse mark puts dozens across the width at the same MD."""

    order: np.ndarray  # group indices, in key order
    key: np.ndarray  # band * stride + (md - md0), ascending
    band_mm: float
    md0: float
    stride: float

    @staticmethod
    def build(md: np.ndarray, cd: np.ndarray, lane_mm: float, margin: float) -> _LaneIndex:
        # Bands 2 lanes wide: a lane (cd0 +- lane_mm) touches two at most.
        band_mm = 2.0 * lane_mm
        md0 = float(md.min()) - margin
        stride = float(md.max()) + margin - md0 + 1.0
        idx = np.flatnonzero(~np.isnan(cd))
        key = np.floor(cd[idx] / band_mm) * stride + (md[idx] - md0)
        order = np.argsort(key, kind="stable")
        return _LaneIndex(idx[order], key[order], band_mm, md0, stride)

    def lookup(
        self, md: np.ndarray, cd: np.ndarray, pred: np.ndarray, window: np.ndarray, cd0: np.ndarray, lane_mm: float
    ) -> np.ndarray:
        """Per predicted MD (C, S): the index of the closest defect within ``window`` of it and
        ``lane_mm`` of the row's ``cd0``, or -1."""
        lo_md = np.clip(pred - window - self.md0, 0.0, self.stride - 1.0)
        hi_md = np.clip(pred + window - self.md0, 0.0, self.stride - 1.0)
        found = []
        for edge in (-lane_mm, lane_mm):
            base = (np.floor((cd0 + edge) / self.band_mm) * self.stride)[:, None]
            lo = np.searchsorted(self.key, base + lo_md, side="left")
            hi = np.searchsorted(self.key, base + hi_md, side="right")
            pos = lo[..., None] + np.arange(LOOKUP)
            inside = pos < hi[..., None]
            found.append(np.where(inside, self.order[np.minimum(pos, self.order.size - 1)], -1))
        idx = np.concatenate(found, axis=-1)
        safe = np.maximum(idx, 0)
        valid = (idx >= 0) & (np.abs(cd[safe] - cd0[:, None, None]) <= lane_mm)
        resid = np.where(valid, np.abs(md[safe] - pred[..., None]), np.inf)
        best = resid.argmin(axis=-1)
        hit = np.take_along_axis(safe, best[..., None], axis=-1)[..., 0]
        return np.where(np.isfinite(resid.min(axis=-1)), hit, -1)


def _local_fit(
    md: np.ndarray,
    cd: np.ndarray,
    anchor: np.ndarray,
    period: np.ndarray,
    delta: np.ndarray,
    cd0: np.ndarray,
    tol: float,
    lane_mm: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every candidate's grid at slots -LOCAL_SLOTS..LOCAL_SLOTS of its anchor, in two passes.

    Returns (count, span in slots, phase, period, members (C, slots) with -1 for an empty slot).
    """
    reach = (LOCAL_SLOTS + 1) * float(period.max()) + (1 + 2 * LOCAL_SLOTS) * tol
    index = _LaneIndex.build(md, cd, lane_mm, reach)
    base = md[anchor]
    # Pass 1: the seed's grid near its pair (the partner is at slot k <= SEED_SUBMULTIPLES), each
    # slot's window widened by the period uncertainty.
    near = np.arange(-SEED_SUBMULTIPLES, SEED_SUBMULTIPLES + 1, dtype=np.float64)
    pred = base[:, None] + near[None, :] * period[:, None]
    window = tol + np.abs(near)[None, :] * delta[:, None]
    hit = index.lookup(md, cd, pred, window, cd0, lane_mm)
    w = (hit >= 0).astype(np.float64)
    y = np.where(hit >= 0, md[np.maximum(hit, 0)] - base[:, None], 0.0)
    # Theil-Sen, not least squares: a defect inside the widened window but off the grid (by more
    # than md_tolerance, or a distractor) must not tilt the grid away from the real prints.
    a, b, ok = _robust_lines(near, y, w > 0)
    # Pass 2: the refitted grid; the period error from a span of s slots is at most 2 tol / s.
    nn = np.broadcast_to(near, w.shape)
    lo_slot = np.where(w > 0, nn, np.inf).min(axis=-1)
    hi_slot = np.where(w > 0, nn, -np.inf).max(axis=-1)
    span = np.where(ok, hi_slot - lo_slot, 1.0)
    slots = np.arange(-LOCAL_SLOTS, LOCAL_SLOTS + 1, dtype=np.float64)
    nn = np.broadcast_to(slots, (anchor.size, slots.size))
    period2 = np.where(ok & (b > 0), b, period)
    phase2 = base + np.where(ok, a, 0.0)
    outside = np.maximum(np.maximum(lo_slot[:, None] - slots[None, :], slots[None, :] - hi_slot[:, None]), 0.0)
    pred = phase2[:, None] + slots[None, :] * period2[:, None]
    window = tol + outside * (2.0 * tol / np.maximum(span, 1.0))[:, None]
    hit = index.lookup(md, cd, pred, window, cd0, lane_mm)
    found = hit >= 0
    count = found.sum(axis=-1)
    lo_slot = np.where(found, nn, np.inf).min(axis=-1)
    hi_slot = np.where(found, nn, -np.inf).max(axis=-1)
    span = np.where(count > 0, hi_slot - lo_slot + 1.0, 1.0)
    return count, span, phase2, period2, hit


def _grow_with_harmonics(
    md: np.ndarray,
    cd: np.ndarray,
    anchor: int,
    phase: float,
    period: float,
    known: float,
    tol: float,
    extent: float,
    tests: float,
    cfg: PeriodicConfig,
) -> _Fit | None:
    """The family grown from a local fit at ``period``, or at the multiple or sub-multiple of it whose
    grid the members fill best; significant or not (the caller tests it).

    The variant that fits best is chosen before the significance test: where p falls short of it,
    p / 2 with a chance defect on a half-way slot or two must not stand in for it.
    """
    best = _grow(md, cd, float(cd[anchor]), phase, period, known, tol, extent, tests, cfg)
    if best is None:
        return None
    # Again from a better variant: 1.5p leads to p / 2 (a third of it), and that to p.
    for _ in range(HARMONIC_STEPS):
        start_from = best
        for start, p, span in _better_harmonics(md, cd, start_from, tol, cfg)[:HARMONIC_GROWS]:
            fit = _grow(md, cd, start_from.cd, start, p, span, tol, extent, tests, cfg)
            if fit is not None and (fit.score, fit.count, -fit.period) > (best.score, best.count, -best.period):
                best = fit
        if best is start_from:
            break
    return best


def _better_harmonics(
    md: np.ndarray, cd: np.ndarray, fit: _Fit, tol: float, cfg: PeriodicConfig
) -> list[tuple[float, float, float]]:
    """(phase, period, span in slots) of the sub-multiples and multiples of ``fit``'s period whose grids the lane's
    defects over the family's MD fill better than its own (count^2 / slots), best first.

    Locally a complete grid of 5p looks as good as p, so a family can be grown at a multiple;
    scoring every sub-multiple down to min_period is one pass over the lane (no growth), and only
    the few that beat the family are grown. A multiple's grid need not pass through the family's
    first print (it may be the chance defect): every phase is scored.
    """
    first = fit.phase + float(fit.slots[0]) * fit.period
    last = fit.phase + float(fit.slots[-1]) * fit.period
    lane = np.abs(cd - fit.cd) <= cfg.lane_mm
    y = md[lane & (md >= first - tol) & (md <= last + tol)]
    k_max = min(int(fit.period / max(cfg.min_period_m - tol, 1e-9)), MAX_SUBMULTIPLE)
    # (phase, period, slots over which the period is known: the family's span in the new slots)
    grids = [(first, fit.period, float(fit.expected))]
    grids += [(first, fit.period / k, float(fit.expected * k)) for k in range(2, k_max + 1)]
    grids += [
        (first + j * fit.period, fit.period * m, max(fit.expected / m, 1.0))
        for m in range(2, MULTIPLES + 1)
        if fit.period * m <= cfg.max_period_m + tol
        for j in range(m)
    ]
    phase = np.array([g[0] for g in grids])[:, None]
    period = np.array([g[1] for g in grids])[:, None]
    n = np.rint((y[None, :] - phase) / period)
    hit = np.abs(y[None, :] - phase - n * period) <= tol
    count = hit.sum(axis=1)
    lo = np.where(hit, n, np.inf).min(axis=1)
    hi = np.where(hit, n, -np.inf).max(axis=1)
    score = np.where(count >= MIN_PRINTS, count**2 / np.maximum(hi - lo + 1, 1), 0.0)
    better = np.flatnonzero(score > score[0])
    better = better[np.argsort(-score[better], kind="stable")]
    return [grids[b] for b in better]


def _closest_per_slot(n: np.ndarray, resid: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One print per slot, the closest to the grid: (indices, slots), ascending slots."""
    order = np.lexsort((resid, n))
    n, idx = n[order], idx[order]
    first = np.ones(n.size, dtype=bool)
    first[1:] = n[1:] != n[:-1]
    return idx[first], n[first]


def _grow(
    md: np.ndarray,
    cd: np.ndarray,
    cd0: float,
    phase: float,
    period: float,
    known: float,
    tol: float,
    extent: float,
    tests: float,
    cfg: PeriodicConfig,
) -> _Fit | None:
    """Grow a grid (slot 0 at ``phase``) over the lane around ``cd0``, then hold it to tol.

    ``known``: the span in slots over which ``period`` was measured (its error is at most
    2 tol / known); the grid is refitted once its members span more.
    """
    n_lo = n_hi = 0.0
    members = slots = np.empty(0, dtype=np.int64)
    for _ in range(2):  # the second time round, the lane is centred on the members' median CD
        lane = np.flatnonzero(np.abs(cd - cd0) <= cfg.lane_mm)
        y = md[lane]
        reach = 1.0
        while True:
            n = np.rint((y - phase) / period)
            span = max(n_hi - n_lo, known, 1.0)
            # The window at least doubles every time, whether or not the members grew.
            reach = max(2.0 * reach, span)
            w_lo, w_hi = n_lo - reach, n_hi + reach
            outside = np.maximum(np.maximum(n_lo - n, n - n_hi), 0.0)
            resid = np.abs(y - phase - n * period)
            near = (n >= w_lo) & (n <= w_hi) & (resid <= tol + outside * 2.0 * tol / span)
            members, slots = _closest_per_slot(n[near], resid[near], lane[near])
            covered = w_lo <= n.min() and w_hi >= n.max()
            if slots.size >= 2:
                n_lo, n_hi = min(n_lo, float(slots[0])), max(n_hi, float(slots[-1]))
                if slots[-1] - slots[0] >= known:
                    phase, period = _robust_refit(md[members], slots)
                    if period <= 0:
                        return None
                    n_lo, n_hi, known = float(slots[0]), float(slots[-1]), 0.0
            elif covered:
                return None
            if covered:
                break
        for _ in range(2):  # held to the final grid, over the run of slots the members fill best
            n = np.rint((y - phase) / period)
            resid = np.abs(y - phase - n * period)
            near = (resid <= tol) & (n >= n_lo) & (n <= n_hi)
            # Where a print beyond a gap could be a chance defect: the lane's other defects (at
            # least one) per slot window. The family's own prints would make a short, clean lane
            # look crowded.
            rate = max(lane.size - members.size, 1) / extent * 2.0 * tol
            members, slots = _most_significant_run(*_closest_per_slot(n[near], resid[near], lane[near]), rate)
            if slots.size < 2:
                return None
            phase, period = _refit(md[members], slots)
            if period <= 0:
                return None
            n_lo, n_hi = float(slots[0]), float(slots[-1])
        cd0 = float(np.median(cd[members]))
    if members.size < MIN_PRINTS:
        return None
    expected = int(slots[-1] - slots[0]) + 1
    lane_count = int((np.abs(cd - cd0) <= cfg.lane_mm).sum())
    log_tail = _log_tail(np.array([expected - 2]), np.array([members.size - 2]), lane_count / extent * 2.0 * tol)
    # The run [first, last] was chosen too: about (extent / period)^2 / 2 runs per grid.
    runs = max(1.0, (extent / period) ** 2 / 2.0)
    nfa = tests * runs * math.exp(float(log_tail[0]))
    return _Fit(members, slots.astype(np.int64), phase, period, cd0, nfa)


def _most_significant_run(members: np.ndarray, slots: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """The run of consecutive members (ascending ``slots``) least likely by chance, ``rate`` defects
    expected in a slot's window (the a-contrario test, on the leading term of the binomial tail).

    In a lane with many defects one of them can sit on the grid far from the family and stretch it,
    halving its confidence: dropping it makes the family more significant. A long gap with many
    prints on both sides, such as a camera outage, is bridged: the prints beyond it add more
    evidence than the empty slots take away. A best run starts after a gap and ends before one, so
    only those are scored.
    """
    if slots.size < 3:
        return members, slots
    gap = np.diff(slots) > 1
    starts = np.flatnonzero(np.concatenate(([True], gap)))
    ends = np.flatnonzero(np.concatenate((gap, [True])))
    k = (ends[None, :] - starts[:, None] + 1 - 2).astype(np.float64)  # the two seed prints are free
    n = (slots[ends][None, :] - slots[starts][:, None] + 1 - 2).astype(np.float64)
    valid = (k >= 1) & (n >= k)
    kk, nn = np.where(valid, k, 1.0), np.where(valid, n, 1.0)
    log_fact = _log_factorials(int(nn.max()))
    ki, ni = kk.astype(np.int64), nn.astype(np.int64)
    log_choose = log_fact[ni] - log_fact[ki] - log_fact[ni - ki]
    log_p = np.where(valid, log_choose + kk * math.log(-math.expm1(-rate)) - (nn - kk) * rate, np.inf)
    # The least likely run; among equal ones the one with more prints.
    best = np.lexsort((-k.ravel(), log_p.ravel()))[0]
    i, j = np.unravel_index(int(best), log_p.shape)
    if not np.isfinite(log_p[i, j]):
        return members, slots
    return members[starts[i] : ends[j] + 1], slots[starts[i] : ends[j] + 1]


def _log_factorials(top: int) -> np.ndarray:
    """log(i!) for i = 0..top."""
    return np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, top + 1, dtype=np.float64)))))


def _row_median(x: np.ndarray) -> np.ndarray:
    """Per row, the median of the non-NaN entries (0 for a row with none)."""
    valid = ~np.isnan(x)
    v = valid.sum(axis=-1)
    srt = np.sort(np.where(valid, x, np.inf), axis=-1)
    lo = np.take_along_axis(srt, np.maximum((v - 1) // 2, 0)[:, None], axis=-1)[:, 0]
    hi = np.take_along_axis(srt, np.maximum(v // 2, 0)[:, None], axis=-1)[:, 0]
    return np.where(v > 0, (lo + hi) / 2.0, 0.0)


def _robust_lines(n: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``y`` (C, S) at slots ``n`` (S,), Theil-Sen y = a + b n over the entries where ``w``:
    b the median slope of all pairs, a the median of y - b n; (a, b, ok), ok where a pair exists."""
    i, j = np.triu_indices(n.size, k=1)
    both = w[:, i] & w[:, j]
    slope = np.where(both, (y[:, j] - y[:, i]) / (n[j] - n[i]), np.nan)
    b = _row_median(slope)
    a = _row_median(np.where(w, y - b[:, None] * n[None, :], np.nan))
    return a, b, both.any(axis=-1)


def _robust_refit(y: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """Theil-Sen md = phase + n * period over a family's prints (ascending n): (phase, period).

    Up to 64 prints all pairs; beyond, each print with the one half the family further on (as many
    pairs as prints, each with a long baseline).
    """
    m = y.size
    if m <= 64:
        i, j = np.triu_indices(m, k=1)
    else:
        i = np.arange(m - m // 2)
        j = i + m // 2
    period = float(np.median((y[j] - y[i]) / (n[j] - n[i])))
    return float(np.median(y - period * n)), period


def _refit(y: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """Least squares md = phase + n * period over a family's prints (two slots at least)."""
    nc = n - n.mean()
    period = float((nc * (y - y.mean())).sum() / (nc * nc).sum())
    return float(y.mean() - period * n.mean()), period


def _log_tail(n: np.ndarray, k: np.ndarray, rate: np.ndarray | float) -> np.ndarray:
    """log P[X >= k] for X ~ Binomial(n, q), q = 1 - exp(-rate) the chance that a slot's window
    holds a defect when ``rate`` are expected there (Poisson); elementwise, in log space (tails far
    below 1e-300 happen)."""
    n, k, rate = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(k, np.int64), np.asarray(rate, np.float64))
    out = np.where(k <= 0, 0.0, -np.inf)
    todo = (k > 0) & (k <= n) & (rate > 0)
    if not todo.any():
        return out
    nn, kk, x = n[todo], k[todo], rate[todo]
    top = int(nn.max())
    log_fact = _log_factorials(top)
    i = np.arange(top + 1)
    rest = np.clip(nn[:, None] - i, 0, None)
    # log q = log(1 - exp(-x)), log(1 - q) = -x: exact even where q rounds to 1.
    log_q = np.log(-np.expm1(-x))[:, None]
    terms = log_fact[nn][:, None] - log_fact[i] - log_fact[rest] + i * log_q - rest * x[:, None]
    terms = np.where((i >= kk[:, None]) & (i <= nn[:, None]), terms, -np.inf)
    peak = terms.max(axis=1)
    out[todo] = peak + np.log(np.exp(terms - peak[:, None]).sum(axis=1))
    return out
