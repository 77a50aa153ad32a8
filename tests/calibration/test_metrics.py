import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from calibration.metrics import aupro, auroc, best_f1_threshold, label_regions, roc_curve


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


def _brute_force_best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Every distinct score as the threshold, F1 straight from its definition, lowest t on ties."""
    best_f1, best_t = 0.0, float("nan")
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp, fn = int((pred & labels).sum()), int((pred & ~labels).sum()), int((~pred & labels).sum())
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        if f1 > best_f1:
            best_f1, best_t = f1, float(t)
    return best_f1, best_t


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("levels", [6, 1000])  # many ties, and nearly none
def test_best_f1_equals_brute_force(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    labels = rng.random(n) < rng.uniform(0.05, 0.7)
    scores = (rng.integers(0, levels, n) + 2 * labels * rng.random(n)).astype(np.float32)
    assert best_f1_threshold(scores, labels) == _brute_force_best_f1(scores.astype(np.float64), labels)


def test_best_f1_without_positives_is_nan() -> None:
    f1, t = best_f1_threshold(np.arange(5.0), np.zeros(5, bool))
    assert f1 == 0.0 and np.isnan(t)
    assert best_f1_threshold(np.array([1.0, 2.0, 3.0]), np.array([False, True, True])) == (1.0, 2.0)


@pytest.mark.parametrize("seed", range(4))
def test_roc_curve_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(400) < 0.3
    scores = rng.integers(0, 30, 400) + 3.0 * labels
    fpr, tpr = roc_curve(scores, labels)
    ref_fpr, ref_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels), abs=1e-12)
