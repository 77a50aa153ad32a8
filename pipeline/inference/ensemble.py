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

from pipeline.config import RuntimeConfig, ScoringConfig
from pipeline.inference.backends import Backend, open_backend
from pipeline.inference.bundle import BundleError, EnsembleManifest, ManifestBase, member_path
from pipeline.inference.framescore import AnyFrameScorer
from pipeline.inference.patchcore import ImageScore

ENSEMBLE_KIND: Literal["ensemble"] = "ensemble"


def open_bundle(
    bundle_dir: Path, manifest: ManifestBase, *, runtime: RuntimeConfig, scoring: ScoringConfig
) -> EnsembleScorer:
    """The registry's opener for ``ensemble`` bundles: each member through the registry too
    (``read_manifest`` has checked that no member changed since the ensemble was made)."""
    if not isinstance(manifest, EnsembleManifest):
        raise BundleError(f"{bundle_dir}: a {manifest.kind!r} bundle is not an ensemble")
    members = [
        open_backend(member_path(Path(bundle_dir), spec.bundle), runtime=runtime, scoring=scoring)
        for spec in manifest.members
    ]
    return EnsembleScorer(manifest=manifest, members=members)


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
    """Scores images with every member (a ``backends.Backend`` of images only: strip frames go
    to one bundle, not an ensemble)."""

    scale = 1.0

    def __init__(self, *, manifest: EnsembleManifest, members: list[Backend]) -> None:
        channels = {m.channels for m in members}
        if len(channels) != 1:
            raise BundleError(f"ensemble members take different channel counts {sorted(channels)}")
        if manifest.input.channels not in channels:
            raise BundleError(f"ensemble manifest says {manifest.input.channels} channel(s), members take {channels}")
        self.manifest = manifest
        self.kind = manifest.kind
        self.members = members
        self.channels = members[0].channels

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "backbone": self.kind,
            "bank_rows": 0,
            "scale": self.scale,
            "channels": self.channels,
            "members": [m.describe() for m in self.members],
        }

    def check_image(self, image: np.ndarray) -> np.ndarray:
        for m in self.members:
            image = m.check_image(image)
        return image

    def frame_scorer(self, *, tile: int | None, margin: int) -> AnyFrameScorer:
        raise ValueError("an ensemble scores images (evaluate); the daemon and calibrate thresholds take one bundle")

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
