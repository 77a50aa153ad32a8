"""Scoring with a Patch SVDD bundle (Yi & Yoon, ACCV 2020, sec. 3.4), runtime side (no torch).

The bundle holds the dense encoder (``model.onnx``: uint8 NHWC pixels in, the codes of every
64 px patch at stride 16 and of every 32 px patch at stride 4 out) and one bank of normal codes
per scale (``index.faiss`` for 64 px, ``index32.faiss`` for 32 px). A patch's score is the L2
distance of its code to the nearest normal code; each pixel gets the mean score of the patches
covering it; the two scales' maps are multiplied; the image score is the map's maximum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.bundle import MANIFEST_FILE, BundleError, sha256_file
from pipeline.config import RuntimeConfig
from pipeline.knn import FaissIndex, KnnError
from pipeline.patchcore import ImageScore

SVDD_KIND: Literal["patch_svdd"] = "patch_svdd"


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
    kind: Literal["patch_svdd"]
    created_utc: str
    channels: Literal[1, 3]
    dim: int = Field(ge=1)
    scales: tuple[ScaleSpec, ...] = Field(min_length=1)
    combine: Literal["product", "sum"]
    training: dict[str, float | int | str | bool]
    files: dict[str, str]


def is_svdd_bundle(bundle_dir: Path) -> bool:
    try:
        data = json.loads((Path(bundle_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("kind") == SVDD_KIND


def read_svdd_manifest(bundle_dir: Path) -> SvddManifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        m = SvddManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: unreadable manifest: {err}") from None
    except ValidationError as err:
        e = err.errors()[0]
        raise BundleError(f"{path}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}") from None
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

    def score(self, image: np.ndarray) -> ImageScore:
        if image.ndim == 2:
            image = image[:, :, None]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(f"image {image.dtype} {image.shape} is not uint8 with {self.channels} channel(s)")
        if min(image.shape[:2]) < self.min_side:
            raise ValueError(f"image {image.shape} smaller than the {self.min_side} px patches")
        H, W = image.shape[:2]
        maps, first_patch = [], None
        for spec, index, codes in zip(self.manifest.scales, self.indexes, self.codes(image), strict=True):
            gh, gw, dim = codes.shape
            flat = codes.reshape(-1, dim)
            if not np.isfinite(flat).all():
                raise ValueError("codes are not finite")
            dist, _ = index.search(flat, 1)
            patch = dist[:, 0].reshape(gh, gw)
            first_patch = patch if first_patch is None else first_patch
            maps.append(patch_mean_map(patch, patch=spec.patch, stride=spec.stride, out_hw=(H, W)))
        amap = np.prod(maps, axis=0) if self.manifest.combine == "product" else np.sum(maps, axis=0)
        assert first_patch is not None
        return ImageScore(score=float(amap.max()), patch_scores=first_patch, anomaly_map=amap.astype(np.float32))
