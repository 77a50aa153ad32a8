"""Fit a memory bank on normal images and write a bundle (PatchCore, sec. 3.2)."""

from __future__ import annotations

import datetime as dt
import math
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from export.coreset import StreamingCoreset
from export.onnx_export import MODEL_INFO_FILE, ModelInfo, export_backbone
from pipeline.bundle import (
    INDEX_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    CoresetSpec,
    FeatureSpec,
    FittedOn,
    IndexSpec,
    InputSpec,
    Manifest,
    sha256_file,
    write_manifest,
)
from pipeline.config import Config
from pipeline.embed import MIN_SIDE, OnnxEmbedder
from pipeline.errors import StripinspectError
from pipeline.images import ImageReadError, list_images, read_image
from pipeline.knn import build_index, write_index
from pipeline.patchcore import resize_for_model


class FitError(StripinspectError):
    """Fitting cannot proceed; one line."""


def _scaled_hw(h: int, w: int, scale: float) -> tuple[int, int]:
    if scale == 1.0:
        return h, w
    return max(MIN_SIDE, round(h * scale)), max(MIN_SIDE, round(w * scale))


def prepare_model(cfg: Config, out: Path, model_dir: Path | None) -> ModelInfo:
    """Put model.onnx and model.json into ``out``: exported now, or copied from ``model_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        return export_backbone(cfg.backbone, out, threads=cfg.runtime.onnx_threads)
    for name in (MODEL_FILE, MODEL_INFO_FILE):
        if not (model_dir / name).is_file():
            raise FitError(f"{model_dir}: missing {name}; run `stripinspect export` first")
        if model_dir.resolve() != out.resolve():
            shutil.copy2(model_dir / name, out / name)
    return ModelInfo.read(out / MODEL_INFO_FILE)


def fit_bundle(*, data: Path, out: Path, cfg: Config, model_dir: Path | None = None, progress: bool = True) -> Manifest:
    """Embed every image in ``data`` through the ONNX session, select the coreset, write the bundle."""
    t0 = time.perf_counter()
    files = list_images(data)
    if not files:
        raise FitError(f"{data}: no images (.png, .jpg, .bmp, .tif)")
    # Planning pass: sizes and channel count of every image, so that each chunk of the
    # streaming coreset knows its share of the final budget and bad files fail before the
    # long part starts.
    sizes: list[tuple[int, int]] = []
    channels: int | None = None
    for f in tqdm(files, desc="check images", disable=not progress, unit="img"):
        try:
            img = read_image(f)
        except ImageReadError as err:
            raise FitError(str(err)) from None
        if channels is None:
            channels = img.shape[2]
        elif img.shape[2] != channels:
            raise FitError(f"{f}: {img.shape[2]} channels, the first image has {channels}")
        sizes.append((img.shape[0], img.shape[1]))
    assert channels is not None
    scale = cfg.fit.scale
    info = prepare_model(cfg, out, model_dir)
    stride = info.feature_stride
    total = sum(math.ceil(h / stride) * math.ceil(w / stride) for h, w in (_scaled_hw(*s, scale) for s in sizes))
    cc = cfg.fit.coreset
    final_rows = max(1, math.ceil(cc.ratio * total))
    if cc.max_rows is not None:
        final_rows = min(final_rows, cc.max_rows)
    embedder = OnnxEmbedder.for_runtime(
        model_path=out / MODEL_FILE, embedding_dim=info.embedding_dim, input_channels=channels, runtime=cfg.runtime
    )
    coreset = StreamingCoreset(
        dim=info.embedding_dim,
        total_patches=total,
        final_rows=final_rows,
        oversample=cc.oversample,
        chunk_patches=cc.chunk_patches,
        projection_dim=cc.projection_dim,
        seed=cc.seed,
    )
    for f in tqdm(files, desc="embed + coreset", disable=not progress, unit="img"):
        img = resize_for_model(read_image(f), scale)
        feats = embedder.embed(img[None])[0]
        coreset.add(feats.reshape(-1, info.embedding_dim))
    bank = coreset.finish()
    index = build_index(bank, cfg.fit.index)
    write_index(index, out / INDEX_FILE)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        created_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        input=InputSpec(channels=channels, mean=info.input_mean, std=info.input_std, scale=scale),  # type: ignore[arg-type]
        features=FeatureSpec(
            backbone=info.backbone,
            layers=info.layers,
            layer_channels=info.layer_channels,
            stride=stride,
            aggregation_size=info.aggregation_size,
            border_pad=info.border_pad,
            projection_dim=info.projection_dim,
            embedding_dim=info.embedding_dim,
            weights=info.weights,
            weights_sha256=info.weights_sha256,
            opset=info.opset,
            verified_relative_error=info.verified_relative_error,
        ),
        index=IndexSpec(type=cfg.fit.index, rows=int(bank.shape[0])),
        coreset=CoresetSpec(
            ratio=cc.ratio,
            max_rows=cc.max_rows,
            projection_dim=cc.projection_dim,
            oversample=cc.oversample,
            chunk_patches=cc.chunk_patches,
            seed=cc.seed,
            patches_seen=coreset.patches_seen,
            rows=int(bank.shape[0]),
        ),
        fitted_on=FittedOn(
            data=str(data),
            images=len(files),
            image_sizes=sorted(set(sizes)),
            fit_seconds=round(time.perf_counter() - t0, 3),
        ),
        files={name: sha256_file(out / name) for name in (MODEL_FILE, INDEX_FILE, MODEL_INFO_FILE)},
    )
    write_manifest(out, manifest)
    return manifest
