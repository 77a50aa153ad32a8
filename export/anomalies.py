"""Synthetic anomalies painted onto normal images, for choosing settings at fit time.

A fit sees normal images only. To compare settings it needs defects, so it paints three kinds
onto held-out normal images, each sized relative to the image and of random strength from faint
to plain:

- ``cutpaste``: a rectangle of the image itself, flipped and with its brightness and contrast
  changed, pasted elsewhere (CutPaste, Li et al. CVPR 2021): a local break of the texture;
- ``blob``: a soft-edged irregular stain from thresholded low-frequency noise (the Perlin masks
  of DRAEM, Zavrtanik et al. ICCV 2021), brighter or darker than the surface;
- ``line``: a thin crack or scratch, a bent polyline 1-3 px wide, darker or brighter than the
  surface by a few times its local spread.

Defects are placed on the textured surface (pixels whose local spread is a fair share of the
image's typical spread), not on a flat background such as the black around a bottle. The mask is
every pixel the painter changed by more than ``MASK_GREY_LEVELS``.
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("cutpaste", "blob", "line")
MASK_GREY_LEVELS = 2.0


def surface_mask(gray: np.ndarray) -> np.ndarray:
    """Bool (H, W): pixels whose local standard deviation (15 px window) is at least a quarter
    of the image's median local deviation; the whole image if that leaves under 10 %."""
    g = gray.astype(np.float32)
    mean = cv2.blur(g, (15, 15))
    var = np.maximum(cv2.blur(g * g, (15, 15)) - mean * mean, 0.0)
    std = np.sqrt(var)
    ok = std >= 0.25 * float(np.median(std))
    if float(np.median(std)) < 1e-3 or ok.mean() < 0.1:
        return np.ones_like(ok)
    return ok


def _centre(ok: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[int, int]:
    """A random surface pixel at least ``margin`` from the border (any pixel if none)."""
    h, w = ok.shape
    inner = np.zeros_like(ok)
    m0, m1 = min(margin, h // 2 - 1), min(margin, w // 2 - 1)
    inner[m0 : h - m0, m1 : w - m1] = ok[m0 : h - m0, m1 : w - m1]
    ys, xs = np.nonzero(inner)
    if ys.size == 0:
        return int(rng.integers(0, h)), int(rng.integers(0, w))
    i = int(rng.integers(0, ys.size))
    return int(ys[i]), int(xs[i])


def _local_std(gray: np.ndarray, y: int, x: int, r: int) -> float:
    h, w = gray.shape
    win = gray[max(0, y - r) : min(h, y + r + 1), max(0, x - r) : min(w, x + r + 1)]
    return float(win.std())


def _cutpaste(img: np.ndarray, ok: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    side = rng.uniform(0.05, 0.15) * s
    aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
    ph = int(np.clip(round(side * np.sqrt(aspect)), 3, h - 2))
    pw = int(np.clip(round(side / np.sqrt(aspect)), 3, w - 2))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = img[sy : sy + ph, sx : sx + pw].astype(np.float32)
    patch = patch[::-1] if rng.random() < 0.5 else patch[:, ::-1]
    gain = rng.uniform(0.6, 1.4)
    shift = rng.uniform(-30.0, 30.0)
    mean = patch.mean()
    patch = (patch - mean) * gain + mean + shift
    cy, cx = _centre(ok, rng, max(ph, pw) // 2 + 1)
    y0, x0 = int(np.clip(cy - ph // 2, 0, h - ph)), int(np.clip(cx - pw // 2, 0, w - pw))
    out = img.astype(np.float32)
    out[y0 : y0 + ph, x0 : x0 + pw] = patch
    return out


def _blob(img: np.ndarray, ok: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    side = int(np.clip(rng.uniform(0.06, 0.2) * s, 8, s - 2))
    # Low-frequency noise on a 4 x 4 to 6 x 6 grid, cubic upsampling, thresholded: an irregular
    # outline; blurred into a soft alpha.
    cells = int(rng.integers(4, 7))
    noise = cv2.resize(rng.random((cells, cells)).astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    r = np.hypot(yy - side / 2, xx - side / 2) / (side / 2)
    shape = ((noise * (1.2 - r)) > 0.35).astype(np.float32)
    alpha = cv2.GaussianBlur(shape, (0, 0), max(1.0, side / 12))
    cy, cx = _centre(ok, rng, side // 2 + 1)
    y0, x0 = int(np.clip(cy - side // 2, 0, h - side)), int(np.clip(cx - side // 2, 0, w - side))
    gray = img.mean(axis=2)
    spread = max(_local_std(gray, cy, cx, side), 4.0)
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 3.0) * spread
    out = img.astype(np.float32)
    out[y0 : y0 + side, x0 : x0 + side] += (alpha * delta)[:, :, None]
    return out


def _line(img: np.ndarray, ok: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    length = rng.uniform(0.1, 0.4) * s
    width = int(rng.integers(1, 4))
    y, x = (float(v) for v in _centre(ok, rng, 4))
    angle = rng.uniform(0.0, 2 * np.pi)
    pts = [(x, y)]
    steps = 8
    for _ in range(steps):
        angle += rng.normal(0.0, 0.35)
        x = float(np.clip(x + np.cos(angle) * length / steps, 0, w - 1))
        y = float(np.clip(y + np.sin(angle) * length / steps, 0, h - 1))
        pts.append((x, y))
    layer = np.zeros((h, w), np.float32)
    shift = 4  # sub-pixel vertices for an antialiased line
    poly = np.round(np.array(pts) * (1 << shift)).astype(np.int32)
    cv2.polylines(layer, [poly], False, 1.0, thickness=width, lineType=cv2.LINE_AA, shift=shift)
    gray = img.mean(axis=2)
    cy, cx = int(pts[0][1]), int(pts[0][0])
    spread = max(_local_std(gray, cy, cx, max(8, int(length / 2))), 4.0)
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(2.0, 4.0) * spread
    out = img.astype(np.float32)
    out += (layer * delta)[:, :, None]
    return out


_PAINTERS = {"cutpaste": _cutpaste, "blob": _blob, "line": _line}


def paint(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly of ``kind`` on a copy of ``image`` (H, W, C) uint8 -> (painted uint8, bool
    mask (H, W) of the changed pixels). ``image`` is not modified."""
    if kind not in _PAINTERS:
        raise ValueError(f"unknown anomaly kind {kind!r}; one of {', '.join(KINDS)}")
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, C) uint8, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image {image.shape[:2]} is too small to paint on (16 px side at least)")
    ok = surface_mask(image.mean(axis=2))
    painted = np.clip(np.round(_PAINTERS[kind](image, ok, rng)), 0, 255).astype(np.uint8)
    mask = np.abs(painted.astype(np.int16) - image.astype(np.int16)).max(axis=2) > MASK_GREY_LEVELS
    return painted, mask
