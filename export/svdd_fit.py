"""`stripinspect fit --backend svdd`: train Patch SVDD on normal images and write its bundle."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.coreset import StreamingCoreset
from export.svdd import SvddError, SvddTrainConfig, export_svdd, plot_history, train_svdd
from pipeline.bundle import MANIFEST_FILE, sha256_file
from pipeline.config import Config
from pipeline.images import ImageReadError, list_images, read_image
from pipeline.knn import build_index, write_index
from pipeline.svdd import SVDD_KIND, ScaleSpec, SvddManifest, dense_codes

SCALES = ((64, 16, "codes64", "index.faiss"), (32, 4, "codes32", "index32.faiss"))


def fit_svdd(*, data: Path, out: Path, cfg: Config, progress: bool = True) -> SvddManifest:
    t0 = time.perf_counter()
    files = list_images(data)
    if not files:
        raise SvddError(f"{data}: no images (.png, .jpg, .bmp, .tif)")
    try:
        images = [read_image(f) for f in files]
    except ImageReadError as err:
        raise SvddError(str(err)) from None
    channels = images[0].shape[2]
    if any(im.shape[2] != channels for im in images):
        raise SvddError(f"{data}: images with different channel counts")
    s = cfg.svdd
    train_cfg = SvddTrainConfig(
        dim=s.dim, lam=s.lam, iterations=s.iterations, batch=s.batch, lr=s.lr, patience=s.patience, seed=s.seed
    )
    enc, hist = train_svdd(images, train_cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    plot_history(hist, out / "loss.png")
    (out / "training.json").write_text(
        json.dumps({"loss": hist.loss, "svdd": hist.svdd, "ssl": hist.ssl, "ssl_accuracy": hist.ssl_accuracy})
    )
    verified = export_svdd(enc, channels, out / "model.onnx")
    # The bank is embedded through the runtime's own code (pipeline.svdd.dense_codes): what
    # was fitted is what runs.
    counts = []
    for im in images:
        h, w = im.shape[:2]
        counts.append([((h - p) // st + 1) * ((w - p) // st + 1) for p, st, _, _ in SCALES])
    totals = np.sum(counts, axis=0)
    cores = [
        StreamingCoreset(
            dim=s.dim,
            total_patches=int(t),
            final_rows=min(s.bank_rows, int(t)),
            oversample=cfg.fit.coreset.oversample,
            chunk_patches=cfg.fit.coreset.chunk_patches,
            projection_dim=min(cfg.fit.coreset.projection_dim, s.dim),
            seed=cfg.fit.coreset.seed,
        )
        for t in totals
    ]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = [o for _, _, o, _ in SCALES]
    for im in tqdm(images, desc="embed + coreset", disable=not progress, unit="img"):
        for core, codes in zip(cores, dense_codes(sess, outputs, im), strict=True):
            core.add(codes.reshape(-1, s.dim))
    scales = []
    for core, (p, st, o, f) in zip(cores, SCALES, strict=True):
        bank = core.finish()
        write_index(build_index(bank, "flat"), out / f)
        scales.append(ScaleSpec(patch=p, stride=st, output=o, index_file=f, rows=int(bank.shape[0])))
    manifest = SvddManifest(
        schema_version=1,
        kind=SVDD_KIND,
        created_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        channels=channels,
        dim=s.dim,
        scales=tuple(scales),
        combine="product",
        training={
            "images": len(images),
            "iterations": len(hist.loss),
            "stopped_early": hist.stopped_early,
            "train_seconds": round(hist.seconds, 1),
            "fit_seconds": round(time.perf_counter() - t0, 1),
            "final_ssl_accuracy": round(float(np.mean(hist.ssl_accuracy[-100:])), 4),
            "lam": s.lam,
            "verified_relative_error": verified,
            "fitted_on": str(data),
        },
        files={n: sha256_file(out / n) for n in ("model.onnx", *(f for *_, f in SCALES))},
    )
    (out / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    if not math.isfinite(hist.loss[-1]):
        raise SvddError("training diverged (loss is not finite)")
    return manifest
