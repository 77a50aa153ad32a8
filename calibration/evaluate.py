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

import cv2
import numpy as np
from tqdm import tqdm

from calibration.metrics import (
    auroc,
    auroc_from_sorted,
    label_regions,
    pro_auc_from_regions,
)
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


def overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, vmin: float, vmax: float) -> np.ndarray:
    """BGR picture: the image, the heat map blended on it, the mask outline in green."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    norm = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    blend = cv2.addWeighted(base, 0.55, heat, 0.45, 0.0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(blend, contours, -1, (0, 255, 0), 1)
    return np.concatenate([base, blend], axis=1)


def evaluate(
    *, bundle: Path, data: Path, out: Path, cfg: Config, overlays_per_type: int = 4, progress: bool = True
) -> dict[str, object]:
    items = find_test_images(data)
    scorer = open_backend(bundle, runtime=cfg.runtime, scoring=cfg.scoring)
    described = scorer.describe()
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay_dir = out.parent / "overlays"
    overlay_dir.mkdir(exist_ok=True)
    image_scores: list[float] = []
    labels: list[bool] = []
    negatives: list[np.ndarray] = []
    regions: list[np.ndarray] = []
    kept: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] = []
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
        image_scores.append(result.score)
        labels.append(item.defect_type != "good")
        negatives.append(result.anomaly_map[~mask])
        n, lab = label_regions(mask)
        for r in range(1, n + 1):
            regions.append(result.anomaly_map[lab == r])
        rows.append((str(item.path.relative_to(data)), item.defect_type, int(labels[-1]), result.score))
        if per_type_kept.get(item.defect_type, 0) < overlays_per_type:
            per_type_kept[item.defect_type] = per_type_kept.get(item.defect_type, 0) + 1
            kept.append((f"{item.defect_type}_{item.path.stem}", image, result.anomaly_map, mask))
    neg = np.sort(np.concatenate(negatives))
    negatives.clear()
    pos = np.concatenate(regions) if regions else np.empty(0, np.float32)
    metrics: dict[str, object] = {
        "image_auroc": auroc(np.asarray(image_scores), np.asarray(labels)),
        "pixel_auroc": auroc_from_sorted(neg, pos),
        "pixel_aupro": pro_auc_from_regions(neg, regions, 0.3),
        "images": len(items),
        "images_good": int(len(labels) - sum(labels)),
        "images_defect": int(sum(labels)),
        "defect_regions": len(regions),
        "seconds_per_image": seconds / len(items),
        "bundle": str(bundle),
        "backbone": described["backbone"],
        "bank_rows": described["bank_rows"],
        "scale": described["scale"],
        "data": str(data),
    }
    vmin = float(np.quantile(neg, 0.5))
    vmax = float(np.quantile(neg, 0.999999)) if neg.size else 1.0
    vmax = max(vmax, float(pos.max()) if pos.size else vmax)
    for name, image, amap, gt in kept:
        cv2.imwrite(str(overlay_dir / f"{name}.png"), overlay(image, amap, gt, vmin, vmax))
    with open(out.parent / "scores.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "type", "label", "score"])
        w.writerows(rows)
    out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
