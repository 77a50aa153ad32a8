"""Evaluate a bundle on an MVTec-layout folder: image AUROC, pixel AUROC, pixel AUPRO.

Layout: ``test/good/*`` (normal), ``test/<type>/*`` (defects), masks at
``ground_truth/<type>/<stem>.png`` or ``<stem>_mask.png``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calibration.metrics import (
    auroc,
    auroc_from_sorted,
    best_f1_threshold,
    label_regions,
    pro_auc_from_regions,
    roc_curve,
)
from calibration.plots import plot_overlay, plot_roc, plot_score_histogram
from pipeline.acquisition.images import ImageReadError, list_images, read_image, read_mask
from pipeline.config import Config
from pipeline.errors import StripinspectError
from pipeline.inference.backends import open_backend


class EvaluationError(StripinspectError):
    """The data folder or bundle cannot be evaluated; one line."""


@dataclass(frozen=True)
class TestImage:
    path: Path
    defect_type: str
    mask_path: Path | None


def find_test_images(data: Path) -> list[TestImage]:
    test = data / "test"
    if not test.is_dir():
        raise EvaluationError(f"{data}: no test/ folder (expected MVTec layout test/<type>/)")
    items: list[TestImage] = []
    for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        for img in list_images(type_dir):
            mask = None
            if type_dir.name != "good":
                gt = data / "ground_truth" / type_dir.name
                for cand in (gt / f"{img.stem}.png", gt / f"{img.stem}_mask.png"):
                    if cand.is_file():
                        mask = cand
                        break
                if mask is None:
                    raise EvaluationError(f"{img}: no mask {gt}/{img.stem}.png or {img.stem}_mask.png")
            items.append(TestImage(img, type_dir.name, mask))
    if not any(i.defect_type == "good" for i in items) or all(i.defect_type == "good" for i in items):
        raise EvaluationError(f"{test}: need both good and defect images")
    return items


def _per_type(
    types: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    neg: np.ndarray,
    regions: list[np.ndarray],
    region_types: list[str],
) -> dict[str, dict[str, float | int]]:
    """Each defect type on its own (MVTec bottle: broken_large, broken_small, contamination):
    image AUROC of its images against all normal ones; pixel AUROC and AUPRO of its regions
    against the normal pixels of every test image (the same negatives as the overall figures)."""
    out: dict[str, dict[str, float | int]] = {}
    for t in sorted(set(types.tolist()) - {"good"}):
        sel = (types == t) | ~labels
        regs = [r for r, rt in zip(regions, region_types, strict=True) if rt == t]
        pos = np.concatenate(regs) if regs else np.empty(0, np.float32)
        out[t] = {
            "images": int((types == t).sum()),
            "image_auroc": auroc(scores[sel], labels[sel]),
            "pixel_auroc": auroc_from_sorted(neg, pos) if regs else float("nan"),
            "pixel_aupro": pro_auc_from_regions(neg, regs, 0.3) if regs else float("nan"),
        }
    return out


class MetricTally:
    """Image scores and full-resolution score maps in, one image at a time; evaluate's figures out.

    The one place that turns scores, maps and masks into image AUROC, pixel AUROC and AUPRO,
    so that any scorer (a bundle here, a peer's model in benchmarks/vs_anomalib.py) is measured
    the same way. Keeps only what the metrics need: each image's score and label, the scores of
    its normal pixels and of each 8-connected ground-truth region.
    """

    def __init__(self) -> None:
        self._types: list[str] = []
        self._scores: list[float] = []
        self._negatives: list[np.ndarray] = []
        self._regions: list[np.ndarray] = []
        self._region_types: list[str] = []

    def add(self, *, defect_type: str, score: float, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """One test image: ``defect_type`` "good" for normal ones; ``anomaly_map`` (H, W) and bool
        ``mask`` (H, W) at the image's own size."""
        if anomaly_map.shape != mask.shape:
            raise EvaluationError(f"score map shape {anomaly_map.shape} differs from mask shape {mask.shape}")
        self._types.append(defect_type)
        self._scores.append(float(score))
        self._negatives.append(anomaly_map[~mask])
        n, lab = label_regions(mask)
        for r in range(1, n + 1):
            self._regions.append(anomaly_map[lab == r])
            self._region_types.append(defect_type)

    @property
    def scores(self) -> np.ndarray:
        return np.asarray(self._scores, dtype=np.float64)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([t != "good" for t in self._types], dtype=bool)

    def figures(self) -> tuple[dict[str, object], np.ndarray, np.ndarray]:
        """(metrics, every normal pixel's score ascending, every defect pixel's score); the
        per-pixel lists are dropped from the tally (they can hold hundreds of megabytes)."""
        scores, labels = self.scores, self.labels
        if labels.all() or not labels.any():
            raise EvaluationError("need both good and defect images")
        neg = np.sort(np.concatenate(self._negatives))
        self._negatives.clear()
        pos = np.concatenate(self._regions) if self._regions else np.empty(0, np.float32)
        metrics: dict[str, object] = {
            "image_auroc": auroc(scores, labels),
            "pixel_auroc": auroc_from_sorted(neg, pos),
            "pixel_aupro": pro_auc_from_regions(neg, self._regions, 0.3),
            "images": len(scores),
            "images_good": int((~labels).sum()),
            "images_defect": int(labels.sum()),
            "defect_regions": len(self._regions),
            "per_type": _per_type(np.asarray(self._types), scores, labels, neg, self._regions, self._region_types),
        }
        return metrics, neg, pos


def evaluate(
    *, bundle: Path, data: Path, out: Path, cfg: Config, overlays_per_type: int = 4, progress: bool = True
) -> dict[str, object]:
    items = find_test_images(data)
    scorer = open_backend(bundle, runtime=cfg.runtime, scoring=cfg.scoring)
    described = scorer.describe()
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay_dir = out.parent / "overlays"
    overlay_dir.mkdir(exist_ok=True)
    tally = MetricTally()
    kept: list[tuple[str, float, np.ndarray, np.ndarray, np.ndarray | None]] = []
    per_type_kept: dict[str, int] = {}
    seconds = 0.0
    rows = []
    for item in tqdm(items, desc="evaluate", disable=not progress, unit="img"):
        try:
            image = read_image(item.path, scorer.channels)
            mask = read_mask(item.mask_path, image.shape[:2]) if item.mask_path else np.zeros(image.shape[:2], bool)
        except ImageReadError as err:
            raise EvaluationError(str(err)) from None
        t = time.perf_counter()
        result = scorer.score(image)
        seconds += time.perf_counter() - t
        tally.add(defect_type=item.defect_type, score=result.score, anomaly_map=result.anomaly_map, mask=mask)
        rows.append((str(item.path.relative_to(data)), item.defect_type, int(item.defect_type != "good"), result.score))
        if per_type_kept.get(item.defect_type, 0) < overlays_per_type:
            per_type_kept[item.defect_type] = per_type_kept.get(item.defect_type, 0) + 1
            kept.append((f"{item.defect_type}_{item.path.stem}", result.score, image, result.anomaly_map, mask))
    figures, neg, pos = tally.figures()
    metrics: dict[str, object] = {
        **{k: v for k, v in figures.items() if k != "per_type"},
        "seconds_per_image": seconds / len(items),
        "per_type": figures["per_type"],
        "bundle": str(bundle),
        "backbone": described["backbone"],
        "bank_rows": described["bank_rows"],
        "scale": described["scale"],
        "data": str(data),
    }
    vmin = float(np.quantile(neg, 0.5))
    vmax = float(np.quantile(neg, 0.999999)) if neg.size else 1.0
    vmax = max(vmax, float(pos.max()) if pos.size else vmax)
    for name, score, image, amap, gt in kept:
        plot_overlay(
            overlay_dir / f"{name}.png",
            image=image,
            score_map=amap,
            mask=gt,
            vmin=vmin,
            vmax=vmax,
            title=f"{name}: image score {score:.3g} (green: ground truth)",
        )
    scores, is_defect = tally.scores, tally.labels
    _, best_t = best_f1_threshold(scores, is_defect)
    plot_score_histogram(
        out.parent / "scores.png",
        scores=scores,
        labels=is_defect,
        threshold=best_t,
        threshold_label="best-F1 threshold",
    )
    fpr, tpr = roc_curve(scores, is_defect)
    plot_roc(out.parent / "roc.png", fpr=fpr, tpr=tpr, auc=float(metrics["image_auroc"]))  # type: ignore[arg-type]
    with open(out.parent / "scores.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "type", "label", "score"])
        w.writerows(rows)
    out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
