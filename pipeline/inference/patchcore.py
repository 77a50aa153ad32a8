"""PatchCore inference: the bundle's ONNX embedder and faiss bank wired to the pure scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import faiss
import numpy as np

from pipeline.config import RuntimeConfig, ScoringConfig
from pipeline.inference.bundle import (
    INDEX_FILE,
    MODEL_FILE,
    BundleError,
    ChosenSettings,
    ManifestBase,
    PatchCoreManifest,
)
from pipeline.inference.embed import MIN_SIDE, EmbedderError, OnnxEmbedder
from pipeline.inference.framescore import FrameScorer
from pipeline.inference.knn import FaissIndex, KnnError, ivf_lists
from pipeline.inference.overlay import Overlay
from pipeline.inference.resize import resize_to, scaled_hw
from pipeline.inference.scoring import anomaly_map, max_window_mean, reweighted_image_score

# Patch window of the image score under per-position normalisation (see score_features).
POSITION_WINDOW = 2
# Operator-added rows: searched exactly up to this many, through IVF (EXTRA_NPROBE cells) beyond.
EXTRA_FLAT_ROWS = 4096
EXTRA_NPROBE = 8


@dataclass(frozen=True)
class ImageScore:
    """Result for one image.

    ``patch_scores``: float32 (h, w), distance of each patch to its nearest bank entry.
    ``anomaly_map``: float32 (H, W) at the input image's size, smoothed.
    ``score``: PatchCore's re-weighted image score (eq. 7), or the largest per-position z-score
    where the bundle's normal statistics apply (``PatchCoreScorer``).
    """

    score: float
    patch_scores: np.ndarray
    anomaly_map: np.ndarray


MIN_IMAGE_SIDE = 8


def model_hw(height: int, width: int, scale: float) -> tuple[int, int]:
    """The size an image of ``height`` x ``width`` is embedded at: the bundle's resize factor,
    and no side under the graph's minimum (a small image is enlarged, its map resized back)."""
    return scaled_hw(height, width, scale, MIN_SIDE)


def resize_for_model(image: np.ndarray, scale: float) -> np.ndarray:
    """Apply the bundle's resize factor (and the minimum side); (H, W, C) uint8 in and out."""
    return resize_to(image, model_hw(image.shape[0], image.shape[1], scale))


def open_bundle(
    bundle_dir: Path, manifest: ManifestBase, *, runtime: RuntimeConfig, scoring: ScoringConfig
) -> PatchCoreScorer:
    """The registry's opener for ``patchcore`` bundles (``manifest`` verified by ``read_manifest``)."""
    if not isinstance(manifest, PatchCoreManifest):
        raise BundleError(f"{bundle_dir}: a {manifest.kind!r} bundle is not a PatchCore bundle")
    return PatchCoreScorer.from_files(bundle_dir, manifest, runtime=runtime, scoring=scoring)


class PatchCoreScorer:
    """Scores images against a PatchCore bundle (a ``backends.Backend``). Opened by
    ``backends.open_backend``, which verifies every file first."""

    def __init__(
        self,
        *,
        manifest: PatchCoreManifest,
        embedder: OnnxEmbedder,
        index: FaissIndex,
        scoring: ScoringConfig,
        position_stats: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.manifest = manifest
        self.kind = manifest.kind
        self.settings = resolve_settings(scoring, manifest)
        # A bundle fitted before the fit-time choice scored images without statistics (other
        # sizes, line-scan frames) by eq. 7 whatever the rule with them; it still does.
        self._eq7_without_stats = scoring.image_score == "auto" and manifest.selection is None
        # (median, MAD) per patch position, (h, w) float32 each, for images of the fitted size.
        self.position_stats = None
        if position_stats is not None and self.settings.position_normalise != "none":
            self.position_stats = floor_mad(*position_stats, self.settings.mad_floor)
        self.embedder = embedder
        self.index = index
        self.scoring = scoring
        self.stride = manifest.features.stride
        self.channels = manifest.input.channels
        self.scale = manifest.input.scale
        self.num_neighbors = min(scoring.num_neighbors, index.rows)
        # Normal rows operators added (the overlay's false alarms), searched beside the bank; a
        # new one is swapped in whole between two searches (an attribute write is atomic).
        self.extra: faiss.Index | None = None
        self.overlay: Overlay | None = None

    def attach_overlay(self, overlay: Overlay) -> None:
        """Score with ``overlay``'s normal rows from now on (what operators taught this bundle);
        the daemon's feedback changes it. One Overlay per folder is shared by every model opened
        from that bundle (a reload, a recipe switch back), so a change reaches the one in force."""
        if overlay.dim != self.index.dim:
            raise BundleError(f"{overlay.folder}: overlay rows of dim {overlay.dim}, the bank's are {self.index.dim}")
        self.set_extra(overlay.normal_rows())
        self.overlay = overlay

    def set_extra(self, rows: np.ndarray) -> None:
        """Search ``rows`` (float32 (n, D)) as part of the memory bank from the next search on;
        n = 0 takes the additions away. Up to EXTRA_FLAT_ROWS rows are searched exactly, more
        through an IVF index: every frame searches them for every patch (20,000 rows flat cost
        1.35 s per 2048 x 1024 frame on one core). An approximate neighbour is a real row, so it
        can only over-estimate a distance: the feedback is applied a little less, never more."""
        if rows.ndim != 2 or rows.shape[1] != self.index.dim:
            raise ValueError(f"extra rows must be (n, {self.index.dim}), got {rows.shape}")
        if rows.shape[0] == 0:
            self.extra = None
            return
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        index: faiss.Index
        if rows.shape[0] <= EXTRA_FLAT_ROWS:
            index = faiss.IndexFlatL2(self.index.dim)
        else:
            nlist = ivf_lists(rows.shape[0], None)
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.index.dim), self.index.dim, nlist)
            ivf.cp.seed = 0
            ivf.train(rows)
            ivf.nprobe = min(EXTRA_NPROBE, nlist)
            index = ivf
        index.add(rows)
        self.extra = index

    @classmethod
    def from_files(
        cls, bundle_dir: Path, manifest: PatchCoreManifest, *, runtime: RuntimeConfig, scoring: ScoringConfig
    ) -> PatchCoreScorer:
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
        stats = None
        if manifest.position_stats is not None:
            stats = read_position_stats(Path(bundle_dir) / manifest.position_stats.file, manifest.position_stats.grid)
        return cls(manifest=manifest, embedder=embedder, index=index, scoring=scoring, position_stats=stats)

    def describe(self) -> dict[str, object]:
        f = self.manifest.features
        return {
            "kind": self.kind,
            "backbone": f.backbone,
            "bank_rows": self.manifest.index.rows,
            "scale": self.scale,
            "channels": self.channels,
            "layers": list(f.layers),
            "embedding_dim": f.embedding_dim,
        }

    def frame_scorer(self, *, tile: int | None, margin: int) -> FrameScorer:
        """Strip frames at full resolution, embedded whole (``tile`` None) or in tiles."""
        return FrameScorer(scorer=self, tile=tile, margin=margin)

    def check_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) uint8 -> (H, W, C); ValueError with the reason otherwise."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8, got {getattr(image, 'dtype', type(image).__name__)}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(f"image shape {image.shape} does not have the bundle's {self.channels} channel(s)")
        if image.shape[0] < MIN_IMAGE_SIDE or image.shape[1] < MIN_IMAGE_SIDE:
            # Smaller than the graph's MIN_SIDE is enlarged (resize_for_model); this is the floor
            # under which an image holds no surface to judge.
            raise ValueError(f"image shape {image.shape} is smaller than {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}")
        return image

    def score(self, image: np.ndarray) -> ImageScore:
        image = self.check_image(image)
        height, width = image.shape[:2]
        pixels = resize_for_model(image, self.scale)
        feats = self.embedder.embed(pixels[None])[0]
        return self.score_features(feats, model_hw=pixels.shape[:2], out_hw=(height, width))

    def search_patches(
        self, feats: np.ndarray, *, rank: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> tuple[np.ndarray, float]:
        """Patch features (h, w, D) -> patch scores float32 (h, w) and the image score (eq. 7).
        ``rank``: which scores the approximate search must make exact (``FaissIndex.search``)."""
        return nearest_patch_scores(self.index, feats, self.num_neighbors, rank=rank, extra=self.extra)

    def score_features(
        self, feats: np.ndarray, *, model_hw: tuple[int, int], out_hw: tuple[int, int], positional: bool = True
    ) -> ImageScore:
        """Patch features (h, w, D) of an image of ``model_hw`` pixels -> scores at ``out_hw``.
        ``positional`` False ignores the per-position statistics (the line-scan daemon's frames
        have no fixed rows)."""
        height, width = out_hw
        stats = self.position_stats if positional else None
        if stats is None or stats[0].shape != feats.shape[:2]:
            patch, reweighted = self.search_patches(feats)
            z = None
        else:
            # Robust z-score of each patch against normal images at the same position: a fixed
            # camera view has positions that are rougher than others (edges, glare), and the
            # image score should not be decided by the roughest normal position. The top
            # z-scores decide here, so they are the ones the approximate search makes exact.
            median, mad = stats
            m, d = median.reshape(-1), mad.reshape(-1)
            patch, reweighted = self.search_patches(feats, rank=lambda dist: (dist - m) / d)
            z = (patch - median) / mad
        rule = "reweighted" if z is None and self._eq7_without_stats else self.settings.image_score
        score = image_score(rule, patch=patch, reweighted=reweighted, z=z)
        map_scores = z if z is not None and self.settings.position_normalise == "map" else patch
        amap_scaled = anomaly_map(
            map_scores, stride=self.stride, out_hw=model_hw, sigma=self.scoring.sigma * self.scale
        )
        amap = (
            amap_scaled
            if model_hw == (height, width)
            else cv2.resize(amap_scaled, (width, height), interpolation=cv2.INTER_LINEAR)
        )
        return ImageScore(score=score, patch_scores=patch, anomaly_map=amap)


def resolve_settings(scoring: ScoringConfig, manifest: PatchCoreManifest) -> ChosenSettings:
    """The scoring settings in force: each config value, or where it is 'auto' the bundle's
    fit-time choice (or, for a bundle fitted without one, the defaults before the choice existed)."""
    chosen = manifest.selection.chosen if manifest.selection is not None else None
    norm = scoring.position_normalise
    if norm == "auto":
        norm = chosen.position_normalise if chosen else "map"
    floor = scoring.mad_floor
    if floor == "auto":
        floor = chosen.mad_floor if chosen else 0.5
    rule = scoring.image_score
    if rule == "auto":
        uses_stats = manifest.position_stats is not None and norm != "none"
        rule = chosen.image_score if chosen else ("window" if uses_stats else "reweighted")
    return ChosenSettings(scale=manifest.input.scale, position_normalise=norm, mad_floor=floor, image_score=rule)


def median_mad(grids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD per position of held-out patch-score grids (n, h, w). A position whose
    scores never vary would divide by zero: its MAD is floored at a thousandth of the typical one."""
    median = np.median(grids, axis=0)
    mad = np.median(np.abs(grids - median), axis=0)
    return median, np.maximum(mad, 1e-3 * max(float(np.median(mad)), 1e-12))


def floor_mad(median: np.ndarray, mad: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """A robust scale needs a floor: a position that is constant on normal images (MAD near 0)
    would otherwise turn any small change into the image's top z-score."""
    return median, np.maximum(mad, np.float32(floor * float(np.median(mad))))


def nearest_patch_scores(
    index: FaissIndex,
    feats: np.ndarray,
    num_neighbors: int,
    *,
    rank: Callable[[np.ndarray], np.ndarray] | None = None,
    extra: faiss.Index | None = None,
) -> tuple[np.ndarray, float]:
    """Patch features (h, w, D) -> each patch's distance to its nearest bank row, float32 (h, w),
    and PatchCore's re-weighted image score (eq. 7). ``rank``: which scores the approximate
    search must make exact (``FaissIndex.search``). ``extra``: rows added to the bank at run time
    (the overlay), searched exactly; a patch's distance is to the nearer of the two."""
    gh, gw, dim = feats.shape
    flat = feats.reshape(-1, dim)
    if not np.isfinite(flat).all():
        # A broken model or input; faiss would abort the process on NaN distances.
        raise ValueError("patch features are not finite")
    dist, ids = index.search(flat, 1, rank=rank)
    if extra is not None:
        d2, _ = extra.search(np.ascontiguousarray(flat, dtype=np.float32), 1)
        np.minimum(dist[:, 0], np.sqrt(np.maximum(d2[:, 0], 0.0)), out=dist[:, 0])
    patch = dist[:, 0].reshape(gh, gw)
    worst = int(np.argmax(dist[:, 0]))
    s_star = float(dist[worst, 0])
    m_star = index.vectors[ids[worst, 0]]
    # N_b(m*): the b bank entries nearest to m* (PatchCore eq. 7), m* itself included.
    _, nb = index.search_exact(m_star[None], min(num_neighbors, index.rows))
    neighbour_d = np.linalg.norm(index.vectors[nb[0]] - flat[worst], axis=1)
    return patch, reweighted_image_score(s_star, neighbour_d)


def image_score(rule: str, *, patch: np.ndarray, reweighted: float, z: np.ndarray | None) -> float:
    """The image's score under ``rule``: 'reweighted' is PatchCore's eq. 7; 'window' the largest
    mean over 2 x 2 patches of the z-scores (or of the distances where no statistics apply): the
    3 x 3 local aggregation spreads any real anomaly over neighbouring patches, while a lone high
    patch is mostly noise."""
    if rule == "reweighted":
        return reweighted
    return max_window_mean(z if z is not None else patch, POSITION_WINDOW)


def read_position_stats(path: Path, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(median, MAD) float32 (h, w) from the bundle's npz (data only, no pickle); BundleError
    naming what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as z:
            median, mad = np.asarray(z["median"], np.float32), np.asarray(z["mad"], np.float32)
    except (OSError, KeyError, ValueError) as err:
        raise BundleError(f"{path}: unreadable position statistics: {err}") from None
    if median.shape != tuple(grid) or mad.shape != tuple(grid):
        raise BundleError(f"{path}: statistics of shape {median.shape}, manifest says {tuple(grid)}")
    if not (np.isfinite(median).all() and np.isfinite(mad).all() and (mad > 0).all()):
        raise BundleError(f"{path}: statistics are not finite or MAD is not positive")
    return median, mad
