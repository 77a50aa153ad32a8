"""Score one frame of the strip: tiles batched into the ONNX session, stitched, kNN, map.

A backend (``pipeline.inference.backends``) hands out its frame scorer with
``frame_scorer(tile=..., margin=...)``: ``FrameScorer`` for PatchCore, ``EncoderFrameScorer``
for the learned patch encoders. This module knows the backends' scorers by their methods only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.inference.scoring import anomaly_map, band_rows, patch_mean_map
from pipeline.inference.tiling import cut_tiles, plan_tiles, stitch_features

if TYPE_CHECKING:
    from pipeline.inference.backends import Backend
    from pipeline.inference.patchcore import ImageScore, PatchCoreScorer
    from pipeline.inference.svdd import SvddScorer

ALIGN = 16  # coarsest stride of the registered backbones


class FrameScorer:
    """Frames (lines, width, C) uint8 with both sides multiples of 16 -> ``ImageScore``.

    ``tile`` None embeds the whole frame in one call; otherwise tiles of ``tile`` pixels whose
    seams are at least ``margin`` pixels from any pixel whose features are kept.
    """

    def __init__(self, *, scorer: PatchCoreScorer, tile: int | None, margin: int) -> None:
        if scorer.scale != 1.0:
            raise ValueError(
                f"the daemon scores at the bundle's full resolution; bundle scale is {scorer.scale} "
                "(refit with fit.scale: 1.0 in the config)"
            )
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
        # Raw scores, as the daemon's band path computes them: strip frames have no fixed rows.
        return self.scorer.score_features(feats, model_hw=pixels.shape[:2], out_hw=pixels.shape[:2], positional=False)

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


@dataclass(frozen=True)
class EncoderBand:
    """kNN result of one frame's band for a learned-encoder bundle: per scale, the patch scores
    (rows, w) float32 of the patch rows reaching the band and the first of those rows; ``rows``
    is the pixel band [start, stop) whose map is exact."""

    patch_scores: tuple[np.ndarray, ...]
    first_rows: tuple[int, ...]
    rows: tuple[int, int]


class EncoderFrameScorer:
    """Frames (lines, width, C) uint8 through a learned patch-encoder bundle (Patch SVDD or the
    multi-scale method) -> ``ImageScore``, with the same band interface as ``FrameScorer``.

    The whole frame goes through the dense encoder in one call (its receptive field, at most 64
    px, is far inside the frame overlap); the kNN searches, per scale, only the patch rows that
    cover the valid rows plus the largest patch on each side.
    """

    def __init__(self, *, scorer: SvddScorer, tile: int | None) -> None:
        if tile is not None:
            raise ValueError(
                "daemon.tile is for PatchCore bundles; encoder bundles embed whole frames (set tile: null)"
            )
        if scorer.scale != 1.0:
            raise ValueError(f"the daemon scores at the bundle's full resolution; bundle scale is {scorer.scale}")
        self.scorer = scorer
        self.margin = max(s.patch for s in scorer.manifest.scales)

    def features(self, pixels: np.ndarray) -> list[np.ndarray]:
        h, w = pixels.shape[:2]
        if h % ALIGN or w % ALIGN:
            raise ValueError(f"frame {h} x {w} must be a multiple of {ALIGN} on both sides")
        return self.scorer.codes(pixels)

    def score(self, pixels: np.ndarray) -> ImageScore:
        return self.scorer.score(self.scorer.check_image(pixels))

    def search_band(
        self, feats: list[np.ndarray], *, valid: tuple[int, int], lines: int
    ) -> tuple[EncoderBand, int, float]:
        v0, v1 = valid
        if not 0 <= v0 < v1 <= lines:
            raise ValueError(f"valid rows [{v0}, {v1}) not inside 0..{lines}")
        b0, b1 = max(0, v0 - self.margin), min(lines, v1 + self.margin)
        picked, firsts = [], []
        for spec, codes in zip(self.scorer.manifest.scales, feats, strict=True):
            # Patch row i covers pixel rows [i * stride, i * stride + patch).
            r0 = max(0, -(-(b0 - spec.patch + 1) // spec.stride))
            r1 = min(codes.shape[0], -(-b1 // spec.stride))
            picked.append(codes[r0:r1])
            firsts.append(r0)
        scores = self.scorer.search(picked)
        return EncoderBand(tuple(scores), tuple(firsts), (b0, b1)), b0, max(float(s.max()) for s in scores)

    def band_map(self, band: EncoderBand, first_row: int, *, out_hw: tuple[int, int]) -> np.ndarray:
        """Pixel map (lines, width) float32: the whole frame's map on the valid rows, 0 outside
        the band."""
        h, w = out_hw
        b0, b1 = band.rows
        maps = []
        for spec, scores, r0 in zip(self.scorer.manifest.scales, band.patch_scores, band.first_rows, strict=True):
            top = r0 * spec.stride
            m = patch_mean_map(scores, patch=spec.patch, stride=spec.stride, out_hw=(max(b1, h) - top, w))
            maps.append(m[b0 - top : b1 - top])
        combined = np.prod(maps, axis=0) if self.scorer.manifest.combine == "product" else np.sum(maps, axis=0)
        out = np.zeros((h, w), dtype=np.float32)
        out[b0:b1] = combined
        return out


class AnyFrameScorer(Protocol):
    """What the daemon needs of a frame scorer. ``features`` returns the model's output for the
    frame and ``search_band`` its band result; both are handed back to the same scorer only, so
    they are opaque here (a PatchCore feature map, or one code map per encoder scale). ``scorer``
    is the backend it came from: channels, manifest (thresholds), ``check_image``."""

    @property
    def scorer(self) -> Backend: ...

    def features(self, pixels: np.ndarray) -> Any: ...

    def score(self, pixels: np.ndarray) -> ImageScore: ...

    def search_band(self, feats: Any, *, valid: tuple[int, int], lines: int) -> tuple[Any, int, float]: ...

    def band_map(self, band: Any, first_row: int, *, out_hw: tuple[int, int]) -> np.ndarray: ...
