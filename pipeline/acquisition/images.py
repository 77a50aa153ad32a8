"""Reading image files into the arrays the scorer takes: uint8 (H, W, C), RGB or grey."""

from __future__ import annotations

from dataclasses import dataclass
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
    converts. 16-bit files are brought to 8 bits from their full 16-bit range (value / 257,
    rounded): the file's bit depth decides, never the pixel values, so a 12-bit camera that
    writes 16-bit files gives darker images, the same at fitting and at scoring.
    """
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise ImageReadError(f"{path}: no such file")
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: not a decodable image (corrupt or truncated)")
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f"{path}: {img.dtype} pixels; 8- and 16-bit images are supported")
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


@dataclass(frozen=True)
class TrainingFolder:
    """A folder of normal images checked before a fit: ``files`` in name order, each one's
    (height, width), and the channel count every image is read with (3 when any is in colour:
    grey ones are repeated to three channels, which loses nothing; 1 when all are grey)."""

    files: list[Path]
    sizes: list[tuple[int, int]]
    channels: int


MIN_TRAINING_IMAGES = 2


def survey_training_folder(folder: Path) -> TrainingFolder:
    """Read every image of ``folder`` once, or refuse the folder in one line: no images, fewer
    than ``MIN_TRAINING_IMAGES``, or unreadable files (all of them named, with the reason)."""
    files = list_images(folder)
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ImageReadError(f"{folder}: no images ({suffixes})")
    sizes: list[tuple[int, int]] = []
    colour, bad = False, []
    for f in files:
        try:
            img = read_image(f)
        except ImageReadError as err:
            bad.append(str(err).removeprefix(f"{f}: ").join((f"{f.name} (", ")")))
            continue
        sizes.append((img.shape[0], img.shape[1]))
        colour = colour or img.shape[2] == 3
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ImageReadError(f"{folder}: {len(bad)} of {len(files)} images cannot be read: {shown}")
    if len(files) < MIN_TRAINING_IMAGES:
        raise ImageReadError(
            f"{folder}: {len(files)} image; fitting needs at least {MIN_TRAINING_IMAGES} normal images"
        )
    return TrainingFolder(files=files, sizes=sizes, channels=3 if colour else 1)


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool (H, W); nonzero pixels are defect."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data is not None and data.size else None
    if mask is None:
        raise ImageReadError(f"{path}: cannot read mask")
    if mask.shape != shape:
        raise ImageReadError(f"{path}: mask shape {mask.shape} differs from image shape {shape}")
    return mask > 0
