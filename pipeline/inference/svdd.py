"""Scoring with a learned patch-encoder bundle, runtime side (no torch): Patch SVDD (Yi & Yoon,
ACCV 2020, sec. 3.4) and the multi-scale method (Tsai, Wu & Lai, WACV 2022).

The bundle holds the dense encoder (``model.onnx``: uint8 NHWC pixels in, the codes of every
patch of each scale at that scale's stride out) and one bank of normal codes per scale. A
patch's score is the L2 distance of its code to the nearest normal code; each pixel gets the
mean score of the patches covering it; the scales' maps are multiplied (Patch SVDD: 64 and 32
px) or summed (multi-scale: 64, 32 and 16 px); the image score is the map's maximum (Patch
SVDD) or the maximum of its 8 x 8-window means (multi-scale). A bundle with ``input.scale`` other
than 1 scores each image resized by it (the scale its encoder was trained at) and resizes the map
back; the image score is taken at the encoder's scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import onnxruntime as ort

from pipeline.config import RuntimeConfig, ScoringConfig
from pipeline.inference.bundle import MODEL_FILE, BundleError, EncoderManifest, ManifestBase
from pipeline.inference.framescore import EncoderFrameScorer
from pipeline.inference.knn import FaissIndex, KnnError
from pipeline.inference.patchcore import ImageScore
from pipeline.inference.resize import resize_to, scaled_hw
from pipeline.inference.scoring import max_window_mean, patch_mean_map

SVDD_KIND: Literal["patch_svdd"] = "patch_svdd"
MSP_KIND: Literal["multiscale_patch"] = "multiscale_patch"


def open_bundle(
    bundle_dir: Path, manifest: ManifestBase, *, runtime: RuntimeConfig, scoring: ScoringConfig
) -> SvddScorer:
    """The registry's opener for ``patch_svdd`` and ``multiscale_patch`` bundles (``manifest``
    verified by ``read_manifest``); ``scoring`` is PatchCore's and unused here."""
    if not isinstance(manifest, EncoderManifest):
        raise BundleError(f"{bundle_dir}: a {manifest.kind!r} bundle is not a learned-encoder bundle")
    return SvddScorer.from_files(bundle_dir, manifest, runtime=runtime)


def dense_codes(session: ort.InferenceSession, outputs: list[str], image: np.ndarray) -> list[np.ndarray]:
    """One image (H, W, C) uint8 through the dense encoder: codes (h, w, dim) float32 per output."""
    out = session.run(outputs, {"pixels": np.ascontiguousarray(image[None])})
    return [np.ascontiguousarray(o[0], dtype=np.float32) for o in out]


class SvddScorer:
    """Scores images against a Patch SVDD or multi-scale bundle (a ``backends.Backend``).
    Opened by ``backends.open_backend``."""

    def __init__(self, *, manifest: EncoderManifest, session: ort.InferenceSession, indexes: list[FaissIndex]) -> None:
        self.manifest = manifest
        self.scale = manifest.input.scale
        self.kind = manifest.kind
        self.session = session
        self.indexes = indexes
        self.channels = manifest.input.channels
        self.min_side = max(s.patch for s in manifest.scales)

    @classmethod
    def from_files(cls, bundle_dir: Path, m: EncoderManifest, *, runtime: RuntimeConfig) -> SvddScorer:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = runtime.onnx_threads
        try:
            session = ort.InferenceSession(
                str(Path(bundle_dir) / MODEL_FILE), sess_options=opts, providers=["CPUExecutionProvider"]
            )
            outputs = {o.name for o in session.get_outputs()}
            missing = [s.output for s in m.scales if s.output not in outputs]
            if missing:
                raise BundleError(f"{bundle_dir}: model has no output {missing[0]!r}")
            indexes = [
                FaissIndex(
                    path=Path(bundle_dir) / s.index_file,
                    dim=m.dim,
                    rows=s.rows,
                    threads=runtime.faiss_threads,
                    knn=runtime.knn,
                )
                for s in m.scales
            ]
        except KnnError as err:
            raise BundleError(f"{bundle_dir}: {err}") from None
        except BundleError:
            raise
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise BundleError(f"{bundle_dir}: cannot load model.onnx: {str(err).splitlines()[0]}") from None
        return cls(manifest=m, session=session, indexes=indexes)

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "backbone": self.kind,
            "bank_rows": sum(s.rows for s in self.manifest.scales),
            "scale": self.scale,
            "channels": self.channels,
            "scales": [s.patch for s in self.manifest.scales],
        }

    def frame_scorer(self, *, tile: int | None, margin: int) -> EncoderFrameScorer:
        """Strip frames through the dense encoder whole (``tile`` must be None); ``margin`` is
        PatchCore's tiling margin and unused here."""
        return EncoderFrameScorer(scorer=self, tile=tile)

    def codes(self, image: np.ndarray) -> list[np.ndarray]:
        """Codes per scale of an image already at the bundle's scale, each (h, w, dim) float32."""
        return dense_codes(self.session, [s.output for s in self.manifest.scales], image)

    def check_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) uint8 -> (H, W, C); ValueError with the reason otherwise."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8, got {getattr(image, 'dtype', type(image).__name__)}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(f"image shape {image.shape} does not have the bundle's {self.channels} channel(s)")
        if min(scaled_hw(image.shape[0], image.shape[1], self.scale)) < self.min_side:
            raise ValueError(f"image {image.shape} at scale {self.scale} smaller than the {self.min_side} px patches")
        return image

    def search(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """Codes per scale -> patch scores per scale, each (h, w) float32: L2 to the nearest normal code."""
        out = []
        for index, c in zip(self.indexes, codes, strict=True):
            gh, gw, dim = c.shape
            flat = c.reshape(-1, dim)
            if not np.isfinite(flat).all():
                # A broken model or input; faiss would abort the process on NaN distances.
                raise ValueError("codes are not finite")
            dist, _ = index.search(flat, 1)
            out.append(dist[:, 0].reshape(gh, gw))
        return out

    def combine_maps(self, patch_scores: list[np.ndarray], out_hw: tuple[int, int]) -> tuple[np.ndarray, float]:
        """Patch scores per scale -> the pixel map (H, W) float32 and the image score."""
        maps = [
            patch_mean_map(p, patch=spec.patch, stride=spec.stride, out_hw=out_hw)
            for spec, p in zip(self.manifest.scales, patch_scores, strict=True)
        ]
        amap = (np.prod(maps, axis=0) if self.manifest.combine == "product" else np.sum(maps, axis=0)).astype(
            np.float32
        )
        if self.manifest.image_score == "window_mean":
            return amap, max_window_mean(amap, self.manifest.window)
        return amap, float(amap.max())

    def score(self, image: np.ndarray) -> ImageScore:
        image = self.check_image(image)
        height, width = image.shape[:2]
        pixels = resize_to(image, scaled_hw(height, width, self.scale))
        patch_scores = self.search(self.codes(pixels))
        amap, score = self.combine_maps(patch_scores, pixels.shape[:2])
        if amap.shape != (height, width):
            amap = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)
        return ImageScore(score=score, patch_scores=patch_scores[0], anomaly_map=amap)
