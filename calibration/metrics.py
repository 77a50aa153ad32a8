"""Detection metrics as pure functions: AUROC and the area under the PRO curve.

Both are exact with tied scores and need only the normal (negative) scores sorted, so the
pixel metrics of a few hundred full-resolution images fit in memory.
"""

from __future__ import annotations

import cv2
import numpy as np


def auroc_from_sorted(neg_sorted: np.ndarray, pos: np.ndarray) -> float:
    """AUROC = P(pos > neg) + 0.5 P(pos == neg) (Mann-Whitney), ``neg_sorted`` ascending."""
    n, p = neg_sorted.size, pos.size
    if n == 0 or p == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    below = np.searchsorted(neg_sorted, pos, side="left").astype(np.float64)
    not_above = np.searchsorted(neg_sorted, pos, side="right").astype(np.float64)
    return float((below + 0.5 * (not_above - below)).sum() / (float(n) * float(p)))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    return auroc_from_sorted(np.sort(scores[~labels]), scores[labels])


def label_regions(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """8-connected defect regions of a bool mask: (count, int32 labels with 0 = background).

    The ground truth's regions for AUPRO as MVTec AD defines them (every annotated component,
    however small), not the alarm rule of ``pipeline.postprocess.regions``, which thresholds
    scores and drops regions under the minimum area."""
    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return n - 1, lab


def pro_auc_from_regions(neg_sorted: np.ndarray, region_scores: list[np.ndarray], max_fpr: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``max_fpr`` (MVTec AD's AUPRO).

    ``neg_sorted``: ascending scores of every normal pixel (all images, outside every mask).
    ``region_scores``: for each connected ground-truth region, the scores of its pixels.
    PRO(t) is the mean over regions of the fraction of the region scoring >= t; FPR(t) the
    fraction of normal pixels scoring >= t. The curve through all thresholds is integrated
    with the trapezoid rule up to FPR = max_fpr and divided by max_fpr.
    """
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if neg_sorted.size == 0 or not region_scores:
        raise ValueError("PRO needs normal pixels and at least one defect region")
    n_neg = float(neg_sorted.size)
    scores = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in region_scores])
    weights = np.concatenate([np.full(len(r), 1.0 / (len(r) * len(region_scores))) for r in region_scores])
    order = np.argsort(-scores, kind="stable")
    scores, weights = scores[order], weights[order]
    # Distinct defect-pixel thresholds, descending; PRO after including every pixel >= t.
    last_of_group = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    t = scores[last_of_group]
    pro = np.cumsum(weights)[last_of_group]
    fpr_gt = (n_neg - np.searchsorted(neg_sorted, t, side="right")) / n_neg
    fpr_ge = (n_neg - np.searchsorted(neg_sorted, t, side="left")) / n_neg
    # Between two defect thresholds only normal pixels enter: PRO stays flat while FPR grows,
    # then at t both jump together (a diagonal when normal pixels tie with t).
    pro_prev = np.r_[0.0, pro[:-1]]
    fx = np.r_[0.0, np.column_stack([fpr_gt, fpr_ge]).ravel(), 1.0]
    fy = np.r_[0.0, np.column_stack([pro_prev, pro]).ravel(), pro[-1]]
    inside = fx <= max_fpr
    k = int(np.argmin(inside)) if not inside.all() else fx.size
    xs, ys = fx[:k], fy[:k]
    if k < fx.size:
        x0, x1, y0, y1 = fx[k - 1], fx[k], fy[k - 1], fy[k]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.r_[xs, max_fpr], np.r_[ys, y_cut]
    return float(np.trapezoid(ys, xs) / max_fpr)


def aupro(score_maps: list[np.ndarray], masks: list[np.ndarray], max_fpr: float = 0.3) -> float:
    """AUPRO of whole score maps (H, W) and bool masks (H, W), one pair per image."""
    negatives = []
    regions: list[np.ndarray] = []
    for amap, mask in zip(score_maps, masks, strict=True):
        negatives.append(amap[~mask].ravel())
        n, lab = label_regions(mask)
        for r in range(1, n + 1):
            regions.append(amap[lab == r])
    neg = np.sort(np.concatenate(negatives))
    return pro_auc_from_regions(neg, regions, max_fpr)


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best F1, its threshold) over the rules ``score >= t`` for every distinct score, the
    lowest such t where several tie; (0, nan) when no rule finds a positive.

    One sort and two cumulative sums (O(n log n)): with distinct scores ascending, the true and
    false positives at t are the positives and negatives scoring >= t, summed from the top;
    F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.size != y.size:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if s.size == 0:
        return 0.0, float("nan")
    t, group = np.unique(s, return_inverse=True)
    pos = np.bincount(group, weights=y, minlength=t.size)
    neg = np.bincount(group, weights=~y, minlength=t.size)
    tp = np.cumsum(pos[::-1])[::-1]
    fp = np.cumsum(neg[::-1])[::-1]
    f1 = 2 * tp / np.maximum(1.0, tp + fp + float(y.sum()))
    k = int(np.argmax(f1))  # the first maximum: the lowest threshold
    if f1[k] <= 0:
        return 0.0, float("nan")
    return float(f1[k]), float(t[k])


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of the rules ``score >= t`` for every distinct
    score, from the highest t down, starting at (0, 0): one sort and two cumulative sums."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    p, n = int(y.sum()), int((~y).sum())
    if p == 0 or n == 0:
        raise ValueError("a ROC curve needs at least one positive and one negative score")
    t, group = np.unique(-s, return_inverse=True)  # distinct scores, highest first
    tp = np.cumsum(np.bincount(group, weights=y, minlength=t.size))
    fp = np.cumsum(np.bincount(group, weights=~y, minlength=t.size))
    return np.r_[0.0, fp / n], np.r_[0.0, tp / p]
