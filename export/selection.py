"""Choose the 'auto' settings at fit time from the training images alone (issue 15).

A mill points stripinspect at surfaces nobody here has seen, so settings that won on one test
set are not defaults. What the fit can know is its normal images. It takes ``fit.choose.images``
of them (evenly over the folder), splits them into ``folds`` contiguous folds, and for every
candidate working scale:

1. embeds every chosen image and a copy of it with one painted anomaly (export/anomalies.py:
   cut-and-paste patch, stain, thin line; kinds in turn);
2. scores each fold's images, normal and painted, against a bank chosen from the other folds
   (cross-fitting, the same composable coreset as the fit), and its normal images' per-position
   statistics from the other folds' normal images;
3. scores every scoring candidate (position normalisation none / image / map, MAD floors, image
   score eq. 7 or 2 x 2 window) by image AUROC (painted against normal), pixel AUROC and AUPRO
   (maps against the painted masks, at most 256 px on the long side).

Candidates are listed in order of preference: full resolution first, then the settings measured
best on BSData and bottle before this choice existed (position z-score map, MAD floor 0.5, 2 x 2
window). The first candidate stays unless another beats its mean of the three figures by more
than ``fit.choose.margin``: the figures come from a few dozen images, and a difference smaller
than that was seen to flip with the painting seed alone.
Settings the config fixes are not chosen: only candidates with those values are scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from calibration.metrics import aupro, auroc
from export.anomalies import KINDS, paint
from export.coreset import StreamingCoreset, reduce_union
from pipeline.acquisition.images import read_image
from pipeline.config import Config, KnnConfig
from pipeline.inference.bundle import CandidateResult, ChosenSettings, Selection
from pipeline.inference.embed import OnnxEmbedder
from pipeline.inference.knn import FaissIndex
from pipeline.inference.patchcore import (
    floor_mad,
    image_score,
    median_mad,
    model_hw,
    nearest_patch_scores,
    resize_for_model,
)
from pipeline.inference.scoring import anomaly_map

TIE = 0.001
REPLICATES = 2
EVAL_SIDE = 256
EXACT = KnnConfig(index="flat")


@dataclass
class _Scored:
    """One held-out image scored at one scale: distances (h, w), eq. 7 score, z-scores by floor."""

    patch: np.ndarray
    reweighted: float
    model_hw: tuple[int, int]
    fold: int


def candidate_scales(cfg: Config, sizes: list[tuple[int, int]]) -> list[float]:
    """The scales to try: the pinned one, or ``fit.choose.scales`` that keep the median image's
    short side at least ``min_side`` and (enlarging) its long side at most ``max_side``."""
    if cfg.fit.scale != "auto":
        return [float(cfg.fit.scale)]
    ch = cfg.fit.choose
    short = float(np.median([min(s) for s in sizes]))
    long = float(np.median([max(s) for s in sizes]))
    out = []
    for s in ch.scales:
        if s == 1.0 or (short * s >= ch.min_side and (s < 1.0 or long * s <= ch.max_side)):
            out.append(float(s))
    return out or [1.0]


def scoring_candidates(cfg: Config, with_stats: bool) -> list[tuple[str, float, str]]:
    """(position_normalise, mad_floor, image_score) in order of preference, those the config
    leaves open. Without statistics only 'none' applies (the floor is then unused: 0)."""
    sc = cfg.scoring
    out: list[tuple[str, float, str]] = []
    norms = ["map", "image", "none"] if with_stats else ["none"]
    floors = cfg.fit.choose.mad_floors if sc.mad_floor == "auto" else [float(sc.mad_floor)]
    # Without statistics PatchCore's own eq. 7 comes first; with them the window of z-scores.
    rules = ("window", "reweighted") if with_stats else ("reweighted", "window")
    for norm in norms:
        if sc.position_normalise not in ("auto", norm):
            continue
        for rule in rules:
            if sc.image_score not in ("auto", rule):
                continue
            if norm != "none" and rule == "reweighted":
                continue  # eq. 7 ignores the statistics: the same as 'none' for the image score
            for floor in floors if norm != "none" else [0.0]:
                out.append((norm, floor, rule))
    return out


ALL_SETTINGS = ["fit.scale", "scoring.position_normalise", "scoring.mad_floor", "scoring.image_score"]


def can_choose(cfg: Config, sizes: list[tuple[int, int]]) -> bool:
    """Whether there is something to choose from: at least two images of 16 px a side (painted
    anomalies need room) and ``fit.choose.images`` not 0."""
    return min(cfg.fit.choose.images, len(sizes)) >= 2 and min(min(s) for s in sizes) >= 16


def pinned_settings(cfg: Config) -> list[str]:
    sc = cfg.scoring
    names = {
        "fit.scale": cfg.fit.scale,
        "scoring.position_normalise": sc.position_normalise,
        "scoring.mad_floor": sc.mad_floor,
        "scoring.image_score": sc.image_score,
    }
    return [k for k, v in names.items() if v != "auto"]


def choose_settings(
    *,
    files: list[Path],
    sizes: list[tuple[int, int]],
    channels: int,
    cfg: Config,
    embedder: OnnxEmbedder,
    stride: int,
    progress: bool = True,
) -> Selection:
    """Score every candidate on held-out normal images and painted anomalies; see the module."""
    t0 = time.perf_counter()
    ch = cfg.fit.choose
    n = min(ch.images, len(files))
    pick = sorted({round(i * (len(files) - 1) / max(n - 1, 1)) for i in range(n)})
    folds = min(ch.folds, len(pick))
    fold_of = [i * folds // len(pick) for i in range(len(pick))]
    rng = np.random.default_rng(ch.seed)
    normals = [read_image(files[i], channels) for i in pick]
    # Two replicates: every image painted twice, with different kinds; a setting must win on both.
    painted: list[list[np.ndarray]] = [[], []]
    masks: list[list[np.ndarray]] = [[], []]
    kinds: list[str] = []
    for r in range(REPLICATES):
        for i, img in enumerate(normals):
            kind = KINDS[(i + r) % len(KINDS)]
            p, m = paint(img, kind, rng)
            painted[r].append(p)
            masks[r].append(_eval_mask(m))
            kinds.append(kind)
    scales = candidate_scales(cfg, [sizes[i] for i in pick])
    results: list[CandidateResult] = []
    bar = tqdm(total=3 * len(pick) * len(scales), desc="choose settings", disable=not progress, unit="img")
    for scale in scales:
        normal_s, painted_s = _score_at_scale(
            normals, painted, fold_of, folds, scale, cfg, embedder, stride, sizes, bar
        )
        with_stats = len({s.patch.shape for s in normal_s}) == 1 and len(pick) - len(pick) // folds >= 3
        # Per-position statistics for each fold from the other folds' held-out normal grids.
        stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if with_stats:
            grids = np.stack([s.patch for s in normal_s])
            for k in range(folds):
                stats[k] = median_mad(grids[[f != k for f in fold_of]])
        pixel_cache: dict[tuple[str, float, int], tuple[float, float]] = {}
        for norm, floor, rule in scoring_candidates(cfg, with_stats):
            normal_out = [_apply(s, stats, norm, floor, rule) for s in normal_s]
            figures = []
            for r in range(REPLICATES):
                painted_out = [_apply(s, stats, norm, floor, rule) for s in painted_s[r]]
                labels = np.r_[np.zeros(len(normal_out)), np.ones(len(painted_out))]
                img_auc = auroc(np.asarray([x[0] for x in normal_out + painted_out]), labels)
                key = ("map" if norm == "map" else "raw", floor if norm == "map" else 0.0, r)
                if key not in pixel_cache:
                    pixel_cache[key] = _pixel_figures(
                        [x[1] for x in normal_out + painted_out],
                        [None] * len(normals) + masks[r],
                        [*normal_s, *painted_s[r]],
                        [im.shape[:2] for im in normals + painted[r]],
                        scale,
                        cfg,
                        stride,
                    )
                figures.append((img_auc, *pixel_cache[key]))
            mean = np.mean(figures, axis=0)
            results.append(
                CandidateResult(
                    scale=scale,
                    position_normalise=norm,  # type: ignore[arg-type]
                    mad_floor=floor,
                    image_score=rule,  # type: ignore[arg-type]
                    image_auroc=round(float(mean[0]), 4),
                    pixel_auroc=round(float(mean[1]), 4),
                    aupro=round(float(mean[2]), 4),
                    objective=round(float(mean.mean()), 4),
                    replicates=[round(float(np.mean(f)), 4) for f in figures],
                )
            )
    bar.close()
    win = choose_candidate(results, ch.margin)
    return Selection(
        images=len(pick),
        folds=folds,
        anomalies={k: kinds.count(k) for k in KINDS},
        pinned=pinned_settings(cfg),
        seconds=round(time.perf_counter() - t0, 2),
        candidates=results,
        chosen=ChosenSettings(
            scale=win.scale,
            position_normalise=win.position_normalise,
            mad_floor=win.mad_floor,
            image_score=win.image_score,
        ),
    )


def choose_candidate(results: list[CandidateResult], margin: float) -> CandidateResult:
    """The first candidate (the preferred one) unless others beat it by more than ``margin`` in
    every replicate (each held-out image painted anew); then the best of those, the first within
    ``TIE`` of it. The figures come from a few dozen images and painted defects: a difference that
    one painting shows and the other does not is noise (docs/experiments.md measures how much)."""
    first = results[0]
    better = [
        r for r in results[1:] if all(a - b > margin for a, b in zip(r.replicates, first.replicates, strict=True))
    ]
    if not better:
        return first
    best = max(r.objective for r in better)
    return next(r for r in better if r.objective >= best - TIE)


def _score_at_scale(
    normals: list[np.ndarray],
    painted: list[list[np.ndarray]],
    fold_of: list[int],
    folds: int,
    scale: float,
    cfg: Config,
    embedder: OnnxEmbedder,
    stride: int,
    all_sizes: list[tuple[int, int]],
    bar: tqdm,
) -> tuple[list[_Scored], list[list[_Scored]]]:
    """Each held-out image, normal and painted, scored against a bank without its fold. The bank
    keeps the share of patches the whole fit will keep at this scale (ratio, capped rows)."""
    cc = cfg.fit.coreset
    whole = sum(math.ceil(h / stride) * math.ceil(w / stride) for h, w in (model_hw(*s, scale) for s in all_sizes))
    keep = min(1.0, min(math.ceil(cc.ratio * whole), cc.max_rows or whole) / whole)
    feats_n = []
    for img in normals:
        feats_n.append(embedder.embed(resize_for_model(img, scale)[None])[0])
        bar.update(1)
    dim = feats_n[0].shape[2]
    fold_patches = [
        sum(f.shape[0] * f.shape[1] for f, k in zip(feats_n, fold_of, strict=True) if k == j) for j in range(folds)
    ]
    parts = []
    for j in range(folds):
        core = StreamingCoreset(
            dim=dim,
            total_patches=fold_patches[j],
            final_rows=max(1, math.ceil(cc.oversample * keep * fold_patches[j])),
            oversample=1.0,
            chunk_patches=cc.chunk_patches,
            projection_dim=cc.projection_dim,
            seed=cc.seed + 1 + j,
        )
        for f, k in zip(feats_n, fold_of, strict=True):
            if k == j:
                core.add(f.reshape(-1, dim))
        parts.append(core.finish())
    normal_s: list[_Scored] = []
    painted_s: list[list[_Scored]] = [[] for _ in painted]
    for j in range(folds):
        rows = max(cfg.scoring.num_neighbors, math.ceil(keep * sum(p for k, p in enumerate(fold_patches) if k != j)))
        others = [p for k, p in enumerate(parts) if k != j]
        bank = reduce_union(others, rows, projection_dim=cc.projection_dim, seed=cc.seed)
        index = FaissIndex.from_bank(bank, threads=cfg.runtime.faiss_threads, knn=EXACT)
        for i, k in enumerate(fold_of):
            if k != j:
                continue
            h, w = normals[i].shape[:2]
            hw = model_hw(h, w, scale)
            patch, rew = nearest_patch_scores(index, feats_n[i], cfg.scoring.num_neighbors)
            normal_s.append(_Scored(patch=patch, reweighted=rew, model_hw=hw, fold=j))
            for r, replicate in enumerate(painted):
                pf = embedder.embed(resize_for_model(replicate[i], scale)[None])[0]
                bar.update(1)
                patch, rew = nearest_patch_scores(index, pf, cfg.scoring.num_neighbors)
                painted_s[r].append(_Scored(patch=patch, reweighted=rew, model_hw=hw, fold=j))
    # Folds are contiguous, so fold order is image order.
    return normal_s, painted_s


def _apply(
    s: _Scored, stats: dict[int, tuple[np.ndarray, np.ndarray]], norm: str, floor: float, rule: str
) -> tuple[float, np.ndarray]:
    """One held-out image under one scoring candidate: (image score, the map's patch scores)."""
    z = None
    if norm != "none":
        median, mad = floor_mad(*stats[s.fold], floor)
        z = (s.patch - median) / mad
    score = image_score(rule, patch=s.patch, reweighted=s.reweighted, z=z)
    return score, (z if z is not None and norm == "map" else s.patch)


def _eval_hw(hw: tuple[int, int]) -> tuple[int, int]:
    h, w = hw
    f = min(1.0, EVAL_SIDE / max(h, w))
    return max(1, round(h * f)), max(1, round(w * f))


def _eval_mask(mask: np.ndarray) -> np.ndarray:
    eh, ew = _eval_hw(mask.shape)
    return cv2.resize(mask.astype(np.float32), (ew, eh), interpolation=cv2.INTER_AREA) > 0.2


def _pixel_figures(
    maps: list[np.ndarray],
    masks: list[np.ndarray | None],
    scored: list[_Scored],
    image_hw: list[tuple[int, int]],
    scale: float,
    cfg: Config,
    stride: int,
) -> tuple[float, float]:
    """Pixel AUROC and AUPRO of the maps (as the scorer builds them, then at most EVAL_SIDE px)."""
    full_maps, full_masks = [], []
    for amap_scores, mask, s, hw in zip(maps, masks, scored, image_hw, strict=True):
        amap = anomaly_map(amap_scores, stride=stride, out_hw=s.model_hw, sigma=cfg.scoring.sigma * scale)
        eh, ew = _eval_hw(hw)
        full_maps.append(cv2.resize(amap, (ew, eh), interpolation=cv2.INTER_AREA))
        full_masks.append(mask if mask is not None else np.zeros((eh, ew), bool))
    scores = np.concatenate([m.ravel() for m in full_maps])
    labels = np.concatenate([m.ravel() for m in full_masks])
    return auroc(scores, labels), aupro(full_maps, full_masks)


def selection_table(sel: Selection) -> str:
    """The candidates and their figures, one line each, the chosen one marked."""
    c = sel.chosen
    lines = [
        f"settings chosen on {sel.images} held-out training images and {sum(sel.anomalies.values())} painted "
        f"anomalies ({', '.join(f'{v} {k}' for k, v in sel.anomalies.items())}), {sel.folds} folds, "
        f"{sel.seconds:.0f} s" + (f"; pinned by the config: {', '.join(sel.pinned)}" if sel.pinned else ""),
        "  scale  normalise  mad_floor  image_score  image_auroc  pixel_auroc  aupro   mean    replicates",
    ]
    for r in sel.candidates:
        mark = (
            "*"
            if (r.scale, r.position_normalise, r.mad_floor, r.image_score)
            == (c.scale, c.position_normalise, c.mad_floor, c.image_score)
            else " "
        )
        lines.append(
            f"{mark} {r.scale:5.2f}  {r.position_normalise:9}  {r.mad_floor:9.2f}  {r.image_score:11}  "
            f"{r.image_auroc:11.4f}  {r.pixel_auroc:11.4f}  {r.aupro:5.4f}  {r.objective:.4f}  "
            + " ".join(f"{x:.4f}" for x in r.replicates)
        )
    return "\n".join(lines)
