"""The model slot: the frame scorer, threshold, recipe and flat-field the daemon scores with.

The only module of the service that opens bundles or reads their manifests. A new model,
threshold or recipe is loaded and warmed up beside the running one and swapped in between two
frames (``take``), so no frame is scored half by each; a failed load leaves the running one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.acquisition.flatfield import FlatField
from pipeline.config import DaemonConfig, RuntimeConfig, ScoringConfig
from pipeline.errors import StripinspectError
from pipeline.inference.backends import open_frame_scorer
from pipeline.inference.framescore import AnyFrameScorer
from pipeline.inference.overlay import Overlay, overlay_dir
from pipeline.postprocess.defects import per_column

# What loading and warming up a bundle raises for a bad bundle, file or model (onnxruntime's own
# untyped errors at session creation come wrapped in a StripinspectError): the reply says so and
# the running model stays. Anything else is a bug, answered by the control server as internal.
LOAD_ERRORS = (StripinspectError, ValueError, RuntimeError, OSError)


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, StripinspectError) else f"{type(err).__name__}: {text}"


@dataclass(frozen=True)
class Model:
    """What one frame is scored with, taken together between frames."""

    frame_scorer: AnyFrameScorer
    threshold: float | np.ndarray  # one value, or one per column (lines, width) -> (width,) float32
    cfg: DaemonConfig
    flatfield: FlatField | None

    # The stages call the model through these three only, so a new scorer interface (a backend
    # registry) changes this module and nothing else in the service.
    def embed(self, pixels: np.ndarray) -> Any:
        """(lines, width, C) uint8 -> the model's features, opaque to the caller; ValueError for
        a frame the model cannot take (shape, dtype, channels)."""
        fs = self.frame_scorer
        return fs.features(fs.scorer.check_image(pixels))

    def search(self, features: Any, *, valid: tuple[int, int], lines: int) -> tuple[Any, int]:
        """kNN of the patch rows the ``valid`` pixel rows depend on: (band result, first patch
        row); ValueError for features that cannot be searched (not finite)."""
        band, first_row, _ = self.frame_scorer.search_band(features, valid=valid, lines=lines)
        return band, first_row

    def score_map(self, band: Any, first_row: int, *, out_hw: tuple[int, int]) -> np.ndarray:
        """(lines, width) float32 pixel scores of a ``search`` result, 0 outside its band."""
        return self.frame_scorer.band_map(band, first_row, out_hw=out_hw)


class ModelSlot:
    """Load, warm up and hold the current ``Model``; ``reload``/``set_threshold``/
    ``switch_recipe`` stage a replacement that ``take`` applies at the next frame boundary."""

    def __init__(
        self, *, cfg: DaemonConfig, runtime: RuntimeConfig, scoring: ScoringConfig, width: int, channels: int
    ) -> None:
        if width % 16:
            raise StripinspectError(f"camera width {width} must be a multiple of 16")
        self._runtime, self._scoring = runtime, scoring
        # One Overlay per bundle folder, shared by every model opened from it: feedback given on
        # an alert of a model since replaced still reaches the model in force, and two objects
        # never write one folder.
        self._overlays: dict[Path, Overlay] = {}
        self._width, self._channels = width, channels
        cfg = cfg if cfg.recipe is None else cfg.with_recipe(cfg.recipe)
        fs = self._load(cfg.bundle, cfg)
        flatfield = self._flatfield(cfg)  # a missing calibration file is named before a missing threshold
        self._model = Model(frame_scorer=fs, threshold=self._threshold_for(fs, cfg), cfg=cfg, flatfield=flatfield)
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()

    # --- what the stages read ---------------------------------------------------------

    @property
    def current(self) -> Model:
        with self._lock:
            return self._model

    def take(self) -> Model:
        """The model for the next frame, with any staged replacement applied first."""
        with self._lock:
            if self._pending:
                fields = {
                    "frame_scorer": self._model.frame_scorer,
                    "threshold": self._model.threshold,
                    "cfg": self._model.cfg,
                    "flatfield": self._model.flatfield,
                }
                self._model = Model(**{**fields, **self._pending})
                self._pending = {}
            return self._model

    def threshold_json(self, model: Model | None = None) -> float | list[float]:
        """The threshold as messages carry it: one number, or one per CD band left to right."""
        m = model if model is not None else self.current
        if isinstance(m.threshold, np.ndarray):
            bands = m.frame_scorer.scorer.manifest.band_thresholds
            assert bands is not None  # per-column thresholds only ever come from bands
            return [float(m.threshold[e]) for e in bands.band_edges_px[:-1]]
        return float(m.threshold)

    def calibrated_normal_median(self) -> float | None:
        """The calibration's median normal score (mean over CD bands), None if not calibrated."""
        bands = self.current.frame_scorer.scorer.manifest.band_thresholds
        medians = bands.normal_quantiles.get("q0.5") if bands is not None else None
        return float(np.mean(medians)) if medians else None

    # --- replacements (a control request, on its worker thread) --------------------------

    def reload(self, bundle: Path | None = None) -> dict[str, Any]:
        """Load ``bundle`` (default: the current one again) and its threshold; the reply."""
        cfg = self.current.cfg
        path = Path(bundle) if bundle is not None else cfg.bundle
        try:
            fs = self._load(path, cfg)
            threshold = self._threshold_for(fs, cfg, bundle=path)
        except LOAD_ERRORS as err:
            return {"ok": False, "error": _one_line(err)}  # the running model stays
        self._stage(frame_scorer=fs, threshold=threshold)
        return {"ok": True, "bundle": str(path)}

    def set_threshold(self, value: object) -> dict[str, Any]:
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            return {"ok": False, "error": f"threshold must be a number > 0, got {value!r}"}
        self._stage(threshold=float(value))
        return {"ok": True, "threshold": float(value)}

    def switch_recipe(self, name: object) -> dict[str, Any]:
        cfg = self.current.cfg
        if not isinstance(name, str) or name not in cfg.recipes:
            return {"ok": False, "error": f"unknown recipe {name!r}; known: {sorted(cfg.recipes)}"}
        new_cfg = cfg.with_recipe(name)
        try:
            fs = self._load(new_cfg.bundle, new_cfg)
            threshold = self._threshold_for(fs, new_cfg)
            ff = self._flatfield(new_cfg)
        except LOAD_ERRORS as err:
            return {"ok": False, "error": _one_line(err)}  # the running recipe stays
        self._stage(frame_scorer=fs, threshold=threshold, cfg=new_cfg, flatfield=ff)
        return {"ok": True, "recipe": name}

    def _stage(self, **fields: Any) -> None:
        with self._lock:
            self._pending.update(fields)

    # --- loading ------------------------------------------------------------------------

    def _load(self, bundle: Path, cfg: DaemonConfig) -> AnyFrameScorer:
        """Open and warm up ``bundle``; StripinspectError of one line when the camera cannot feed it."""
        fs = open_frame_scorer(
            bundle, runtime=self._runtime, scoring=self._scoring, tile=cfg.tile, margin=cfg.tile_margin
        )
        if fs.scorer.channels != self._channels:
            # Checked here, not only at start: a reload or recipe with such a bundle would drop every frame.
            raise StripinspectError(
                f"camera delivers {self._channels} channel(s), bundle {bundle} was fitted on {fs.scorer.channels}"
            )
        # One frame of the real size before the first real one: onnxruntime sizes its arena
        # and picks kernels per input shape, which otherwise makes frame one twice as slow
        # and the p99 latency a start-up artefact.
        attach = getattr(fs.scorer, "attach_overlay", None)
        if attach is not None:  # PatchCore: what operators taught this bundle, kept beside it
            folder = overlay_dir(bundle).resolve()
            overlay = self._overlays.get(folder)
            if overlay is None:
                dim = fs.scorer.manifest.features.embedding_dim  # type: ignore[attr-defined]
                overlay = Overlay(folder=folder, dim=dim, max_rows=cfg.feedback.max_rows)
                self._overlays[folder] = overlay
            attach(overlay)
        lines, width = cfg.frame_lines, self._width
        feats = fs.features(np.zeros((lines, width, fs.scorer.channels), dtype=np.uint8))
        patch, first, _ = fs.search_band(feats, valid=(0, lines), lines=lines)
        fs.band_map(patch, first, out_hw=(lines, width))
        return fs

    def _threshold_for(
        self, fs: AnyFrameScorer, cfg: DaemonConfig, *, bundle: Path | None = None
    ) -> float | np.ndarray:
        """``cfg.threshold``, else the bundle's per-band thresholds (per column), else its pixel one."""
        if cfg.threshold is not None:
            return cfg.threshold
        name = bundle if bundle is not None else cfg.bundle
        manifest = fs.scorer.manifest
        bands = manifest.band_thresholds
        if bands is not None:
            if bands.band_edges_px[-1] != self._width:
                raise StripinspectError(
                    f"{name}: thresholds calibrated for {bands.band_edges_px[-1]} columns, camera has {self._width}"
                )
            return per_column(bands.band_edges_px, bands.thresholds)
        stored = manifest.pixel_threshold
        if stored is None or not stored > 0:
            raise StripinspectError(f"{name}: no pixel threshold: set daemon.threshold or calibrate the bundle")
        return float(stored)

    def _flatfield(self, cfg: DaemonConfig) -> FlatField | None:
        return None if cfg.flatfield is None else FlatField.from_file(cfg.flatfield, width=self._width)
