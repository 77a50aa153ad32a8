"""The self-describing bundle: one manifest schema (versioned) and one verifier for every kind.

A bundle is a folder: ``manifest.json`` plus the data files it lists (ONNX model, faiss banks,
npz statistics), each with its sha256. No pickle: the manifest is JSON validated by one strict
schema whose common part (input, what it was fitted on, thresholds, files) is the same for
every kind and whose kind-specific part is a discriminated union on ``kind``. ``read_manifest``
is the one verifier: version, schema, file names, hashes and the shapes the data files declare,
failing with one line naming what is wrong. Which code opens a kind is decided in
``pipeline.inference.backends``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Annotated, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pipeline.errors import StripinspectError

SCHEMA_VERSION: Final = 2
# The release that first wrote SCHEMA_VERSION; older bundles are refused with how to refit them.
SCHEMA_SINCE = "0.2"
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
    mean: tuple[float, float, float] | None = Field(
        description="Per-channel mean in pixel units (in the graph); None: each member bundle has its own."
    )
    std: tuple[float, float, float] | None = Field(
        description="Per-channel std in pixel units (in the graph); None: each member bundle has its own."
    )
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
    """The normal images the bundle was fitted on (an ensemble: measured its members on)."""

    data: str
    images: int = Field(ge=1)
    image_sizes: list[tuple[int, int]] = Field(description="Distinct (height, width) of the images.")
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


class ScaleSpec(_Frozen):
    """One scale of a learned patch encoder: its ONNX output and its bank."""

    patch: int = Field(ge=1, description="Patch side in pixels.")
    stride: int = Field(ge=1, description="Pixels between neighbouring patches.")
    output: str = Field(description="ONNX output holding this scale's codes (NHWC).")
    index_file: str
    rows: int = Field(ge=1)


class MemberSpec(_Frozen):
    """One member bundle of an ensemble with its statistics on normal images."""

    bundle: str = Field(description="Member bundle folder, relative to the ensemble folder or absolute.")
    manifest_sha256: str = Field(description="sha256 of the member's manifest.json when the ensemble was made.")
    map_median: float = Field(description="Median pixel score on the normal images.")
    map_scale: float = Field(gt=0, description="q99.9 - median of the pixel scores on the normal images.")
    score_median: float = Field(description="Median image score on the normal images.")
    score_scale: float = Field(gt=0, description="Robust spread (1.4826 MAD) of the image scores on normal images.")


class ManifestBase(_Frozen):
    """What every bundle kind's manifest holds."""

    schema_version: Literal[2]
    kind: str = Field(description="The backend that opens the bundle (pipeline.inference.backends).")
    created_utc: str
    input: InputSpec
    fitted_on: FittedOn
    thresholds: dict[str, float] | None = Field(default=None, description="Global thresholds, e.g. 'pixel'.")
    band_thresholds: BandThresholds | None = None
    files: dict[str, str] = Field(description="sha256 of every other file of the bundle, by bare file name.")

    @property
    def pixel_threshold(self) -> float | None:
        return (self.thresholds or {}).get("pixel")

    def required_files(self) -> tuple[str, ...]:
        """Files this kind cannot work without; each must be listed in ``files``."""
        return ()

    def indexes(self) -> tuple[tuple[str, int, int], ...]:
        """(file, rows, dim) of each faiss bank the manifest declares."""
        return ()


class ChosenSettings(_Frozen):
    """Settings chosen at fit time from the training images (``fit.choose``); a config value other
    than 'auto' overrides each at scoring time."""

    scale: float = Field(gt=0)
    position_normalise: Literal["none", "image", "map"]
    mad_floor: float = Field(ge=0)
    image_score: Literal["reweighted", "window"]


class CandidateResult(_Frozen):
    """One candidate's self-validation figures on held-out normal images and painted anomalies."""

    scale: float = Field(gt=0)
    position_normalise: Literal["none", "image", "map"]
    mad_floor: float = Field(ge=0)
    image_score: Literal["reweighted", "window"]
    image_auroc: float
    pixel_auroc: float
    aupro: float
    objective: float = Field(description="Mean of the three figures over the replicates.")
    replicates: list[float] = Field(min_length=1, description="The mean of the three figures in each replicate.")


class Selection(_Frozen):
    """How the 'auto' settings were chosen: candidates, their figures, the choice."""

    images: int = Field(ge=2, description="Held-out normal images (each also painted once per replicate).")
    folds: int = Field(ge=2)
    anomalies: dict[str, int] = Field(description="Painted anomalies by kind.")
    pinned: list[str] = Field(description="Settings the config fixed (not chosen).")
    seconds: float = Field(ge=0)
    candidates: list[CandidateResult] = Field(min_length=1)
    chosen: ChosenSettings


class PatchCoreManifest(ManifestBase):
    """PatchCore (Roth et al. 2022): a pretrained CNN's aggregated features, one coreset bank."""

    kind: Literal["patchcore"]
    features: FeatureSpec
    index: IndexSpec
    coreset: CoresetSpec
    position_stats: PositionStats | None = None
    selection: Selection | None = Field(default=None, description="Fit-time choice of the 'auto' settings.")

    def required_files(self) -> tuple[str, ...]:
        stats = (self.position_stats.file,) if self.position_stats is not None else ()
        return (MODEL_FILE, INDEX_FILE, *stats)

    def indexes(self) -> tuple[tuple[str, int, int], ...]:
        return ((INDEX_FILE, self.index.rows, self.features.embedding_dim),)


class EncoderManifest(ManifestBase):
    """A learned patch encoder: Patch SVDD (Yi & Yoon 2020) or the multi-scale method (Tsai et
    al. 2022); one dense ONNX encoder, one bank per scale."""

    kind: Literal["patch_svdd", "multiscale_patch"]
    dim: int = Field(ge=1)
    scales: tuple[ScaleSpec, ...] = Field(min_length=1)
    combine: Literal["product", "sum"] = Field(description="How the scales' maps are combined.")
    image_score: Literal["max", "window_mean"] = Field(
        default="max", description="Map maximum (Patch SVDD) or maximum of window means (multi-scale method)."
    )
    window: int = Field(default=1, ge=1, le=256, description="Window side in pixels for window_mean.")
    training: dict[str, float | int | str | bool | None]

    def required_files(self) -> tuple[str, ...]:
        return (MODEL_FILE, *(s.index_file for s in self.scales))

    def indexes(self) -> tuple[tuple[str, int, int], ...]:
        return tuple((s.index_file, s.rows, self.dim) for s in self.scales)


class EnsembleManifest(ManifestBase):
    """Member bundles whose maps and image scores are normalised by their normal statistics and
    averaged; each member is pinned by the sha256 of its manifest."""

    kind: Literal["ensemble"]
    members: tuple[MemberSpec, ...] = Field(min_length=2)


AnyManifest = PatchCoreManifest | EncoderManifest | EnsembleManifest
# The schema: the kind-specific part chosen by ``kind`` (a pydantic discriminated union).
BundleManifest = Annotated[AnyManifest, Field(discriminator="kind")]
_SCHEMA: TypeAdapter[AnyManifest] = TypeAdapter(BundleManifest)
KINDS: tuple[str, ...] = tuple(k for m in get_args(AnyManifest) for k in get_args(m.model_fields["kind"].annotation))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def member_path(ensemble_dir: Path, bundle: str) -> Path:
    p = Path(bundle)
    return p if p.is_absolute() else Path(ensemble_dir) / p


def read_manifest(bundle_dir: Path) -> AnyManifest:
    """The one verifier of any bundle: parse ``manifest.json`` against the schema, then check
    every listed file (bare name, present, sha256) and the shapes the data files declare
    (faiss banks: rows and dims; ensembles: the member manifests they were made with).
    BundleError of one line naming what is wrong."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a bundle (no {MANIFEST_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable manifest: {err}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    version = data.get("schema_version")
    if version == 1:
        raise BundleError(_refit_line(bundle_dir, data))
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {version!r} not supported (this build reads {SCHEMA_VERSION})")
    kind = data.get("kind")
    if kind not in KINDS:
        raise BundleError(f"{path}: kind {kind!r} is not a registered backend (known: {', '.join(KINDS)})")
    try:
        manifest = _SCHEMA.validate_python(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = [str(p) for p in e["loc"]]
        # The discriminated union puts the kind first in the location; the key path is the rest.
        loc = loc[1:] if loc and loc[0] == kind else loc
        shown = repr(e.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise BundleError(f"{path}: {'.'.join(loc) or 'manifest'} = {shown}: {e['msg']}") from None
    _verify_files(bundle_dir, manifest)
    return manifest


def _verify_files(bundle_dir: Path, manifest: ManifestBase) -> None:
    path = bundle_dir / MANIFEST_FILE
    for required in manifest.required_files():
        if required not in manifest.files:
            raise BundleError(f"{path}: files does not list {required}")
    for name, digest in manifest.files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{path}: file name {name!r} must not contain a path")
        fpath = bundle_dir / name
        if not fpath.is_file():
            raise BundleError(f"{bundle_dir}: {name} is missing")
        actual = sha256_file(fpath)
        if actual != digest:
            raise BundleError(f"{bundle_dir}: {name} sha256 {actual[:12]}... does not match manifest {digest[:12]}...")
    for name, rows, dim in manifest.indexes():
        stored_rows, stored_dim = _flat_index_shape(bundle_dir / name)
        if stored_dim != dim:
            raise BundleError(f"{bundle_dir}: {name} holds {stored_dim} dims, manifest says {dim}")
        if stored_rows != rows:
            raise BundleError(f"{bundle_dir}: {name} holds {stored_rows} rows, manifest says {rows}")
    if isinstance(manifest, EnsembleManifest):
        for spec in manifest.members:
            mpath = member_path(bundle_dir, spec.bundle) / MANIFEST_FILE
            if not mpath.is_file():
                raise BundleError(f"{path}: member {spec.bundle} has no {MANIFEST_FILE}")
            if sha256_file(mpath) != spec.manifest_sha256:
                raise BundleError(f"{path}: member {spec.bundle} changed since the ensemble was made; make it again")


def _flat_index_shape(path: Path) -> tuple[int, int]:
    """(rows, dim) from the header of a faiss flat L2 index file, without reading the bank:
    faiss writes the fourcc 'IxF2', then d as int32 and ntotal as int64 (faiss/impl/index_write.cpp)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 16 or head[:4] != b"IxF2":
        raise BundleError(f"{path}: not a faiss flat L2 index (header {head[:4]!r})")
    dim, rows = struct.unpack("<iq", head[4:16])
    return int(rows), int(dim)


# The three shapes schema 1 had, by their ``kind`` (PatchCore had none): what the bundle was,
# the command that writes it again, and where its manifest kept the data it was fitted on.
_V1_SHAPES: dict[object, tuple[str, str, tuple[str, ...]]] = {
    None: ("a PatchCore bundle", "stripinspect fit --data {data} --out {out}", ("fitted_on", "data")),
    "patch_svdd": (
        "a Patch SVDD bundle",
        "stripinspect fit --backend svdd --data {data} --out {out}",
        ("training", "fitted_on"),
    ),
    "multiscale_patch": (
        "a multi-scale bundle",
        "stripinspect fit --backend msp --data {data} --out {out}",
        ("training", "fitted_on"),
    ),
    "ensemble": (
        "an ensemble",
        "stripinspect ensemble --bundles {members} --normal {data} --out {out}",
        ("normal_data",),
    ),
}


def _refit_line(bundle_dir: Path, data: dict[str, object]) -> str:
    """One line for a bundle of schema 1: its version, what it was and the command that
    writes it again (with the data folder its manifest names, where it names one)."""
    what, command, data_key = _V1_SHAPES.get(data.get("kind"), _V1_SHAPES[None])
    found: object = data
    for key in data_key:
        found = found.get(key) if isinstance(found, dict) else None
    raw = data.get("members")
    members = [str(m.get("bundle")) for m in raw if isinstance(m, dict)] if isinstance(raw, list) else []
    cmd = command.format(
        data=found if isinstance(found, str) else "DATA", out=bundle_dir, members=" ".join(members) or "BUNDLE ..."
    )
    return (
        f"bundle {bundle_dir}: manifest schema 1 ({what} written before stripinspect {SCHEMA_SINCE}); "
        f"refit it with '{cmd}'"
    )


def write_manifest(bundle_dir: Path, manifest: ManifestBase) -> None:
    """Replace the bundle's manifest atomically (any kind)."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    tmp = Path(bundle_dir) / (MANIFEST_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(Path(bundle_dir) / MANIFEST_FILE)
