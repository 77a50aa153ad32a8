"""`stripinspect fit --backend svdd | msp`: train a patch encoder on normal images (Patch SVDD, or
the multi-scale method of Tsai et al.), or take one trained before (``--encoder FILE.pt`` from
`stripinspect train`), and write its bundle: the dense ONNX encoder and one coreset memory bank
per scale, embedded through the runtime's own session code. Images are resized by the encoder's
``scale`` (the config's when it trains here; the file's own with ``--encoder``: codes are only
meaningful at the scale the encoder learned), and the bundle records it for scoring."""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from export.coreset import StreamingCoreset
from export.msp import INFERENCE as MSP_SCALES
from export.svdd import SvddError, export_dense_encoder
from export.trained import (
    Backend,
    TrainedEncoder,
    load_encoder,
    read_training_images,
    scale_images,
    train_encoder,
    write_curves,
)
from pipeline.config import Config
from pipeline.inference.bundle import (
    MODEL_FILE,
    SCHEMA_VERSION,
    EncoderManifest,
    FittedOn,
    InputSpec,
    ScaleSpec,
    sha256_file,
    write_manifest,
)
from pipeline.inference.knn import build_index, write_index
from pipeline.inference.svdd import MSP_KIND, SVDD_KIND, dense_codes

# (patch side, inference stride, ONNX output, index file) per scale, largest first.
SVDD_SCALES = ((64, 16, "codes64", "index.faiss"), (32, 4, "codes32", "index32.faiss"))
# Image score of the multi-scale method: the maximum over 8 x 8 windows of the map's mean.
MSP_WINDOW = 8


def fit_svdd(
    *, data: Path, out: Path, cfg: Config, encoder: Path | None = None, progress: bool = True
) -> EncoderManifest:
    """Patch SVDD (Yi & Yoon 2020): 64 and 32 px scales, maps multiplied, image score = map max."""
    return _fit("svdd", data=data, out=out, cfg=cfg, encoder=encoder, progress=progress)


def fit_msp(
    *, data: Path, out: Path, cfg: Config, encoder: Path | None = None, progress: bool = True
) -> EncoderManifest:
    """Multi-scale patch encoders (Tsai et al. 2022): 64, 32 and 16 px, maps summed, image score =
    max of 8 x 8-window means."""
    return _fit("msp", data=data, out=out, cfg=cfg, encoder=encoder, progress=progress)


def _fit(
    backend: Backend, *, data: Path, out: Path, cfg: Config, encoder: Path | None, progress: bool
) -> EncoderManifest:
    t0 = time.perf_counter()
    images = read_training_images(data)
    bank_rows = (cfg.svdd if backend == "svdd" else cfg.msp).bank_rows
    if encoder is None:
        te = train_encoder(backend, images, data, cfg, progress=progress)
        source: dict[str, str | int] = {}
    else:
        te = load_encoder(encoder, backend)
        if te.channels != images[0].shape[2]:
            raise SvddError(f"{encoder}: encoder of {te.channels}-channel images, {data} holds {images[0].shape[2]}")
        source = {"encoder_file": str(encoder), "encoder_sha256": sha256_file(encoder), "trained_images": te.images}
    return _write_bundle(
        te, images=images, bank_rows=bank_rows, source=source, data=data, out=out, cfg=cfg, t0=t0, progress=progress
    )


def _write_bundle(
    te: TrainedEncoder,
    *,
    images: list[np.ndarray],
    bank_rows: int,
    source: dict[str, str | int],
    data: Path,
    out: Path,
    cfg: Config,
    t0: float,
    progress: bool,
) -> EncoderManifest:
    hist, dim = te.hist, te.dim
    kind: Literal["patch_svdd", "multiscale_patch"]
    scales: tuple[tuple[int, int, str, str], ...]
    if te.backend == "svdd":
        kind, scales, combine, image_score, window = SVDD_KIND, SVDD_SCALES, "product", "max", 1
    else:
        kind, scales, combine, image_score, window = MSP_KIND, MSP_SCALES, "sum", "window_mean", MSP_WINDOW
    if not math.isfinite(hist.loss[-1]):
        raise SvddError("training diverged (loss is not finite)")
    channels = images[0].shape[2]  # = te.channels (checked)
    originals, images = images, scale_images(images, te.scale)  # the banks at the scale it was trained at
    write_curves(hist, out)
    verified = export_dense_encoder(te.dense(), channels, out / "model.onnx", outputs=tuple(o for *_, o, _ in scales))
    # The banks are embedded through the runtime's own code (pipeline.inference.svdd.dense_codes): what
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
    fit_seconds = round(time.perf_counter() - t0, 1)
    manifest = EncoderManifest(
        schema_version=SCHEMA_VERSION,
        kind=kind,
        created_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # The dense encoder maps pixels to [-1, 1] inside the graph (export.svdd.DenseSvdd).
        input=InputSpec(channels=channels, mean=(127.5,) * 3, std=(127.5,) * 3, scale=te.scale),
        fitted_on=FittedOn(
            data=str(data),
            images=len(images),
            image_sizes=sorted({(int(im.shape[0]), int(im.shape[1])) for im in originals}),
            fit_seconds=fit_seconds,
        ),
        dim=dim,
        scales=tuple(specs),
        combine=combine,  # type: ignore[arg-type]
        image_score=image_score,  # type: ignore[arg-type]
        window=window,
        training={
            "images": len(images),
            "steps": len(hist.loss),  # steps done; "iterations" (below) is the setting, an upper bound
            "stopped_early": hist.stopped_early,
            "stop_reason": hist.stop_reason,
            "train_seconds": round(hist.seconds, 1),
            "fit_seconds": fit_seconds,
            "final_ssl_accuracy": round(te.final_ssl_accuracy, 4),
            "verified_relative_error": verified,
            **source,
            **te.training,
        },
        files={n: sha256_file(out / n) for n in (MODEL_FILE, *(f for *_, f in scales))},
    )
    write_manifest(out, manifest)
    return manifest
