import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from calibration.metrics import aupro, auroc, label_regions


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 20, 500).astype(np.float32)  # many ties
    labels = rng.random(500) < 0.3
    scores[labels] += rng.integers(0, 5, labels.sum())
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        auroc(np.ones(4), np.zeros(4, bool))


def _brute_force_aupro(maps: list[np.ndarray], masks: list[np.ndarray], max_fpr: float) -> float:
    """Threshold by threshold, straight from the definition (MVTec AD)."""
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    neg_total = sum(int((~m).sum()) for m in masks)
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        fp = sum(int(((a >= t) & ~m).sum()) for a, m in zip(maps, masks, strict=True))
        overlaps = []
        for a, m in zip(maps, masks, strict=True):
            lab, n = ndimage.label(m, structure=np.ones((3, 3)))
            overlaps += [float((a[lab == r] >= t).mean()) for r in range(1, n + 1)]
        fprs.append(fp / neg_total)
        pros.append(float(np.mean(overlaps)))
    f, p = np.array(fprs), np.array(pros)
    keep = f <= max_fpr
    i = int(np.argmin(keep))
    if keep.all():
        xs, ys = f, p
    else:
        x0, x1, y0, y1 = f[i - 1], f[i], p[i - 1], p[i]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        xs, ys = np.r_[f[:i], max_fpr], np.r_[p[:i], y_cut]
    return float(np.trapezoid(ys, xs) / max_fpr)


@pytest.mark.parametrize(("seed", "max_fpr", "levels"), [(0, 0.3, 1000), (1, 0.3, 6), (2, 1.0, 1000), (3, 0.05, 12)])
def test_aupro_equals_brute_force(seed: int, max_fpr: float, levels: int) -> None:
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(3):
        mask = np.zeros((16, 20), bool)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 13), rng.integers(0, 17)
            mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
        amap = rng.random((16, 20)) + 0.6 * mask
        maps.append((np.round(amap * levels) / levels).astype(np.float32))  # coarse levels make ties
        masks.append(mask)
    assert aupro(maps, masks, max_fpr) == pytest.approx(_brute_force_aupro(maps, masks, max_fpr), abs=1e-9)


def test_aupro_perfect_and_inverted() -> None:
    mask = np.zeros((20, 20), bool)
    mask[5:9, 5:9] = True
    mask[12:14, 15:18] = True
    assert aupro([mask.astype(np.float32)], [mask]) == pytest.approx(1.0)
    assert aupro([(~mask).astype(np.float32)], [mask]) == pytest.approx(0.0)


def test_regions_are_eight_connected() -> None:
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one region
    mask[4, 4] = True
    assert label_regions(mask)[0] == 2
