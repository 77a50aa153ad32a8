"""Scoring with a learned patch-encoder bundle, runtime side (no torch): Patch SVDD (Yi & Yoon,
ACCV 2020, sec. 3.4) and the multi-scale method (Tsai, Wu & Lai, WACV 2022).

The bundle holds the dense encoder (``model.onnx``: uint8 NHWC pixels in, the codes of every
patch of each scale at that scale's stride out) and one bank of normal codes per scale. A
patch's score is the L2 distance of its code to the nearest normal code; each pixel gets the
mean score of the patches covering it; the scales' maps are multiplied (Patch SVDD: 64 and 32
px) or summed (multi-scale: 64, 32 and 16 px); the image score is the map's maximum (Patch
SVDD) or the maximum of its 8 x 8-window means (multi-scale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import RuntimeConfig
from pipeline.inference.bundle import (
    MANIFEST_FILE,
    BandThresholds,
    BundleError,
    manifest_kind,
    parse_manifest_file,
    sha256_file,
)
from pipeline.inference.knn import FaissIndex, KnnError
from pipeline.inference.patchcore import ImageScore
from pipeline.inference.scoring import max_window_mean

SVDD_KIND: Literal["patch_svdd"] = "patch_svdd"
MSP_KIND: Literal["multiscale_patch"] = "multiscale_patch"
ENCODER_KINDS = (SVDD_KIND, MSP_KIND)


class ScaleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    patch: int = Field(ge=1, description="Patch side in pixels.")
    stride: int = Field(ge=1, description="Pixels between neighbouring patches.")
    output: str = Field(description="ONNX output holding this scale's codes (NHWC).")
    index_file: str
    rows: int = Field(ge=1)


class SvddManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1]
    kind: Literal["patch_svdd", "multiscale_patch"]
    created_utc: str
    channels: Literal[1, 3]
    dim: int = Field(ge=1)
    scales: tuple[ScaleSpec, ...] = Field(min_length=1)
    combine: Literal["product", "sum"] = Field(description="How the scales' maps are combined.")
    image_score: Literal["max", "window_mean"] = Field(
        default="max", description="Map maximum (Patch SVDD) or maximum of window means (multi-scale method)."
    )
    window: int = Field(default=1, ge=1, le=256, description="Window side in pixels for window_mean.")
    training: dict[str, float | int | str | bool | None]
    thresholds: dict[str, float] | None = None
    band_thresholds: BandThresholds | None = None
    files: dict[str, str]


def is_svdd_bundle(bundle_dir: Path) -> bool:
    return manifest_kind(bundle_dir) in ENCODER_KINDS


def read_svdd_manifest(bundle_dir: Path) -> SvddManifest:
    m = parse_manifest_file(Path(bundle_dir) / MANIFEST_FILE, SvddManifest)
    for name, digest in m.files.items():
        if Path(name).name != name or not (Path(bundle_dir) / name).is_file():
            raise BundleError(f"{bundle_dir}: {name} is missing")
        if sha256_file(Path(bundle_dir) / name) != digest:
            raise BundleError(f"{bundle_dir}: {name} does not match its sha256 in the manifest")
    return m


def patch_mean_map(scores: np.ndarray, *, patch: int, stride: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Patch scores (h, w) of patches at (i * stride, j * stride) of side ``patch`` -> pixel map
    (H, W) float32: each pixel the mean score of the patches covering it (Patch SVDD sec. 3.4).
    Pixels no patch covers (a border narrower than a stride) take the nearest covered value."""
    if patch % stride:
        raise ValueError(f"patch {patch} must be a multiple of stride {stride}")
    m = patch // stride
    s = scores.astype(np.float64)

    def trailing_sum(a: np.ndarray, axis: int) -> np.ndarray:
        # Cell c sums the patches c - m + 1 .. c: those covering the stride-sized cell c; the
        # grid is extended by m - 1 cells so the last patches' far ends are covered too.
        pad = [(0, 0), (0, 0)]
        pad[axis] = (m, m - 1)
        c = np.cumsum(np.pad(a, pad), axis=axis)
        hi = np.take(c, np.arange(m, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - m), axis=axis)
        return hi - lo

    total = trailing_sum(trailing_sum(s, 0), 1)
    count = trailing_sum(trailing_sum(np.ones_like(s), 0), 1)
    cells = (total / count).astype(np.float32)  # (h + m - 1, w + m - 1) cells of stride px
    full = np.repeat(np.repeat(cells, stride, axis=0), stride, axis=1)
    H, W = out_hw
    out = full[:H, :W]
    if out.shape != (H, W):
        out = np.pad(out, ((0, H - out.shape[0]), (0, W - out.shape[1])), mode="edge")
    return np.ascontiguousarray(out)


def dense_codes(session: ort.InferenceSession, outputs: list[str], image: np.ndarray) -> list[np.ndarray]:
    """One image (H, W, C) uint8 through the dense encoder: codes (h, w, dim) float32 per output."""
    out = session.run(outputs, {"pixels": np.ascontiguousarray(image[None])})
    return [np.ascontiguousarray(o[0], dtype=np.float32) for o in out]


class SvddScorer:
    """Scores images against a Patch SVDD bundle; same ``score`` and ``channels`` as PatchCore's."""

    scale = 1.0

    def __init__(self, *, manifest: SvddManifest, session: ort.InferenceSession, indexes: list[FaissIndex]) -> None:
        self.manifest = manifest
        self.session = session
        self.indexes = indexes
        self.channels = manifest.channels
        self.min_side = max(s.patch for s in manifest.scales)

    @classmethod
    def open(cls, bundle_dir: Path, *, runtime: RuntimeConfig) -> SvddScorer:
        m = read_svdd_manifest(bundle_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = runtime.onnx_threads
        try:
            session = ort.InferenceSession(
                str(Path(bundle_dir) / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
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

    def codes(self, image: np.ndarray) -> list[np.ndarray]:
        """Codes per scale, each (h, w, dim) float32."""
        return dense_codes(self.session, [s.output for s in self.manifest.scales], image)

    def check_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) uint8 -> (H, W, C); ValueError with the reason otherwise."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8, got {getattr(image, 'dtype', type(image).__name__)}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(f"image shape {image.shape} does not have the bundle's {self.channels} channel(s)")
        if min(image.shape[:2]) < self.min_side:
            raise ValueError(f"image {image.shape} smaller than the {self.min_side} px patches")
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
        patch_scores = self.search(self.codes(image))
        amap, score = self.combine_maps(patch_scores, image.shape[:2])
        return ImageScore(score=score, patch_scores=patch_scores[0], anomaly_map=amap)
