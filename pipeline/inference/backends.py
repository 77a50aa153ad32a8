"""The one place that decides which code opens a bundle: kind -> backend module.

``read_manifest`` (the one verifier) reads the bundle's ``kind``; ``REGISTRY`` names the module
whose ``open_bundle(bundle_dir, manifest, *, runtime, scoring)`` returns a ``Backend``: an object
that embeds, scores and describes itself, and hands out the frame scorer the daemon uses. Every
caller (daemon, evaluate, thresholds, ensembles, benchmarks, CLI, demo) opens bundles here. A new
backend is one module with ``open_bundle`` plus one line in ``REGISTRY`` (and its manifest part
in ``pipeline.inference.bundle``, whose ``KINDS`` a test holds equal to ``REGISTRY``).

The modules are imported when a bundle of their kind is opened, not here: the ensemble backend
opens its members through this registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from pipeline.config import RuntimeConfig, ScoringConfig
from pipeline.errors import StripinspectError
from pipeline.inference.bundle import BundleError, ManifestBase, read_manifest

if TYPE_CHECKING:
    from pipeline.inference.framescore import AnyFrameScorer
    from pipeline.inference.patchcore import ImageScore

REGISTRY: dict[str, str] = {
    "patchcore": "pipeline.inference.patchcore",
    "patch_svdd": "pipeline.inference.svdd",
    "multiscale_patch": "pipeline.inference.svdd",
    "ensemble": "pipeline.inference.ensemble",
}


class Backend(Protocol):
    """A bundle opened for scoring, whatever its kind."""

    @property
    def kind(self) -> str: ...

    @property
    def manifest(self) -> ManifestBase: ...

    @property
    def channels(self) -> int: ...

    @property
    def scale(self) -> float: ...

    def describe(self) -> dict[str, object]:
        """For logs and evaluate's metrics: at least kind, backbone, bank_rows, scale, channels."""
        ...

    def check_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) uint8 -> (H, W, C); ValueError with the reason otherwise."""
        ...

    def score(self, image: np.ndarray) -> ImageScore:
        """One image as the bundle was fitted (its resize, its per-position statistics)."""
        ...

    def frame_scorer(self, *, tile: int | None, margin: int) -> AnyFrameScorer:
        """Strip frames at full resolution with the band interface of the daemon
        (``features``, ``search_band``, ``band_map``); ValueError if this bundle cannot."""
        ...


Opener = Callable[..., Backend]


def opener(kind: str) -> Opener:
    """The ``open_bundle`` of ``kind``'s module; BundleError of one line for an unknown kind."""
    module = REGISTRY.get(kind)
    if module is None:
        raise BundleError(f"kind {kind!r} is not a registered backend (known: {', '.join(REGISTRY)})")
    return cast(Opener, importlib.import_module(module).open_bundle)


def open_backend(bundle: Path, *, runtime: RuntimeConfig, scoring: ScoringConfig) -> Backend:
    """Verify ``bundle`` (hashes, shapes, schema version) and open it with its kind's backend;
    a bundle that cannot be used is a BundleError of one line."""
    manifest = read_manifest(Path(bundle))
    return opener(manifest.kind)(Path(bundle), manifest, runtime=runtime, scoring=scoring)


def open_frame_scorer(
    bundle: Path, *, runtime: RuntimeConfig, scoring: ScoringConfig, tile: int | None, margin: int
) -> AnyFrameScorer:
    """The frame scorer of any bundle that can score strip frames, as the daemon and the
    threshold calibration use it; one that cannot is a StripinspectError of one line."""
    backend = open_backend(bundle, runtime=runtime, scoring=scoring)
    try:
        return backend.frame_scorer(tile=tile, margin=margin)
    except ValueError as err:
        raise StripinspectError(f"{bundle}: {err}") from None
