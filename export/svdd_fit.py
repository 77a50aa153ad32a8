"""`stripinspect fit --backend svdd | msp`: train a patch encoder on normal images (Patch SVDD, or
the multi-scale method of Tsai et al.) and write its bundle: the dense ONNX encoder and one
coreset memory bank per scale, embedded through the runtime's own session code."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
from torch import nn
from tqdm import tqdm

from export.coreset import StreamingCoreset
from export.msp import INFERENCE as MSP_SCALES
from export.msp import DenseMsp, MspTrainConfig, train_msp
from export.svdd import (
    DenseSvdd,
    SvddError,
    SvddHistory,
    SvddTrainConfig,
    export_dense_encoder,
    plot_history,
    train_svdd,
)
from pipeline.bundle import MANIFEST_FILE, sha256_file
from pipeline.config import Config
from pipeline.images import ImageReadError, list_images, read_image
from pipeline.knn import build_index, write_index
from pipeline.svdd import MSP_KIND, SVDD_KIND, ScaleSpec, SvddManifest, dense_codes

# (patch side, inference stride, ONNX output, index file) per scale, largest first.
SVDD_SCALES = ((64, 16, "codes64", "index.faiss"), (32, 4, "codes32", "index32.faiss"))
# Image score of the multi-scale method: the maximum over 8 x 8 windows of the map's mean.
MSP_WINDOW = 8


def _read_images(data: Path) -> list[np.ndarray]:
    files = list_images(data)
    if not files:
        raise SvddError(f"{data}: no images (.png, .jpg, .bmp, .tif)")
    try:
        images = [read_image(f) for f in files]
    except ImageReadError as err:
        raise SvddError(str(err)) from None
    if any(im.shape[2] != images[0].shape[2] for im in images):
        raise SvddError(f"{data}: images with different channel counts")
    return images


def fit_svdd(*, data: Path, out: Path, cfg: Config, progress: bool = True) -> SvddManifest:
    """Patch SVDD (Yi & Yoon 2020): 64 and 32 px scales, maps multiplied, image score = map max."""
    t0 = time.perf_counter()
    images = _read_images(data)
    s = cfg.svdd
    # Every key of the config section but the bank size is a training setting of the same name.
    enc, hist = train_svdd(images, SvddTrainConfig(**s.model_dump(exclude={"bank_rows"})), progress=progress)
    return _write_bundle(
        images=images,
        net=DenseSvdd(enc, images[0].shape[2]),
        hist=hist,
        kind=SVDD_KIND,
        scales=SVDD_SCALES,
        combine="product",
        image_score="max",
        window=1,
        dim=s.dim,
        bank_rows=s.bank_rows,
        training=s.model_dump(exclude={"bank_rows"}),
        data=data,
        out=out,
        cfg=cfg,
        t0=t0,
        progress=progress,
    )


def fit_msp(*, data: Path, out: Path, cfg: Config, progress: bool = True) -> SvddManifest:
    """Multi-scale patch encoders (Tsai et al. 2022): 64, 32 and 16 px, maps summed, image score =
    max of 8 x 8-window means."""
    t0 = time.perf_counter()
    images = _read_images(data)
    m = cfg.msp
    enc, hist = train_msp(images, MspTrainConfig(**m.model_dump(exclude={"bank_rows"})), progress=progress)
    return _write_bundle(
        images=images,
        net=DenseMsp(enc),
        hist=hist,
        kind=MSP_KIND,
        scales=MSP_SCALES,
        combine="sum",
        image_score="window_mean",
        window=MSP_WINDOW,
        dim=m.dim,
        bank_rows=m.bank_rows,
        training=m.model_dump(exclude={"bank_rows"}),
        data=data,
        out=out,
        cfg=cfg,
        t0=t0,
        progress=progress,
    )


def _write_bundle(
    *,
    images: list[np.ndarray],
    net: nn.Module,
    hist: SvddHistory,
    kind: Literal["patch_svdd", "multiscale_patch"],
    scales: tuple[tuple[int, int, str, str], ...],
    combine: str,
    image_score: str,
    window: int,
    dim: int,
    bank_rows: int,
    training: dict[str, float | int | str | bool],
    data: Path,
    out: Path,
    cfg: Config,
    t0: float,
    progress: bool,
) -> SvddManifest:
    if not math.isfinite(hist.loss[-1]):
        raise SvddError("training diverged (loss is not finite)")
    channels = images[0].shape[2]
    out.mkdir(parents=True, exist_ok=True)
    plot_history(hist, out / "loss.png")
    curves = {"loss": hist.loss, "svdd": hist.svdd, "ssl": hist.ssl, "ssl_accuracy": hist.ssl_accuracy}
    if hist.cos:
        curves |= {"cos": hist.cos, "kmeans": hist.kmeans}
    (out / "training.json").write_text(json.dumps(curves))
    verified = export_dense_encoder(net.cpu(), channels, out / "model.onnx", outputs=tuple(o for *_, o, _ in scales))
    # The banks are embedded through the runtime's own code (pipeline.svdd.dense_codes): what
    # was fitted is what runs.
    counts = [
        [((im.shape[0] - p) // st + 1) * ((im.shape[1] - p) // st + 1) for p, st, _, _ in scales] for im in images
    ]
    totals = np.sum(counts, axis=0)
    cores = [
        StreamingCoreset(
            dim=dim,
            total_patches=int(t),
            final_rows=min(bank_rows, int(t)),
            oversample=cfg.fit.coreset.oversample,
            chunk_patches=cfg.fit.coreset.chunk_patches,
            projection_dim=min(cfg.fit.coreset.projection_dim, dim),
            seed=cfg.fit.coreset.seed,
        )
        for t in totals
    ]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.runtime.onnx_threads
    sess = ort.InferenceSession(str(out / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])
    outputs = [o for _, _, o, _ in scales]
    for im in tqdm(images, desc="embed + coreset", disable=not progress, unit="img"):
        for core, codes in zip(cores, dense_codes(sess, outputs, im), strict=True):
            core.add(codes.reshape(-1, dim))
    specs = []
    for core, (p, st, o, f) in zip(cores, scales, strict=True):
        bank = core.finish()
        write_index(build_index(bank, "flat"), out / f)
        specs.append(ScaleSpec(patch=p, stride=st, output=o, index_file=f, rows=int(bank.shape[0])))
    manifest = SvddManifest(
        schema_version=1,
        kind=kind,
        created_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        channels=channels,
        dim=dim,
        scales=tuple(specs),
        combine=combine,  # type: ignore[arg-type]
        image_score=image_score,  # type: ignore[arg-type]
        window=window,
        training={
            "images": len(images),
            "iterations": len(hist.loss),
            "stopped_early": hist.stopped_early,
            "train_seconds": round(hist.seconds, 1),
            "fit_seconds": round(time.perf_counter() - t0, 1),
            "final_ssl_accuracy": round(float(np.mean(hist.ssl_accuracy[-100:])), 4),
            "verified_relative_error": verified,
            "fitted_on": str(data),
            **training,
        },
        files={n: sha256_file(out / n) for n in ("model.onnx", *(f for *_, f in scales))},
    )
    (out / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return manifest
