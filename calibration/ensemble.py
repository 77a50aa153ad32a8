"""`stripinspect ensemble`: measure each member bundle on normal images and write an ensemble
folder whose scorer averages the members' normalised maps and image scores."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from tqdm import tqdm

from pipeline.acquisition.images import ImageReadError, list_images, read_image
from pipeline.config import Config
from pipeline.errors import StripinspectError
from pipeline.inference.bundle import MANIFEST_FILE, sha256_file
from pipeline.inference.ensemble import ENSEMBLE_KIND, EnsembleManifest, MemberSpec, normal_statistics, open_member


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
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    for bundle in bundles:
        member = open_member(bundle, runtime=cfg.runtime, scoring=cfg.scoring)
        try:
            images = (read_image(f, member.channels) for f in files)
            results = (
                member.score(im)
                for im in tqdm(images, total=len(files), desc=f"normal {bundle.name}", disable=not progress)
            )
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
    manifest = EnsembleManifest(
        schema_version=1,
        kind=ENSEMBLE_KIND,
        created_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        members=tuple(specs),
        normal_data=str(normal),
        normal_images=len(files),
    )
    (out / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return manifest
