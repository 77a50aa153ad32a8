"""`stripinspect ensemble`: measure each member bundle on normal images and write an ensemble
folder whose scorer averages the members' normalised maps and image scores."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.acquisition.images import ImageReadError, list_images, read_image
from pipeline.config import Config
from pipeline.errors import StripinspectError
from pipeline.inference.backends import open_backend
from pipeline.inference.bundle import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    EnsembleManifest,
    FittedOn,
    InputSpec,
    MemberSpec,
    sha256_file,
    write_manifest,
)
from pipeline.inference.ensemble import ENSEMBLE_KIND, normal_statistics


class EnsembleError(StripinspectError):
    """The ensemble cannot be made; one line."""


def make_ensemble(
    *, bundles: list[Path], normal: Path, out: Path, cfg: Config, every: int = 1, progress: bool = True
) -> EnsembleManifest:
    """Score every ``every``-th image of ``normal`` with each member, keep its normal-score
    statistics, and write ``out/manifest.json``. Normal images the members were not fitted on
    give the fairest statistics; fitting images score lower than new ones, more so for a bank
    that kept more of them."""
    if len(bundles) < 2:
        raise EnsembleError("an ensemble needs at least 2 bundles")
    if every < 1:
        raise EnsembleError(f"every must be >= 1, got {every}")
    files = list_images(normal)[::every]
    if len(files) < 2:
        raise EnsembleError(f"{normal}: need at least 2 normal images, found {len(files)}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    specs: list[MemberSpec] = []
    channels: set[int] = set()
    sizes: set[tuple[int, int]] = set()

    def images(channels: int, desc: str) -> Iterator[np.ndarray]:
        for f in tqdm(files, desc=desc, disable=not progress):
            im = read_image(f, channels)
            sizes.add((int(im.shape[0]), int(im.shape[1])))
            yield im

    for bundle in bundles:
        member = open_backend(bundle, runtime=cfg.runtime, scoring=cfg.scoring)
        channels.add(member.channels)
        try:
            results = (member.score(im) for im in images(member.channels, f"normal {bundle.name}"))
            med, scale, s_med, s_scale = normal_statistics(results)
        except ImageReadError as err:
            raise EnsembleError(str(err)) from None
        specs.append(
            MemberSpec(
                bundle=os.path.relpath(bundle.resolve(), out.resolve()),
                manifest_sha256=sha256_file(bundle / MANIFEST_FILE),
                map_median=med,
                map_scale=scale,
                score_median=s_med,
                score_scale=s_scale,
            )
        )
    if len(channels) != 1:
        raise EnsembleError(f"members take different channel counts {sorted(channels)}")
    manifest = EnsembleManifest(
        schema_version=SCHEMA_VERSION,
        kind=ENSEMBLE_KIND,
        created_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # Each member scales pixels its own way inside its own graph.
        input=InputSpec(channels=channels.pop(), mean=None, std=None, scale=1.0),  # type: ignore[arg-type]
        fitted_on=FittedOn(
            data=str(normal),
            images=len(files),
            image_sizes=sorted(sizes),
            fit_seconds=round(time.perf_counter() - t0, 3),
        ),
        # The ensemble has no data files of its own; its members are pinned by manifest_sha256.
        files={},
        members=tuple(specs),
    )
    write_manifest(out, manifest)
    return manifest
