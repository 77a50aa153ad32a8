"""Reading image files into the arrays the scorer takes: uint8 (H, W, C), RGB or grey."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import StripinspectError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class ImageReadError(StripinspectError):
    """An image file that cannot be used; the message names the file and the reason."""


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a directory")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path, channels: int | None = None) -> np.ndarray:
    """uint8 (H, W, C) with C = 1 (grey) or 3 (RGB order).

    ``channels`` None keeps the file's own (grey stays grey, colour becomes RGB); 1 or 3
    converts. 16-bit files are refused rather than silently rescaled.
    """
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise ImageReadError(f"{path}: no such file")
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: not a decodable image (corrupt or truncated)")
    if img.dtype != np.uint8:
        raise ImageReadError(f"{path}: {img.dtype} pixels; only 8-bit images are supported")
    if img.ndim == 2:
        img = img[:, :, None]
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[2] not in (1, 3):
        raise ImageReadError(f"{path}: {img.shape[2]} channels; expected 1 or 3")
    if channels is not None and img.shape[2] != channels:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None] if channels == 1 else np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img)


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool (H, W); nonzero pixels are defect."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data is not None and data.size else None
    if mask is None:
        raise ImageReadError(f"{path}: cannot read mask")
    if mask.shape != shape:
        raise ImageReadError(f"{path}: mask shape {mask.shape} differs from image shape {shape}")
    return mask > 0
