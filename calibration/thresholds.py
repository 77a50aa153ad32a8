"""Pixel thresholds from normal strip only (the first, simplest rule; per-band thresholds
with a false-alarm budget come with the calibration issue)."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calibration.bands import band_edges, calibrate_bands
from calibration.evaluate import TestImage
from calibration.metrics import best_f1_threshold
from calibration.plots import plot_band_curves
from pipeline.acquisition.flatfield import FlatField
from pipeline.acquisition.images import read_image, read_mask
from pipeline.acquisition.linescan import LineAssembler
from pipeline.acquisition.synthetic import SyntheticStrip
from pipeline.config import Config, ConfigError
from pipeline.inference.backends import Backend
from pipeline.inference.bundle import BandThresholds, read_manifest, write_manifest
from pipeline.inference.framescore import AnyFrameScorer
from pipeline.postprocess.regions import find_regions
from pipeline.transport.messages import LineBlock


def threshold_above_normal(scorer: AnyFrameScorer, frames: Iterable[np.ndarray], *, factor: float = 1.1) -> float:
    """``factor`` times the highest pixel score seen on normal frames (lines, width, C)."""
    if factor < 1.0:
        raise ValueError(f"factor must be >= 1, got {factor}")
    peaks = [float(scorer.score(f).anomaly_map.max()) for f in frames]
    if not peaks:
        raise ValueError("no normal frames given")
    return factor * max(peaks)


def normal_maps_from_strip(
    scorer: AnyFrameScorer,
    frames: Iterable[tuple[np.ndarray, int, int]],
    *,
    flatfield: FlatField | None = None,
    progress: bool = False,
    total: int | None = None,
) -> list[np.ndarray]:
    """Score maps of the valid rows of normal frames given as (pixels, valid_from, valid_to)."""
    maps = []
    for pixels, v0, v1 in tqdm(frames, desc="score normal frames", unit="frame", total=total, disable=not progress):
        if flatfield is not None:
            pixels = flatfield.apply(pixels)
        maps.append(scorer.score(pixels).anomaly_map[v0:v1])
    return maps


def synthetic_normal_frames(
    strip: SyntheticStrip, *, first_line: int, frames: int, frame_lines: int, overlap: int
) -> Iterator[tuple[np.ndarray, int, int]]:
    """Defect-free frames of the synthetic strip, assembled as the daemon assembles them."""
    asm = LineAssembler(
        width=strip.width, channels=1, lines=frame_lines, overlap=overlap, mm_per_line=1.0, camera_id="calibration"
    )
    step = frame_lines - overlap
    line = first_line
    emitted = 0
    while emitted < frames:
        px, _ = strip.render(line, step if line > first_line else frame_lines)
        for f in asm.push(LineBlock(pixels=px, first_line=line, capture_time=0.0)):
            # Every frame owns the rows away from the overlap (the first one too, here).
            yield f.pixels, overlap // 2, frame_lines - overlap // 2
            emitted += 1
            if emitted == frames:
                return
        line += px.shape[0]


def calibrate_thresholds(
    *,
    bundle: Path,
    maps: list[np.ndarray],
    metres: float,
    n_bands: int,
    target_per_km: float,
    min_area_mm2: float,
    mm_per_px: float,
    mm_per_line: float,
    calibrated_on: str,
    out_dir: Path,
) -> BandThresholds:
    """Per-band thresholds into the bundle's manifest, report JSON and PNG into ``out_dir``."""
    min_area_px = max(1, math.ceil(min_area_mm2 / (mm_per_px * mm_per_line)))
    width = maps[0].shape[1]
    cal = calibrate_bands(
        maps, edges=band_edges(width, n_bands), metres=metres, target_per_km=target_per_km, min_area_px=min_area_px
    )
    result = BandThresholds(
        band_edges_px=cal.edges,
        thresholds=cal.thresholds,
        min_area_mm2=min_area_mm2,
        target_alarms_per_km=target_per_km,
        calibration_alarms_per_km=cal.alarms_per_km,
        normal_quantiles=cal.quantiles,
        calibrated_on=calibrated_on,
        metres=metres,
        created_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    # Every bundle kind keeps its thresholds in the same manifest key.
    manifest = read_manifest(bundle)
    write_manifest(bundle, manifest.model_copy(update={"band_thresholds": result}))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "thresholds.json").write_text(
        json.dumps({**result.model_dump(mode="json"), "min_area_px": min_area_px, "curves": cal.curves}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    plot_band_curves(
        out_dir / "thresholds.png",
        edges=cal.edges,
        curves=cal.curves,
        thresholds=cal.thresholds,
        rates=cal.alarms_per_km,
        target_share=target_per_km / n_bands,
    )
    return result


def labelled_report(
    scorer: Backend, items: list[TestImage], *, columns: np.ndarray, min_area_px: int
) -> dict[str, float | int]:
    """Where labelled images exist: the per-image false-positive rate on normal ones and the
    detection rate (an alarm, a region by ``pipeline.postprocess.regions``, touching the ground
    truth) on defective ones at the calibrated per-column thresholds, and the image-level
    threshold on the max score that would maximise F1 (for reference; calibration never needs
    defect samples)."""
    maxima, labels, false_pos, detected, n_good, n_bad = [], [], 0, 0, 0, 0
    for it in tqdm(items, desc="labelled report", unit="img"):
        img = read_image(it.path, scorer.channels)
        amap = scorer.score(img).anomaly_map
        alarm = find_regions(amap, threshold=columns, min_area_px=min_area_px).labels > 0
        maxima.append(float(amap.max()))
        if it.mask_path is None:
            n_good += 1
            false_pos += bool(alarm.any())
            labels.append(0)
        else:
            n_bad += 1
            detected += bool((alarm & read_mask(it.mask_path, img.shape[:2])).any())
            labels.append(1)
    best_f1, best_t = best_f1_threshold(np.asarray(maxima), np.asarray(labels))
    return {
        "normal_images": n_good,
        "defect_images": n_bad,
        "false_positive_rate_per_image": false_pos / max(1, n_good),
        "detection_rate": detected / max(1, n_bad),
        "best_f1": best_f1,
        "best_f1_image_threshold": best_t,
    }


@dataclass(frozen=True)
class ThresholdCalibration:
    """What ``calibrate_thresholds_from_config`` measured and wrote."""

    result: BandThresholds  # written into the bundle's manifest; thresholds.json, .png in the out folder
    metres: float  # normal strip the thresholds were calibrated on
    labelled: dict[str, float | int] | None  # labelled_report, also in labelled.json; None: not asked for


def calibrate_thresholds_from_config(
    *,
    cfg: Config,
    bundle: Path,
    out_dir: Path,
    bands: int,
    alarms_per_km: float,
    min_area_mm2: float,
    data: Path | None = None,
    frames: int = 40,
    first_line: int = 3_000_000,
    labelled: Path | None = None,
    progress: bool = True,
) -> ThresholdCalibration:
    """``stripinspect calibrate thresholds``: score normal strip through the daemon's frame scorer
    and flat-field (the images in ``data``, or ``frames`` frames of the configured synthetic strip
    from ``first_line``), calibrate per-band thresholds for ``alarms_per_km`` into ``bundle``, and
    where a ``labelled`` MVTec-layout folder is given, report how they do on it."""
    from calibration.evaluate import find_test_images
    from pipeline.acquisition.images import list_images
    from pipeline.inference.backends import open_frame_scorer
    from pipeline.postprocess.defects import per_column

    d = cfg.daemon
    fs = open_frame_scorer(bundle, runtime=cfg.runtime, scoring=cfg.scoring, tile=d.tile, margin=d.tile_margin)
    normal: Iterable[tuple[np.ndarray, int, int]]
    if data is not None:
        files = list_images(data)
        if not files:
            raise ConfigError(f"{data}: no normal images")
        images = [read_image(f, fs.scorer.channels) for f in files]
        normal = ((im, 0, im.shape[0]) for im in images)
        width, total = images[0].shape[1], len(images)
        source = f"folder {data} ({len(files)} images)"
    else:
        strip = SyntheticStrip(width=cfg.synthetic.width, seed=cfg.synthetic.seed)
        normal = synthetic_normal_frames(
            strip, first_line=first_line, frames=frames, frame_lines=d.frame_lines, overlap=d.overlap_lines
        )
        width, total = cfg.synthetic.width, frames
        source = f"synthetic strip seed {cfg.synthetic.seed}, {frames} frames from line {first_line}"
    ff = None if d.flatfield is None else FlatField.from_file(d.flatfield, width=width)
    maps = normal_maps_from_strip(fs, normal, flatfield=ff, progress=progress, total=total)
    metres = sum(m.shape[0] for m in maps) * d.mm_per_line / 1000
    result = calibrate_thresholds(
        bundle=bundle,
        maps=maps,
        metres=metres,
        n_bands=bands,
        target_per_km=alarms_per_km,
        min_area_mm2=min_area_mm2,
        mm_per_px=d.mm_per_px,
        mm_per_line=d.mm_per_line,
        calibrated_on=source,
        out_dir=out_dir,
    )
    report = None
    if labelled is not None:
        min_area_px = max(1, math.ceil(min_area_mm2 / (d.mm_per_px * d.mm_per_line)))
        report = labelled_report(
            fs.scorer,
            find_test_images(labelled),
            columns=per_column(result.band_edges_px, result.thresholds),
            min_area_px=min_area_px,
        )
        (out_dir / "labelled.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return ThresholdCalibration(result=result, metres=metres, labelled=report)
