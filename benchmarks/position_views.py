"""Does the per-position default help only where the camera view is fixed? Side by side in one run.

The default (``scoring.position_normalise: map``) turns every patch score into a robust z-score
against that patch position's normal statistics. That assumes one fixed view. This benchmark
re-cuts an MVTec-layout dataset into views that are less and less fixed, fits one default
bundle per view and evaluates it with the z-scores (``map``) and with raw PatchCore scores
(``none``):

- ``as_captured``: the dataset as it is;
- ``jitter``: every image cropped to 5/6 of its height and width at a random offset (the part
  not always in one place);
- ``texture``: every image cropped to about half its height and 2/5 of its width at any offset
  (where a patch lies says almost nothing; a defect image's crop is placed to hold a random
  pixel of its mask, at least 16 px inside);
- ``few``: the dataset as it is, trained on every 8th training image (noisier statistics).

    python benchmarks/position_views.py --data ../shared/datasets/bsdata --work runs/views

Data citation (BSData): Schlagenhauf et al., "Industrial Machine Tool Element Surface Defect
Dataset", arXiv:2103.13003, CC BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np

from calibration.evaluate import evaluate, find_test_images
from export.fit import fit_bundle
from pipeline.acquisition.images import list_images, read_image, read_mask
from pipeline.config import Config, load_config

VARIANTS = ("as_captured", "jitter", "texture", "few")


def _crop_origin(
    rng: np.random.Generator, shape: tuple[int, ...], hw: tuple[int, int], mask: np.ndarray | None
) -> tuple[int, int]:
    h, w = hw
    if mask is None or not mask.any():
        return int(rng.integers(shape[0] - h + 1)), int(rng.integers(shape[1] - w + 1))
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(ys)))
    cy, cx = int(ys[i]), int(xs[i])
    margin = 16
    y = int(rng.integers(max(0, cy - h + margin + 1), min(shape[0] - h, cy - margin) + 1))
    x = int(rng.integers(max(0, cx - w + margin + 1), min(shape[1] - w, cx - margin) + 1))
    return y, x


def write_view(data: Path, out: Path, variant: str, seed: int = 0) -> Path:
    """``data`` re-cut as ``variant`` under ``out`` (MVTec layout); ``as_captured`` is ``data``."""
    if variant == "as_captured":
        return data
    if variant == "few":
        good = out / "train/good"
        good.mkdir(parents=True, exist_ok=True)
        for p in list_images(data / "train/good")[::8]:
            link = good / p.name
            if not link.exists():
                os.symlink(p.resolve(), link)
        for sub in ("test", "ground_truth"):
            if not (out / sub).exists():
                os.symlink((data / sub).resolve(), out / sub)
        return out
    first = read_image(list_images(data / "train/good")[0])
    frac = (5 / 6, 5 / 6) if variant == "jitter" else (1 / 2, 2 / 5)
    hw = (int(first.shape[0] * frac[0]) // 32 * 32, int(first.shape[1] * frac[1]) // 32 * 32)
    rng = np.random.default_rng(seed)

    def cut(src: Path, dst: Path, mask_src: Path | None, mask_dst: Path | None, guided: bool) -> None:
        img = read_image(src)
        mask = read_mask(mask_src, img.shape[:2]) if mask_src is not None else None
        y, x = _crop_origin(rng, img.shape, hw, mask if guided else None)
        if mask is not None and not mask[y : y + hw[0], x : x + hw[1]].any():
            y, x = _crop_origin(rng, img.shape, hw, mask)  # the random cut missed the defect
        dst.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dst), np.ascontiguousarray(img[y : y + hw[0], x : x + hw[1], ::-1]))
        if mask is not None and mask_dst is not None:
            mask_dst.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mask_dst), mask[y : y + hw[0], x : x + hw[1]].astype(np.uint8) * 255)

    for p in list_images(data / "train/good"):
        cut(p, out / "train/good" / f"{p.stem}.png", None, None, False)
    for item in find_test_images(data):
        kind = item.defect_type
        dst = out / "test" / kind / f"{item.path.stem}.png"
        mask_dst = out / "ground_truth" / kind / f"{item.path.stem}.png" if item.mask_path is not None else None
        cut(item.path, dst, item.mask_path, mask_dst, variant == "texture")
    return out


def _with_normalise(cfg: Config, mode: str) -> Config:
    return cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"position_normalise": mode})})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout dataset")
    ap.add_argument("--work", type=Path, required=True, help="folder for the re-cut data, bundles and metrics")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = load_config(args.config)
    rows = []
    for variant in args.variants:
        view = write_view(args.data, args.work / "data" / variant, variant)
        bundle = args.work / "bundles" / variant
        t0 = time.perf_counter()
        manifest = fit_bundle(data=view / "train/good", out=bundle, cfg=cfg, progress=False)
        fit_s = time.perf_counter() - t0
        for mode in ("map", "none"):
            m = evaluate(
                bundle=bundle,
                data=view,
                out=args.work / "metrics" / f"{variant}_{mode}.json",
                cfg=_with_normalise(cfg, mode),
                progress=False,
            )
            rows.append(
                {
                    "view": variant,
                    "scores": mode,
                    "train_images": manifest.fitted_on.images,
                    "image_hw": list(manifest.position_stats.image_hw) if manifest.position_stats else None,
                    "fit_s": round(fit_s, 1),
                    **{k: float(m[k]) for k in ("image_auroc", "pixel_auroc", "pixel_aupro")},  # type: ignore[arg-type]
                    "test_images": int(m["images"]),  # type: ignore[call-overload]
                }
            )
            r = rows[-1]
            print(
                f"{variant:<12} {mode:<5} train {r['train_images']:>4}  image {r['image_auroc']:.4f}  "
                f"pixel {r['pixel_auroc']:.4f}  AUPRO {r['pixel_aupro']:.4f}",
                flush=True,
            )
    print(
        f"\n| view | scores | train images | statistics for | fit | image AUROC | pixel AUROC | AUPRO |\n|{'---|' * 8}"
    )
    for r in rows:
        hw = "x".join(str(v) for v in r["image_hw"]) if r["image_hw"] else "no statistics"
        print(
            f"| {r['view']} | {r['scores']} | {r['train_images']} | {hw} | {r['fit_s']:.0f} s | "
            f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pixel_aupro']:.3f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
