"""Score one frame of the strip: tiles batched into the ONNX session, stitched, kNN, map."""

from __future__ import annotations

import numpy as np

from pipeline.patchcore import ImageScore, PatchCoreScorer
from pipeline.scoring import anomaly_map, band_rows
from pipeline.tiling import cut_tiles, plan_tiles, stitch_features

ALIGN = 16  # coarsest stride of the registered backbones


class FrameScorer:
    """Frames (lines, width, C) uint8 with both sides multiples of 16 -> ``ImageScore``.

    ``tile`` None embeds the whole frame in one call; otherwise tiles of ``tile`` pixels whose
    seams are at least ``margin`` pixels from any pixel whose features are kept.
    """

    def __init__(self, *, scorer: PatchCoreScorer, tile: int | None, margin: int) -> None:
        if scorer.scale != 1.0:
            raise ValueError(f"the daemon scores at the bundle's full resolution; bundle scale is {scorer.scale}")
        if tile is not None and (tile % ALIGN or margin % ALIGN or tile <= 2 * margin):
            raise ValueError(f"tile {tile} and margin {margin} must be multiples of {ALIGN}, tile > 2 * margin")
        self.scorer = scorer
        self.tile = tile
        self.margin = margin
        self._plans: dict[tuple[int, int], list] = {}

    def features(self, pixels: np.ndarray) -> np.ndarray:
        h, w = pixels.shape[:2]
        if h % ALIGN or w % ALIGN:
            raise ValueError(f"frame {h} x {w} must be a multiple of {ALIGN} on both sides")
        if self.tile is None or (h <= self.tile and w <= self.tile):
            return self.scorer.embedder.embed(pixels[None])[0]
        plan = self._plans.get((h, w))
        if plan is None:
            plan = plan_tiles(height=h, width=w, tile=self.tile, margin=self.margin, stride=self.scorer.stride)
            self._plans[(h, w)] = plan
        feats = self.scorer.embedder.embed(cut_tiles(pixels, plan))
        return stitch_features(feats, plan, height=h, width=w, stride=self.scorer.stride)

    def score(self, pixels: np.ndarray) -> ImageScore:
        pixels = self.scorer.check_image(pixels)
        feats = self.features(pixels)
        return self.scorer.score_features(feats, model_hw=pixels.shape[:2], out_hw=pixels.shape[:2])

    def search_band(self, feats: np.ndarray, *, valid: tuple[int, int], lines: int) -> tuple[np.ndarray, int, float]:
        """kNN for the patch rows that the map's ``valid`` pixel rows depend on (``band_rows``):
        the frame's overlap is context for the CNN, not work for the search. Returns the band's
        patch scores (rows, w), its first patch row and its image score."""
        stride = self.scorer.stride
        r0, r1 = band_rows(*valid, stride=stride, sigma=self.scorer.scoring.sigma, lines=lines)
        patch, score = self.scorer.search_patches(feats[r0:r1])
        return patch, r0, score

    def band_map(self, patch: np.ndarray, first_row: int, *, out_hw: tuple[int, int]) -> np.ndarray:
        """Pixel map (lines, width) float32 of a band from ``search_band``: equal to the whole
        frame's map on the valid rows, 0 outside the band (never above a threshold)."""
        stride = self.scorer.stride
        h, w = out_hw
        top = first_row * stride
        band = anomaly_map(
            patch,
            stride=stride,
            out_hw=(min(h, top + patch.shape[0] * stride) - top, w),
            sigma=self.scorer.scoring.sigma,
        )
        out = np.zeros((h, w), dtype=np.float32)
        out[top : top + band.shape[0]] = band
        return out
