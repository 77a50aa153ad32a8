"""Thin, low-contrast defects (issue 15): synthetic ones planted in real normal images.

For each dataset (MVTec layout), the test/good images (real normal images the model never
trained on) are split in two halves by ``--seed``: one half stays normal, and every image of the
other half receives one planted defect of each kind, written as its own image:

- ``crack_1px``, ``crack_2px``, ``crack_3px``: a random-walk polyline 40-200 px long with gentle
  bends (heading drifts by N(0, 0.03) rad per px plus a constant curvature of N(0, 0.004) rad
  per px), 1, 2 or 3 px wide, antialiased (drawn at 8x and area-averaged), darker than the
  surface by 1.5-3 x the local grey-level std (15 x 15 window, median along the line), at least
  8 grey levels;
- ``stain_faint``: a soft-edged irregular blob 15-60 px across (a sum of 3-5 Gaussians,
  smoothstep between 25 % and 75 % of its peak), darker or brighter by 0.8-1.2 x the local std
  (median over the blob), at least 5 grey levels;
- ``stain_strong``: the same blobs at 2.5-3.5 x the local std, at least 15 grey levels: a
  reference that any working detector finds.

Defects go only on the surface: every pixel they touch has a local std of at least 2 grey levels
and a local mean between 20 and 235 (so MVTec bottle's uniform white border and saturated
highlights are avoided). The ground-truth mask is the pixels changed by more than 2 grey levels
in any channel, dilated by 1 px; pixels outside the mask are left exactly as they were (the
sub-2-level antialiasing fringe beyond the dilation is dropped).

Then the default bundle is fitted on train/good (or ``--bundle`` is reused), evaluated on the
planted set and on the real test split with ``calibration.evaluate`` (the code of
``stripinspect evaluate``), and a table per dataset is printed. A contact sheet of planted
examples is written to ``<work>/<dataset>/contact_sheet.png``.

    python benchmarks/thin_defects.py --work runs/thin --json runs/thin/thin.json

Data citations: BSData, Schlagenhauf et al., arXiv:2103.13003, CC BY-SA 4.0. MVTec AD,
Bergmann et al., CVPR 2019, CC BY-NC-SA 4.0 (research use).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from calibration.evaluate import evaluate
from export.fit import fit
from pipeline.acquisition.images import list_images, read_image
from pipeline.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = (REPO.parent / "shared" / "datasets" / "bsdata", REPO.parent / "shared" / "datasets" / "mvtec_bottle")

STD_WINDOW = 15  # px: the local std a defect's contrast is measured against
CHANGED_LEVELS = 2  # a pixel belongs to the mask when it changed by more than this
SUPERSAMPLE = 8  # cracks are drawn at 8x and area-averaged (antialiased)


# Our names for evaluate's metrics.json figures.
FIGURES = {"image_auroc": "image_auroc", "pixel_auroc": "pixel_auroc", "aupro": "pixel_aupro"}


class PlantError(ValueError):
    """No place on the image's surface fits the requested defect."""


@dataclass(frozen=True)
class Kind:
    """One kind of planted defect. ``width`` 0 means a stain; contrast is ``k x local std`` with
    k uniform in ``contrast_std``, at least ``min_levels`` grey levels."""

    name: str
    width: int
    contrast_std: tuple[float, float]
    min_levels: float


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("crack_1px", 1, (1.5, 3.0), 8.0),
        Kind("crack_2px", 2, (1.5, 3.0), 8.0),
        Kind("crack_3px", 3, (1.5, 3.0), 8.0),
        Kind("stain_faint", 0, (0.8, 1.2), 5.0),
        Kind("stain_strong", 0, (2.5, 3.5), 15.0),
    )
}


@dataclass(frozen=True)
class Planted:
    """One planted defect.

    image: uint8 (H, W, C), the input with the defect; mask: bool (H, W), pixels changed by more
    than ``CHANGED_LEVELS`` dilated by 1 px (nothing outside it changed); contrast: grey levels
    at full coverage (negative: darker); local_std: the std it was scaled from; size_px: the
    crack's polyline length or the stain's diameter; path: (N, 2) float x, y of the crack's
    polyline (empty for a stain).
    """

    image: np.ndarray
    mask: np.ndarray
    kind: str
    contrast: float
    local_std: float
    size_px: float
    path: np.ndarray


def local_mean_std(grey: np.ndarray, window: int = STD_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    g = grey.astype(np.float32)
    mean = cv2.blur(g, (window, window), borderType=cv2.BORDER_REFLECT)
    sq = cv2.blur(g * g, (window, window), borderType=cv2.BORDER_REFLECT)
    return mean, np.sqrt(np.maximum(sq - mean * mean, 0.0))


def surface_mask(
    image: np.ndarray, *, min_std: float = 2.0, min_level: float = 20.0, max_level: float = 235.0
) -> tuple[np.ndarray, np.ndarray]:
    """(bool (H, W) where a defect may go, float32 (H, W) local std). A uniform background (MVTec
    bottle's border, a black surround) has almost no local std; saturated pixels cannot show a
    brighter or darker mark in every channel."""
    grey = image.mean(axis=2) if image.ndim == 3 else image
    mean, std = local_mean_std(grey)
    return (std >= min_std) & (mean >= min_level) & (mean <= max_level), std


def _apply(image: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image + delta`` (grey-level change, the same in every channel), rounded and clipped; the
    mask of pixels changed by more than ``CHANGED_LEVELS`` dilated by 1 px; outside it, the input."""
    d = delta[..., None] if image.ndim == 3 else delta
    new = np.clip(np.rint(image.astype(np.float32) + d), 0, 255).astype(np.uint8)
    changed = np.abs(new.astype(np.int16) - image.astype(np.int16))
    changed = changed.max(axis=2) if changed.ndim == 3 else changed
    mask = cv2.dilate((changed > CHANGED_LEVELS).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    out = image.copy()
    out[mask] = new[mask]
    return out, mask


def crack_path(rng: np.random.Generator, allowed: np.ndarray, length: float, attempts: int = 200) -> np.ndarray:
    """(N, 2) float x, y: a random walk of ``length`` px in 1 px steps, every point on ``allowed``.
    Its heading drifts gently (a constant curvature plus a small random turn per px)."""
    ys, xs = np.nonzero(allowed)
    if len(ys) == 0:
        raise PlantError("no surface pixels")
    h, w = allowed.shape
    n = max(2, round(length) + 1)
    for _ in range(attempts):
        i = int(rng.integers(len(ys)))
        heading = rng.uniform(0.0, 2.0 * math.pi) + np.cumsum(rng.normal(rng.normal(0.0, 0.004), 0.03, size=n - 1))
        steps = np.stack([np.cos(heading), np.sin(heading)], axis=1)
        pts = np.array([xs[i], ys[i]], np.float64) + np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
        xi, yi = np.rint(pts[:, 0]).astype(int), np.rint(pts[:, 1]).astype(int)
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        if inside.all() and allowed[yi, xi].all():
            return pts
    raise PlantError(f"no {length:.0f} px path on the surface in {attempts} tries")


def crack_coverage(shape: tuple[int, int], path: np.ndarray, width: int) -> np.ndarray:
    """float32 (H, W) in [0, 1]: the fraction of each pixel covered by the polyline ``path`` drawn
    ``width`` px wide, at ``SUPERSAMPLE`` x and area-averaged."""
    s = SUPERSAMPLE
    pad = width + 3
    x0 = max(0, math.floor(path[:, 0].min()) - pad)
    y0 = max(0, math.floor(path[:, 1].min()) - pad)
    x1 = min(shape[1], math.ceil(path[:, 0].max()) + pad + 1)
    y1 = min(shape[0], math.ceil(path[:, 1].max()) + pad + 1)
    canvas = np.zeros(((y1 - y0) * s, (x1 - x0) * s), np.uint8)
    # Pixel centre i lies at i * s + (s - 1) / 2 on the fine grid; 4 fractional bits for cv2.
    fine = ((path - [x0, y0]) * s + (s - 1) / 2.0) * 16.0
    # cv2 draws a thick line t + 1 (t even) or t + 2 (t odd) pixels wide, never exactly 8 w:
    # thickness 8 w - 1 gives 8 w + 1 fine pixels (1/8 px wider), so that a 1 px crack covers the
    # pixels on its centre line fully (8 w - 1 fine pixels would cover them 7/8 at most).
    thickness = width * s - 1
    cv2.polylines(
        canvas, [np.rint(fine).astype(np.int32)], False, 255, thickness=thickness, lineType=cv2.LINE_8, shift=4
    )
    small = cv2.resize(canvas.astype(np.float32) / 255.0, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    out = np.zeros(shape, np.float32)
    out[y0:y1, x0:x1] = small
    return out


def plant_crack(image: np.ndarray, rng: np.random.Generator, kind: Kind, *, length: float | None = None) -> Planted:
    """A crack of ``kind.width`` px, darker than the surface; ``length`` px (default 40-200)."""
    allowed, std = surface_mask(image)
    # Every pixel the line touches must be surface: erode by the half width and a margin.
    allowed = cv2.erode(allowed.astype(np.uint8), np.ones((2 * kind.width + 5,) * 2, np.uint8)).astype(bool)
    want = float(length) if length is not None else float(rng.uniform(40.0, 200.0))
    path = None
    while path is None:
        try:
            path = crack_path(rng, allowed, want)
        except PlantError:
            if want <= 40.0:
                raise
            want = max(40.0, want * 0.8)  # a narrow surface: a shorter crack
    xi, yi = np.rint(path[:, 0]).astype(int), np.rint(path[:, 1]).astype(int)
    local = float(np.median(std[yi, xi]))
    contrast = -max(kind.min_levels, float(rng.uniform(*kind.contrast_std)) * local)
    cover = crack_coverage(image.shape[:2], path, kind.width)
    out, mask = _apply(image, contrast * cover)
    return Planted(out, mask, kind.name, contrast, local, want, path)


def stain_alpha(rng: np.random.Generator, diameter: float) -> np.ndarray:
    """float32 (S, S) in [0, 1], S about 2 x ``diameter``: an irregular blob with a soft edge."""
    size = math.ceil(2.0 * diameter) | 1
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - size // 2
    f = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(3, 6))):
        r, a = diameter / 4.0 * math.sqrt(rng.uniform()), rng.uniform(0.0, 2.0 * math.pi)
        cx, cy = r * math.cos(a), r * math.sin(a)
        sx, sy = rng.uniform(diameter / 8.0, diameter / 5.0, size=2)
        f += float(rng.uniform(0.5, 1.0)) * np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    t = np.clip((f / f.max() - 0.25) / 0.5, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep: a soft edge


def plant_stain(image: np.ndarray, rng: np.random.Generator, kind: Kind, attempts: int = 200) -> Planted:
    """A stain 15-60 px across, darker or brighter (even odds)."""
    allowed, std = surface_mask(image)
    h, w = allowed.shape
    diameter = float(rng.uniform(15.0, 60.0))
    alpha = stain_alpha(rng, diameter)
    size = alpha.shape[0]
    foot = alpha > 0.0
    for _ in range(attempts):
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        if allowed[y0 : y0 + size, x0 : x0 + size][foot].all():
            break
    else:
        raise PlantError(f"no place for a {diameter:.0f} px stain on the surface in {attempts} tries")
    local = float(np.median(std[y0 : y0 + size, x0 : x0 + size][alpha > 0.5]))
    sign = 1.0 if rng.uniform() < 0.5 else -1.0
    contrast = sign * max(kind.min_levels, float(rng.uniform(*kind.contrast_std)) * local)
    delta = np.zeros((h, w), np.float32)
    delta[y0 : y0 + size, x0 : x0 + size] = contrast * alpha
    out, mask = _apply(image, delta)
    return Planted(out, mask, kind.name, contrast, local, diameter, np.empty((0, 2)))


def plant(image: np.ndarray, rng: np.random.Generator, kind: str) -> Planted:
    k = KINDS[kind]
    return plant_crack(image, rng, k) if k.width > 0 else plant_stain(image, rng, k)


def _write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = image[..., ::-1] if image.ndim == 3 and image.shape[2] == 3 else image
    if not cv2.imwrite(str(path), np.ascontiguousarray(bgr)):
        raise OSError(f"{path}: cannot write")


def write_planted_set(
    data: Path, out: Path, *, seed: int, kinds: tuple[str, ...] = tuple(KINDS)
) -> tuple[list[Planted], list[np.ndarray]]:
    """``out`` in MVTec layout from ``data``/test/good: half the images as they are in test/good,
    the other half once per kind with one planted defect. Returns the planted defects and their
    original images (in the same order), for the contact sheet and the statistics."""
    goods = list_images(data / "test" / "good")
    if len(goods) < 2:
        raise PlantError(f"{data}/test/good: need at least 2 images, found {len(goods)}")
    order = np.random.default_rng(seed).permutation(len(goods))
    keep = sorted(int(i) for i in order[: len(goods) // 2])
    defect_half = sorted(int(i) for i in order[len(goods) // 2 :])
    for sub in ("test", "ground_truth"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)  # a rerun with another seed must not mix two sets
    (out / "test" / "good").mkdir(parents=True)
    for i in keep:
        shutil.copyfile(goods[i], out / "test" / "good" / goods[i].name)
    planted: list[Planted] = []
    originals: list[np.ndarray] = []
    for k_index, kind in enumerate(kinds):
        for i in defect_half:
            image = read_image(goods[i])
            p = plant(image, np.random.default_rng([seed, k_index, i]), kind)
            _write_rgb(out / "test" / kind / f"{goods[i].stem}.png", p.image)
            _write_rgb(out / "ground_truth" / kind / f"{goods[i].stem}_mask.png", p.mask.astype(np.uint8) * 255)
            planted.append(p)
            originals.append(image)
    return planted, originals


def contact_sheet(path: Path, planted: list[Planted], originals: list[np.ndarray], per_kind: int = 2) -> None:
    """Each row one planted example: the whole image with a box, then a 96 x 96 crop around the
    defect before, after, and its mask, drawn pixel for pixel (nearest neighbour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen: list[int] = []
    for kind in dict.fromkeys(p.kind for p in planted):
        chosen += [i for i, p in enumerate(planted) if p.kind == kind][:per_kind]
    fig, axes = plt.subplots(len(chosen), 4, figsize=(13, 3.2 * len(chosen)), squeeze=False)
    half = 48
    for row, i in zip(axes, chosen, strict=True):
        p, orig = planted[i], originals[i]
        ys, xs = np.nonzero(p.mask)
        cy, cx = int(np.median(ys)), int(np.median(xs))
        h, w = p.mask.shape
        y0, x0 = min(max(0, cy - half), h - 2 * half), min(max(0, cx - half), w - 2 * half)
        box = (slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))
        full = p.image.copy()
        cv2.rectangle(full, (x0, y0), (x0 + 2 * half, y0 + 2 * half), (255, 0, 0), 2)
        row[0].imshow(full)
        row[0].set_title(
            f"{p.kind}: {p.contrast:+.0f} levels ({p.contrast / p.local_std:+.1f} std), {p.size_px:.0f} px"
        )
        row[1].imshow(orig[box], interpolation="nearest")
        row[1].set_title("before (96 x 96 crop)")
        row[2].imshow(p.image[box], interpolation="nearest")
        row[2].set_title("after")
        row[3].imshow(p.mask[box], cmap="gray", interpolation="nearest")
        row[3].set_title(f"mask ({int(p.mask.sum())} px)")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        " (modified)" if git("status", "--porcelain", "--untracked-files=no") else ""
    )


def _figures(m: dict[str, object]) -> dict[str, float]:
    return {k: float(m[src]) for k, src in FIGURES.items()}  # type: ignore[arg-type]


def run_dataset(
    data: Path, work: Path, *, cfg: Config, config_path: Path | None, bundle: Path | None, seed: int
) -> dict[str, object]:
    planted_dir = work / "planted"
    planted, originals = write_planted_set(data, planted_dir, seed=seed)
    contact_sheet(work / "contact_sheet.png", planted, originals)
    print(f"{data.name}: planted {len(planted)} defects in {planted_dir}; contact sheet {work / 'contact_sheet.png'}")
    if bundle is None:
        bundle = work / "bundle"
        result = fit(backend="patchcore", data=data / "train" / "good", out=bundle, cfg=cfg, progress=False)
        print(result.summary, flush=True)
    syn = evaluate(bundle=bundle, data=planted_dir, out=work / "eval_planted" / "metrics.json", cfg=cfg, progress=False)
    real = evaluate(bundle=bundle, data=data, out=work / "eval_real" / "metrics.json", cfg=cfg, progress=False)
    per_type = syn["per_type"]
    assert isinstance(per_type, dict)
    kinds: dict[str, dict[str, float | int]] = {}
    for kind in KINDS:
        ps = [p for p in planted if p.kind == kind]
        t = per_type[kind]
        kinds[kind] = {
            "images": int(t["images"]),
            **_figures(t),
            "contrast_levels_median": float(np.median([abs(p.contrast) for p in ps])),
            "contrast_std_median": float(np.median([abs(p.contrast) / max(p.local_std, 1e-6) for p in ps])),
            "size_px_median": float(np.median([p.size_px for p in ps])),
            "mask_px_median": float(np.median([p.mask.sum() for p in ps])),
        }
    real_types = real["per_type"]
    assert isinstance(real_types, dict)
    cfg_text = config_path.read_bytes() if config_path is not None else b""
    return {
        "data": str(data),
        "normal_images": int(syn["images_good"]),  # type: ignore[call-overload]
        "kinds": kinds,
        "real": {
            **_figures(real),
            "images_defect": int(real["images_defect"]),  # type: ignore[call-overload]
            "images_good": int(real["images_good"]),  # type: ignore[call-overload]
            "per_type": {k: {"images": int(v["images"]), **_figures(v)} for k, v in real_types.items()},
        },
        "config": {
            "file": str(config_path) if config_path is not None else "built-in defaults",
            "sha256": hashlib.sha256(cfg_text).hexdigest()[:12] if config_path is not None else None,
            "commit": _commit(),
        },
        "bundle": str(bundle),
        "seed": seed,
    }


def print_table(name: str, r: dict[str, object]) -> None:
    kinds, real = r["kinds"], r["real"]
    assert isinstance(kinds, dict) and isinstance(real, dict)
    print(f"\n{name}: {r['normal_images']} normal test images against each kind; config {r['config']}")
    print(
        "| kind | images | image AUROC | pixel AUROC | AUPRO | contrast, grey levels (x local std), median "
        "| mask px, median |"
    )
    print(f"|{'---|' * 7}")
    for kind, k in kinds.items():
        print(
            f"| {kind} | {k['images']} | {k['image_auroc']:.3f} | {k['pixel_auroc']:.3f} | {k['aupro']:.3f} | "
            f"{k['contrast_levels_median']:.0f} ({k['contrast_std_median']:.1f}) | {k['mask_px_median']:.0f} |"
        )
    print(
        f"| real defects, all | {real['images_defect']} | {real['image_auroc']:.3f} | {real['pixel_auroc']:.3f} | "
        f"{real['aupro']:.3f} | | |"
    )
    if len(real["per_type"]) > 1:
        for t, v in real["per_type"].items():
            print(
                f"| real {t} | {int(v['images'])} | {v['image_auroc']:.3f} | {v['pixel_auroc']:.3f} | "
                f"{v['aupro']:.3f} | | |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, action="append", help="MVTec-layout dataset (repeatable; default both)")
    ap.add_argument("--work", type=Path, required=True, help="folder for planted sets, bundles, metrics")
    ap.add_argument("--bundle", type=Path, default=None, help="reuse this fitted bundle (one --data only)")
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml", help="config file (default: the repo's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    datas: list[Path] = args.data or list(DEFAULT_DATA)
    if args.bundle is not None and len(datas) != 1:
        ap.error("--bundle needs exactly one --data")
    cfg = load_config(args.config)
    results: dict[str, object] = {}
    for data in datas:
        if not (data / "train" / "good").is_dir() or not (data / "test" / "good").is_dir():
            print(f"skipping {data}: no train/good and test/good folders there")
            continue
        results[data.name] = run_dataset(
            data, args.work / data.name, cfg=cfg, config_path=args.config, bundle=args.bundle, seed=args.seed
        )
    print(f"\ncommit {_commit()}, {datetime.date.today().isoformat()}, seed {args.seed}")
    for name, r in results.items():
        assert isinstance(r, dict)
        print_table(name, r)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
