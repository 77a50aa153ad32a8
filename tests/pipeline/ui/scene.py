"""A realistic line for the browser tests and the documentation's screenshots: frames of the
synthetic strip (``pipeline/acquisition/synthetic.py``) with planted defects, a score map and
alerts with thumbnails, published through ``FakeDaemon``.

The score map is made from the planted defects' masks (blurred, on a low textured floor), not by
a model: the station draws whatever map the daemon sends, and running PatchCore here would only
slow the tests. Everything is seeded, so the pictures are the same each run."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.acquisition.synthetic import DefectKind, PlantedDefect, SyntheticStrip
from pipeline.postprocess.defects import defect_thumbnail
from tests.pipeline.ui.fakeline import FakeDaemon

MM_PER_PX = 0.5
MM_PER_LINE = 0.5
THRESHOLD = 2.0


@dataclass(frozen=True)
class Planted:
    kind: DefectKind
    line: int  # from the frame's first line
    col: int
    size: int
    klass: str


def frame_of(
    *, width: int, lines: int, first_line: int, planted: list[Planted], seed: int = 7
) -> tuple[np.ndarray, np.ndarray, list[tuple[Planted, tuple[int, int, int, int], float]]]:
    """(image uint8, score map float32, [(defect, box, max score)]) of one frame."""
    strip = SyntheticStrip(width=width, seed=seed)
    defects = [
        PlantedDefect(kind=p.kind, line=first_line + p.line, col=p.col, size=p.size, seed=i + 1)
        for i, p in enumerate(planted)
    ]
    image, _ = strip.render(first_line, lines, defects)
    rng = np.random.default_rng(seed)
    # A floor well under the threshold, and a few warm spots that stay under it (texture the
    # model finds a little unusual), as PatchCore's maps look after their Gaussian smoothing.
    noise = cv2.GaussianBlur(rng.uniform(0.0, 1.0, (lines, width)).astype(np.float32), (0, 0), 10)
    floor: np.ndarray = (0.25 + (noise - noise.min()) / max(float(np.ptp(noise)), 1e-6) * 0.35) * THRESHOLD
    dots = np.zeros((lines, width), np.float32)
    for _ in range(5):
        dots[int(rng.integers(0, lines)), int(rng.integers(0, width))] = 1.0
    spots = cv2.GaussianBlur(dots, (0, 0), 14)
    floor = np.maximum(floor, spots / max(float(spots.max()), 1e-6) * 0.85 * THRESHOLD)
    score: np.ndarray = floor.copy()
    found = []
    for i, (p, d) in enumerate(zip(planted, defects, strict=True)):
        _, one = strip.render(first_line, lines, [d])
        peak = THRESHOLD * (1.3 + 0.35 * (i % 4))
        blurred = cv2.GaussianBlur(one.astype(np.float32), (0, 0), 7.0)
        heat = blurred / max(float(blurred.max()), 1e-6) * peak
        score = np.maximum(score, heat + floor * 0.2)
        ys, xs = np.nonzero(one)
        box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        found.append((p, box, float(score[one].max())))
    return image, score, found


def publish_frame(
    daemon: FakeDaemon,
    *,
    width: int = 768,
    lines: int = 512,
    first_line: int = 0,
    planted: list[Planted],
    coil_md_m: float,
    preview_px: int = 768,
    coil_id: str = "24-118734",
    cd_offset_mm: float = 0.0,
) -> list[dict[str, Any]]:
    """Publish a frame's alerts, then the frame (as the daemon does); the alert headers."""
    image, score, found = frame_of(width=width, lines=lines, first_line=first_line, planted=planted)
    frame_id = daemon.frame_id + 1
    daemon.frame_id = frame_id
    headers = []
    for p, (x, y, w, h), max_score in found:
        area_px = max(1, int(w * h * 0.6))
        headers.append(
            daemon.alert(
                frame_id=frame_id,
                coil_id=coil_id,
                md_m=round(coil_md_m + (y + h / 2) * MM_PER_LINE / 1000.0, 4),
                strip_md_m=round(first_line * MM_PER_LINE / 1000.0 + (y + h / 2) * MM_PER_LINE / 1000.0, 4),
                cd_mm=round(cd_offset_mm + (x + w / 2) * MM_PER_PX, 1),
                length_mm=h * MM_PER_LINE,
                width_mm=w * MM_PER_PX,
                area_mm2=round(area_px * MM_PER_PX * MM_PER_LINE, 1),
                area_px=area_px,
                max_score=round(max_score, 3),
                mean_score=round(max_score * 0.7, 3),
                threshold=THRESHOLD,
                box=[x, y, w, h],
                thumbnail_png=base64.b64encode(defect_thumbnail(image, (x, y, w, h), side_px=64)).decode("ascii"),
                **{"class": p.klass, "class_confidence": 0.82 if p.klass != "unknown" else None},
            )
        )
    daemon.frame(
        image=image,
        score_map=score,
        threshold=THRESHOLD,
        preview_px=preview_px,
        frame_id=frame_id,
        coil_id=coil_id,
        md_m=coil_md_m,
        defects=len(found),
    )
    return headers


SCENE = [
    Planted("scratch", 120, 220, 70, "scratch"),
    Planted("pit", 300, 520, 12, "unknown"),
    Planted("scale", 410, 360, 40, "scale"),
]
