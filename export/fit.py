"""Fit a memory bank on normal images and write a bundle (PatchCore, sec. 3.2); ``fit`` is the one
entry for every backend (the learned patch encoders are fitted in export/svdd_fit.py)."""

from __future__ import annotations

import datetime as dt
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from export.coreset import StreamingCoreset, reduce_union
from export.onnx_export import MODEL_INFO_FILE, ModelInfo, export_backbone
from export.selection import ALL_SETTINGS, can_choose, choose_settings, pinned_settings, selection_table
from pipeline.acquisition.images import ImageReadError, read_image, survey_training_folder
from pipeline.config import Config
from pipeline.errors import StripinspectError
from pipeline.inference.bundle import (
    INDEX_FILE,
    MODEL_FILE,
    POSITION_STATS_FILE,
    SCHEMA_VERSION,
    CoresetSpec,
    EncoderManifest,
    FeatureSpec,
    FittedOn,
    IndexSpec,
    InputSpec,
    PatchCoreManifest,
    PositionStats,
    sha256_file,
    write_manifest,
)
from pipeline.inference.embed import OnnxEmbedder
from pipeline.inference.knn import FaissIndex, build_index, write_index
from pipeline.inference.patchcore import median_mad, model_hw, resize_for_model


class FitError(StripinspectError):
    """Fitting cannot proceed; one line."""


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


def fit_bundle(
    *, data: Path, out: Path, cfg: Config, model_dir: Path | None = None, progress: bool = True
) -> PatchCoreManifest:
    """Embed every image in ``data`` through the ONNX session, select the coreset, write the bundle."""
    t0 = time.perf_counter()
    # Planning pass: sizes and channel count of every image, so that each chunk of the
    # streaming coreset knows its share of the final budget and bad files fail before the
    # long part starts.
    try:
        survey = survey_training_folder(data)
    except ImageReadError as err:
        raise FitError(str(err)) from None
    files, sizes, channels = survey.files, survey.sizes, survey.channels
    info = prepare_model(cfg, out, model_dir)
    stride = info.feature_stride
    embedder = OnnxEmbedder.for_runtime(
        model_path=out / MODEL_FILE, embedding_dim=info.embedding_dim, input_channels=channels, runtime=cfg.runtime
    )
    selection = None
    if pinned_settings(cfg) != ALL_SETTINGS and can_choose(cfg, sizes):
        selection = choose_settings(
            files=files, sizes=sizes, channels=channels, cfg=cfg, embedder=embedder, stride=stride, progress=progress
        )
    scale = selection.chosen.scale if selection is not None else (1.0 if cfg.fit.scale == "auto" else cfg.fit.scale)
    total = sum(math.ceil(h / stride) * math.ceil(w / stride) for h, w in (model_hw(*s, scale) for s in sizes))
    cc = cfg.fit.coreset
    final_rows = max(1, math.ceil(cc.ratio * total))
    if cc.max_rows is not None:
        final_rows = min(final_rows, cc.max_rows)
    model_sizes = sorted({model_hw(*s, scale) for s in sizes})
    folds = cfg.fit.position_folds if len(model_sizes) == 1 and len(files) >= cfg.fit.position_folds else 0
    # Folds are contiguous runs of the files in name order (camera files are usually named by
    # time): a held-out fold is a different stretch of time, as the frames to come will be.
    fold_of = [i * folds // len(files) for i in range(len(files))] if folds else [0] * len(files)
    patches = [math.ceil(h / stride) * math.ceil(w / stride) for h, w in (model_hw(*s, scale) for s in sizes)]
    fold_totals = [sum(p for p, f in zip(patches, fold_of, strict=True) if f == k) for k in range(folds)]

    def streaming(total_patches: int, rows: int, oversample: float, seed: int) -> StreamingCoreset:
        return StreamingCoreset(
            dim=info.embedding_dim,
            total_patches=total_patches,
            final_rows=rows,
            oversample=oversample,
            chunk_patches=cc.chunk_patches,
            projection_dim=cc.projection_dim,
            seed=seed,
        )

    main = streaming(total, final_rows, cc.oversample, cc.seed)
    # Cross-fitting: each fold also keeps its share of the oversampled budget on its own, so that
    # a bank without fold k is the union of the other folds' coresets reduced again (composable).
    # The bank itself is chosen from all images in one stream, as without folds.
    fold_cores = [
        streaming(t, math.ceil(cc.oversample * final_rows * t / total), 1.0, cc.seed + 1 + k)
        for k, t in enumerate(fold_totals)
    ]
    for f, k in zip(tqdm(files, desc="embed + coreset", disable=not progress, unit="img"), fold_of, strict=True):
        img = resize_for_model(read_image(f, channels), scale)
        feats = embedder.embed(img[None])[0].reshape(-1, info.embedding_dim)
        main.add(feats)
        if folds:
            fold_cores[k].add(feats)
    bank = main.finish()
    parts = [c.finish() for c in fold_cores]
    position_stats = None
    if folds:
        position_stats = _position_stats(
            files=files,
            fold_of=fold_of,
            parts=parts,
            rows=final_rows,
            cfg=cfg,
            embedder=embedder,
            out=out,
            scale=scale,
            model_hw=model_sizes[0],
            progress=progress,
        )
    index = build_index(bank, cfg.fit.index)
    write_index(index, out / INDEX_FILE)
    manifest = PatchCoreManifest(
        schema_version=SCHEMA_VERSION,
        kind="patchcore",
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
            patches_seen=main.patches_seen,
            rows=int(bank.shape[0]),
        ),
        fitted_on=FittedOn(
            data=str(data),
            images=len(files),
            image_sizes=sorted(set(sizes)),
            fit_seconds=round(time.perf_counter() - t0, 3),
        ),
        position_stats=position_stats,
        selection=selection,
        files={
            name: sha256_file(out / name)
            for name in (MODEL_FILE, INDEX_FILE, MODEL_INFO_FILE, *((POSITION_STATS_FILE,) if position_stats else ()))
        },
    )
    write_manifest(out, manifest)
    return manifest


def _position_stats(
    *,
    files: list[Path],
    fold_of: list[int],
    parts: list[np.ndarray],
    rows: int,
    cfg: Config,
    embedder: OnnxEmbedder,
    out: Path,
    scale: float,
    model_hw: tuple[int, int],
    progress: bool,
) -> PositionStats:
    """Median and MAD of every patch position's score over the training images, each scored by
    the runtime's search against a bank of the same size chosen without its fold (cross-fitting:
    a training image scored against a bank that holds its own patches would score near 0). The
    images are read and embedded again rather than kept from the first pass: all patch features
    of a large training set do not fit in memory (3.9 M x 152 floats for BSData)."""
    cc = cfg.fit.coreset
    folds = len(parts)
    grids: list[np.ndarray] = []
    bar = tqdm(total=len(files), desc="normal score statistics", disable=not progress, unit="img")
    for k in range(folds):
        others = [p for j, p in enumerate(parts) if j != k]
        held_bank = reduce_union(others, rows, projection_dim=cc.projection_dim, seed=cc.seed)
        index = FaissIndex.from_bank(held_bank, threads=cfg.runtime.faiss_threads, knn=cfg.runtime.knn)
        for f, fold in zip(files, fold_of, strict=True):
            if fold != k:
                continue
            feats = embedder.embed(resize_for_model(read_image(f, embedder.input_channels), scale)[None])[0]
            dist, _ = index.search(feats.reshape(-1, feats.shape[2]), 1)
            grids.append(dist[:, 0].reshape(feats.shape[:2]))
            bar.update(1)
    bar.close()
    g = np.stack(grids)
    median, mad = median_mad(g)
    np.savez(out / POSITION_STATS_FILE, median=median.astype(np.float32), mad=mad.astype(np.float32))
    return PositionStats(
        file=POSITION_STATS_FILE,
        grid=(int(g.shape[1]), int(g.shape[2])),
        image_hw=model_hw,
        folds=folds,
        images=len(grids),
        median_of_medians=float(np.median(median)),
    )


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` wrote: the bundle's manifest and a one-line summary of it for the operator."""

    manifest: PatchCoreManifest | EncoderManifest
    summary: str


def fit(
    *,
    backend: Literal["patchcore", "svdd", "msp"],
    data: Path,
    out: Path,
    cfg: Config,
    model_dir: Path | None = None,
    encoder: Path | None = None,
    progress: bool = True,
) -> FitResult:
    """The one entry that fits a bundle of any backend: PatchCore (``model_dir``: an exported
    backbone, default export now) or a learned patch encoder (``encoder``: a file from
    ``stripinspect train``, default train now)."""
    if backend in ("svdd", "msp"):
        from export.svdd_fit import fit_msp, fit_svdd

        sm = (fit_svdd if backend == "svdd" else fit_msp)(
            data=data, out=out, cfg=cfg, encoder=encoder, progress=progress
        )
        t = sm.training
        name = "Patch SVDD" if backend == "svdd" else "multi-scale patch encoders"
        how = "trained" if encoder is None else f"from {encoder}, trained"
        return FitResult(
            manifest=sm,
            summary=(
                f"bundle {out}: {name} {how} {t['steps']} steps in {t['train_seconds']} s "
                f"(SSL accuracy {t['final_ssl_accuracy']}), banks {[s.rows for s in sm.scales]} rows, "
                f"{t['fit_seconds']} s in all; loss curves in {out / 'loss.png'}"
            ),
        )
    if encoder is not None:
        raise FitError("--encoder is for --backend svdd or msp (PatchCore takes --model)")
    m = fit_bundle(data=data, out=out, cfg=cfg, model_dir=model_dir, progress=progress)
    summary = (
        f"bundle {out}: {m.fitted_on.images} images, {m.coreset.patches_seen} patches -> "
        f"{m.index.rows} bank rows ({m.features.embedding_dim} dims) in {m.fitted_on.fit_seconds:.1f} s"
    )
    if m.selection is not None:
        c = m.selection.chosen
        summary = (
            f"{summary}; chosen: scale {c.scale}, position_normalise {c.position_normalise}, "
            f"mad_floor {c.mad_floor}, image_score {c.image_score}\n{selection_table(m.selection)}"
        )
    return FitResult(manifest=m, summary=summary)
