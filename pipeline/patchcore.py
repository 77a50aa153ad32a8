"""PatchCore inference: the bundle's ONNX embedder and faiss bank wired to the pure scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.bundle import INDEX_FILE, MODEL_FILE, BundleError, Manifest, read_manifest
from pipeline.config import RuntimeConfig, ScoringConfig
from pipeline.embed import MIN_SIDE, EmbedderError, OnnxEmbedder
from pipeline.knn import FaissIndex, KnnError
from pipeline.scoring import anomaly_map, reweighted_image_score


@dataclass(frozen=True)
class ImageScore:
    """Result for one image.

    ``patch_scores``: float32 (h, w), distance of each patch to its nearest bank entry.
    ``anomaly_map``: float32 (H, W) at the input image's size, smoothed.
    ``score``: PatchCore's re-weighted image score (eq. 7).
    """

    score: float
    patch_scores: np.ndarray
    anomaly_map: np.ndarray


def resize_for_model(image: np.ndarray, scale: float) -> np.ndarray:
    """Apply the bundle's resize factor; (H, W, C) uint8 in and out."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale)))
    out = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return out.reshape(size[1], size[0], image.shape[2])


class PatchCoreScorer:
    """Scores images against a bundle. Construct with ``open``; checks every file on entry."""

    def __init__(
        self, *, manifest: Manifest, embedder: OnnxEmbedder, index: FaissIndex, scoring: ScoringConfig
    ) -> None:
        self.manifest = manifest
        self.embedder = embedder
        self.index = index
        self.scoring = scoring
        self.stride = manifest.features.stride
        self.channels = manifest.input.channels
        self.scale = manifest.input.scale
        self.num_neighbors = min(scoring.num_neighbors, index.rows)

    @classmethod
    def open(cls, bundle_dir: Path, *, runtime: RuntimeConfig, scoring: ScoringConfig) -> PatchCoreScorer:
        manifest = read_manifest(bundle_dir)
        try:
            embedder = OnnxEmbedder.for_runtime(
                model_path=Path(bundle_dir) / MODEL_FILE,
                embedding_dim=manifest.features.embedding_dim,
                input_channels=manifest.input.channels,
                runtime=runtime,
            )
            index = FaissIndex(
                path=Path(bundle_dir) / INDEX_FILE,
                dim=manifest.features.embedding_dim,
                rows=manifest.index.rows,
                threads=runtime.faiss_threads,
                knn=runtime.knn,
            )
        except (EmbedderError, KnnError) as err:
            raise BundleError(f"{bundle_dir}: {err}") from None
        return cls(manifest=manifest, embedder=embedder, index=index, scoring=scoring)

    def check_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) uint8 -> (H, W, C); ValueError with the reason otherwise."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8, got {getattr(image, 'dtype', type(image).__name__)}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(f"image shape {image.shape} does not have the bundle's {self.channels} channel(s)")
        if image.shape[0] < MIN_SIDE or image.shape[1] < MIN_SIDE:
            raise ValueError(f"image shape {image.shape} is smaller than {MIN_SIDE} x {MIN_SIDE}")
        return image

    def score(self, image: np.ndarray) -> ImageScore:
        image = self.check_image(image)
        height, width = image.shape[:2]
        pixels = resize_for_model(image, self.scale)
        feats = self.embedder.embed(pixels[None])[0]
        return self.score_features(feats, model_hw=pixels.shape[:2], out_hw=(height, width))

    def search_patches(self, feats: np.ndarray) -> tuple[np.ndarray, float]:
        """Patch features (h, w, D) -> patch scores float32 (h, w) and the image score (eq. 7)."""
        gh, gw, dim = feats.shape
        flat = feats.reshape(-1, dim)
        if not np.isfinite(flat).all():
            # A broken model or input; faiss would abort the process on NaN distances.
            raise ValueError("patch features are not finite")
        dist, ids = self.index.search(flat, 1)
        patch = dist[:, 0].reshape(gh, gw)
        worst = int(np.argmax(dist[:, 0]))
        s_star = float(dist[worst, 0])
        m_star = self.index.vectors[ids[worst, 0]]
        # N_b(m*): the b bank entries nearest to m* (PatchCore eq. 7), m* itself included.
        _, nb = self.index.search_exact(m_star[None], self.num_neighbors)
        neighbour_d = np.linalg.norm(self.index.vectors[nb[0]] - flat[worst], axis=1)
        return patch, reweighted_image_score(s_star, neighbour_d)

    def score_features(self, feats: np.ndarray, *, model_hw: tuple[int, int], out_hw: tuple[int, int]) -> ImageScore:
        """Patch features (h, w, D) of an image of ``model_hw`` pixels -> scores at ``out_hw``."""
        height, width = out_hw
        patch, score = self.search_patches(feats)
        amap_scaled = anomaly_map(patch, stride=self.stride, out_hw=model_hw, sigma=self.scoring.sigma * self.scale)
        amap = (
            amap_scaled
            if model_hw == (height, width)
            else cv2.resize(amap_scaled, (width, height), interpolation=cv2.INTER_LINEAR)
        )
        return ImageScore(score=score, patch_scores=patch, anomaly_map=amap)
