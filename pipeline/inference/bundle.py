"""The self-describing model bundle: model.onnx + index.faiss + manifest.json.

No pickle: the manifest is JSON validated by a strict schema, the model is ONNX, the bank is
a faiss index file. Loading checks every file's sha256 and the shapes the files declare
against the manifest, and fails with one line naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import StripinspectError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
INDEX_FILE = "index.faiss"
POSITION_STATS_FILE = "position_stats.npz"


class BundleError(StripinspectError):
    """The bundle cannot be used; the message is one line."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Frozen):
    """What the ONNX graph takes: raw 8-bit pixels, scaled inside the graph."""

    channels: Literal[1, 3] = Field(description="1 = grey, 3 = RGB (in that order).")
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    mean: tuple[float, float, float] = Field(description="Per-channel mean in pixel units (in the graph).")
    std: tuple[float, float, float] = Field(description="Per-channel std in pixel units (in the graph).")
    scale: float = Field(gt=0, description="Resize factor applied to images before the graph.")


class FeatureSpec(_Frozen):
    backbone: str
    layers: tuple[str, str]
    layer_channels: tuple[int, int]
    stride: int = Field(ge=1)
    aggregation_size: int = Field(ge=1)
    border_pad: int = Field(ge=0, description="Mirrored pixels added around the image inside the graph.")
    projection_dim: int | None
    embedding_dim: int = Field(ge=1)
    weights: str
    weights_sha256: str | None
    opset: int
    verified_relative_error: float = Field(ge=0)


class IndexSpec(_Frozen):
    type: Literal["flat"]
    metric: Literal["l2"] = "l2"
    rows: int = Field(ge=1)


class CoresetSpec(_Frozen):
    method: Literal["greedy_kcenter"] = "greedy_kcenter"
    ratio: float = Field(gt=0, le=1)
    max_rows: int | None
    projection_dim: int
    oversample: float
    chunk_patches: int
    seed: int
    patches_seen: int = Field(ge=1)
    rows: int = Field(ge=1)


class FittedOn(_Frozen):
    data: str
    images: int = Field(ge=1)
    image_sizes: list[tuple[int, int]] = Field(description="Distinct (height, width) of the training images.")
    fit_seconds: float = Field(ge=0)


class BandThresholds(_Frozen):
    """Per-CD-band pixel thresholds from `stripinspect calibrate thresholds`, with provenance."""

    band_edges_px: list[int] = Field(min_length=2, description="Column edges of the bands, left to right.")
    thresholds: list[float] = Field(min_length=1, description="Pixel threshold of each band.")
    min_area_mm2: float = Field(gt=0, description="Smallest region that counts as an alarm.")
    target_alarms_per_km: float = Field(gt=0)
    calibration_alarms_per_km: list[float] = Field(description="Rate of each band on the calibration run.")
    normal_quantiles: dict[str, list[float]] = Field(description="q0.5, q0.99, q0.999, max of normal pixels per band.")
    calibrated_on: str
    metres: float = Field(gt=0)
    created_utc: str


class PositionStats(_Frozen):
    """Normal patch-score statistics per patch position, from training images scored against
    banks fitted without them (cross-fitting); applies to images of the fitted size only."""

    file: str = Field(description="npz with float32 arrays 'median' and 'mad' of shape grid.")
    grid: tuple[int, int] = Field(description="Patch grid (rows, columns) the statistics describe.")
    image_hw: tuple[int, int] = Field(description="Model input size (after fit.scale) of the images.")
    folds: int = Field(ge=2, description="Training images split into this many contiguous folds.")
    images: int = Field(ge=2)
    median_of_medians: float = Field(ge=0)


class Manifest(_Frozen):
    schema_version: int
    created_utc: str
    input: InputSpec
    features: FeatureSpec
    index: IndexSpec
    coreset: CoresetSpec
    fitted_on: FittedOn
    thresholds: dict[str, float] | None = None
    band_thresholds: BandThresholds | None = None
    position_stats: PositionStats | None = None
    files: dict[str, str] = Field(description="sha256 of every other file of the bundle.")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


ManifestT = TypeVar("ManifestT", bound=BaseModel)


def manifest_kind(bundle_dir: Path) -> str | None:
    """The manifest's ``kind`` (learned-encoder bundles, ensembles); None for a PatchCore
    manifest, which has none, or for a missing or unreadable one (its reader says why)."""
    try:
        data = json.loads((Path(bundle_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def parse_manifest_file(path: Path, model: type[ManifestT]) -> ManifestT:
    """``path`` validated as ``model``; BundleError of one line naming the key that is wrong."""
    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: unreadable manifest: {err}") from None
    except ValidationError as err:
        e = err.errors()[0]
        raise BundleError(f"{path}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}") from None


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse and verify the manifest and the hashes of the files it lists."""
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a bundle (no {MANIFEST_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable manifest: {err}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {version!r} not supported (this build reads {SCHEMA_VERSION})")
    if "kind" in data:
        # Learned-encoder bundles and ensembles carry a kind; PatchCore manifests do not.
        raise BundleError(f"{bundle_dir}: a {data['kind']!r} bundle; this needs a PatchCore bundle")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"]) or "manifest"
        shown = repr(e.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise BundleError(f"{path}: {loc} = {shown}: {e['msg']}") from None
    for required in (MODEL_FILE, INDEX_FILE):
        if required not in manifest.files:
            raise BundleError(f"{path}: files does not list {required}")
    for name, digest in manifest.files.items():
        if Path(name).name != name:
            raise BundleError(f"{path}: file name {name!r} must not contain a path")
        fpath = Path(bundle_dir) / name
        if not fpath.is_file():
            raise BundleError(f"{bundle_dir}: {name} is missing")
        actual = sha256_file(fpath)
        if actual != digest:
            raise BundleError(f"{bundle_dir}: {name} sha256 {actual[:12]}... does not match manifest {digest[:12]}...")
    return manifest


def write_manifest(bundle_dir: Path, manifest: BaseModel) -> None:
    """Replace the bundle's manifest atomically (any bundle kind's manifest model)."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    tmp = Path(bundle_dir) / (MANIFEST_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(Path(bundle_dir) / MANIFEST_FILE)
