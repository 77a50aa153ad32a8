"""An ensemble of bundles (PatchCore and a learned patch encoder, say): each member's pixel map
and image score are normalised by that member's statistics on normal images, then averaged.

The ensemble is a folder with one ``manifest.json`` that names its member bundles (paths
relative to the ensemble folder, or absolute) with the sha256 of each member's manifest, so a
refitted member is refused instead of silently mixed with stale statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import RuntimeConfig, ScoringConfig
from pipeline.inference.bundle import MANIFEST_FILE, BundleError, manifest_kind, parse_manifest_file, sha256_file
from pipeline.inference.patchcore import ImageScore, PatchCoreScorer
from pipeline.inference.svdd import SvddScorer, is_svdd_bundle

ENSEMBLE_KIND: Literal["ensemble"] = "ensemble"


class MemberSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    bundle: str = Field(description="Member bundle folder, relative to the ensemble folder or absolute.")
    manifest_sha256: str = Field(description="sha256 of the member's manifest.json when the ensemble was made.")
    map_median: float = Field(description="Median pixel score on the normal images.")
    map_scale: float = Field(gt=0, description="q99.9 - median of the pixel scores on the normal images.")
    score_median: float = Field(description="Median image score on the normal images.")
    score_scale: float = Field(gt=0, description="Robust spread (1.4826 MAD) of the image scores on normal images.")


class EnsembleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1]
    kind: Literal["ensemble"]
    created_utc: str
    members: tuple[MemberSpec, ...] = Field(min_length=2)
    normal_data: str = Field(description="Where the normal images of the statistics came from.")
    normal_images: int = Field(ge=2)


def is_ensemble(bundle_dir: Path) -> bool:
    return manifest_kind(bundle_dir) == ENSEMBLE_KIND


def open_member(bundle: Path, *, runtime: RuntimeConfig, scoring: ScoringConfig) -> PatchCoreScorer | SvddScorer:
    if is_svdd_bundle(bundle):
        return SvddScorer.open(bundle, runtime=runtime)
    return PatchCoreScorer.open(bundle, runtime=runtime, scoring=scoring)


def normal_statistics(results: Iterable[ImageScore]) -> tuple[float, float, float, float]:
    """(map median, map scale, image-score median, image-score scale) of one member's results
    on normal images; scales are robust and positive."""
    pixels, scores = [], []
    for r in results:
        # A subsample keeps memory flat on large images; quantiles of 4,096 pixels per image
        # over dozens of images are stable to well under a percent.
        flat = r.anomaly_map.ravel()
        pixels.append(flat[:: max(1, flat.size // 4096)])
        scores.append(r.score)
    if len(scores) < 2:
        raise ValueError("need at least 2 normal images")
    px = np.concatenate(pixels).astype(np.float64)
    med = float(np.median(px))
    scale = float(np.quantile(px, 0.999)) - med
    s = np.asarray(scores, np.float64)
    s_med = float(np.median(s))
    s_scale = 1.4826 * float(np.median(np.abs(s - s_med)))
    tiny = 1e-12 + 1e-9 * max(abs(med), abs(s_med))
    return med, max(scale, tiny), s_med, max(s_scale, tiny)


class EnsembleScorer:
    """Scores images with every member; same ``score`` and ``channels`` as a single bundle."""

    scale = 1.0

    def __init__(self, *, manifest: EnsembleManifest, members: list[PatchCoreScorer | SvddScorer]) -> None:
        channels = {m.channels for m in members}
        if len(channels) != 1:
            raise BundleError(f"ensemble members take different channel counts {sorted(channels)}")
        self.manifest = manifest
        self.members = members
        self.channels = members[0].channels

    @classmethod
    def open(cls, ensemble_dir: Path, *, runtime: RuntimeConfig, scoring: ScoringConfig) -> EnsembleScorer:
        path = Path(ensemble_dir) / MANIFEST_FILE
        m = parse_manifest_file(path, EnsembleManifest)
        members = []
        for spec in m.members:
            bundle = member_path(Path(ensemble_dir), spec.bundle)
            mpath = bundle / MANIFEST_FILE
            if not mpath.is_file():
                raise BundleError(f"{path}: member {spec.bundle} has no {MANIFEST_FILE}")
            if sha256_file(mpath) != spec.manifest_sha256:
                raise BundleError(f"{path}: member {spec.bundle} changed since the ensemble was made; make it again")
            members.append(open_member(bundle, runtime=runtime, scoring=scoring))
        return cls(manifest=m, members=members)

    def score(self, image: np.ndarray) -> ImageScore:
        maps, scores, first = [], [], None
        for spec, member in zip(self.manifest.members, self.members, strict=True):
            r = member.score(image)
            first = r.patch_scores if first is None else first
            maps.append((r.anomaly_map - spec.map_median) / spec.map_scale)
            scores.append((r.score - spec.score_median) / spec.score_scale)
        assert first is not None
        amap = np.mean(maps, axis=0).astype(np.float32)
        return ImageScore(score=float(np.mean(scores)), patch_scores=first, anomaly_map=amap)


def member_path(ensemble_dir: Path, bundle: str) -> Path:
    p = Path(bundle)
    return p if p.is_absolute() else ensemble_dir / p
