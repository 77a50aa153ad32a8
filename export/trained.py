"""A trained patch encoder as a file of its own: train where the GPU is, fit banks beside the line.

``stripinspect train --backend svdd|msp --data DIR --out FILE.pt`` trains on the config's
``svdd:`` or ``msp:`` settings and writes one torch file: the encoder's weights, the settings it
was trained with, the training images' count and folder, and the loss curves (``loss.png`` and
``training.json`` beside it too). ``stripinspect fit --backend ... --encoder FILE.pt`` then
embeds and fits the banks from it without training. The file holds tensors, numbers, strings
and lists only and is read back with ``weights_only=True``.

This module needs torch, OpenCV and the config schema, not faiss or onnxruntime, so training
runs on a bare GPU machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from export.msp import DenseMsp, MspEncoder, train_msp
from export.svdd import (
    DenseSvdd,
    Encoder32,
    Encoder64,
    SvddError,
    SvddHistory,
    plot_history,
    train_svdd,
)
from pipeline.acquisition.images import ImageReadError, read_image, survey_training_folder
from pipeline.config import Config
from pipeline.inference.resize import resize_to, scaled_hw

Backend = Literal["svdd", "msp"]
FILE_FORMAT = 1


@dataclass
class TrainedEncoder:
    backend: Backend
    encoder: nn.Module  # Encoder64 (svdd) or MspEncoder (msp), on the CPU, in eval mode
    channels: int
    dim: int
    hist: SvddHistory
    training: dict[str, Any]  # the settings it was trained with (the config section, less bank_rows)
    images: int
    data: str
    scale: float = 1.0  # the resize factor its images were trained at; banks and scoring use the same

    @property
    def final_ssl_accuracy(self) -> float:
        """Mean SSL accuracy of the last 100 steps: how well the encoder tells patch positions apart."""
        return float(np.mean(self.hist.ssl_accuracy[-100:]))

    def dense(self) -> nn.Module:
        """The dense form that is exported to ONNX: uint8 NHWC pixels -> code maps."""
        if self.backend == "svdd":
            assert isinstance(self.encoder, Encoder64)
            return DenseSvdd(self.encoder, self.channels)
        assert isinstance(self.encoder, MspEncoder)
        return DenseMsp(self.encoder)


def read_training_images(data: Path) -> list[np.ndarray]:
    """Every image of ``data`` with the folder's one channel count (``survey_training_folder``)."""
    try:
        survey = survey_training_folder(data)
        return [read_image(f, survey.channels) for f in survey.files]
    except ImageReadError as err:
        raise SvddError(str(err)) from None


def train_encoder(
    backend: Backend, images: list[np.ndarray], data: Path, cfg: Config, *, progress: bool = True
) -> TrainedEncoder:
    """Train ``backend`` on ``images`` (read from ``data``, resized by the section's ``scale``)
    with the config's settings."""
    section = cfg.svdd if backend == "svdd" else cfg.msp
    images = scale_images(images, section.scale)
    enc: nn.Module
    if backend == "svdd":
        enc, hist = train_svdd(images, cfg.svdd, progress=progress)
    else:
        enc, hist = train_msp(images, cfg.msp, progress=progress)
    return TrainedEncoder(
        backend=backend,
        encoder=enc,
        channels=images[0].shape[2],
        dim=section.dim,
        hist=hist,
        # A record of the settings it was trained with (the bank size is the fit's, not training's).
        training=section.model_dump(mode="json", exclude={"bank_rows"}),
        images=len(images),
        data=str(data),
        scale=section.scale,
    )


def scale_images(images: list[np.ndarray], scale: float) -> list[np.ndarray]:
    """Each image resized by ``scale`` (the bundle's resize rule, ``pipeline.inference.resize``);
    the same arrays at 1.0."""
    return [resize_to(im, scaled_hw(im.shape[0], im.shape[1], scale)) for im in images]


def write_curves(hist: SvddHistory, folder: Path, stem: str = "") -> None:
    """``{stem}loss.png`` and ``{stem}training.json`` (the per-step curves) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    plot_history(hist, folder / f"{stem}loss.png")
    curves = {"loss": hist.loss, "svdd": hist.svdd, "ssl": hist.ssl, "ssl_accuracy": hist.ssl_accuracy}
    if hist.cos:
        curves |= {"cos": hist.cos, "kmeans": hist.kmeans}
    (folder / f"{stem}training.json").write_text(json.dumps(curves))


def save_encoder(te: TrainedEncoder, path: Path) -> None:
    """The encoder file (see the module text), and its curves beside it (``<name>.loss.png``,
    ``<name>.training.json``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FILE_FORMAT,
        "backend": te.backend,
        "channels": te.channels,
        "dim": te.dim,
        "state_dict": {k: v.detach().cpu() for k, v in te.encoder.state_dict().items()},
        "training": te.training,
        "history": asdict(te.hist),
        "images": te.images,
        "data": te.data,
    }
    torch.save(payload, path)
    write_curves(te.hist, path.parent, stem=f"{path.stem}.")


def load_encoder(path: Path, backend: Backend) -> TrainedEncoder:
    """Read an encoder file written by ``save_encoder``; SvddError of one line if it is not one,
    is of another backend or does not fit its own architecture."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SvddError(f"{path}: no such encoder file") from None
    except Exception as err:  # torch raises many kinds for a file that is not its own
        raise SvddError(f"{path}: not a stripinspect encoder file ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(raw, dict) or raw.get("format") != FILE_FORMAT:
        raise SvddError(f"{path}: not a stripinspect encoder file of format {FILE_FORMAT}")
    if raw.get("backend") != backend:
        raise SvddError(f"{path}: an encoder of backend {raw.get('backend')!r}, not {backend!r}")
    try:
        channels, dim = int(raw["channels"]), int(raw["dim"])
        enc: nn.Module = Encoder64(Encoder32(channels, dim), dim) if backend == "svdd" else MspEncoder(channels, dim)
        enc.load_state_dict(raw["state_dict"])
        known = {f.name for f in fields(SvddHistory)}
        hist = SvddHistory(**{k: v for k, v in raw["history"].items() if k in known})
        te = TrainedEncoder(
            backend=backend,
            encoder=enc.eval(),
            channels=channels,
            dim=dim,
            hist=hist,
            training=dict(raw["training"]),
            images=int(raw["images"]),
            data=str(raw["data"]),
            # Files written before the setting existed were trained at full resolution.
            scale=float(raw["training"].get("scale", 1.0)),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise SvddError(f"{path}: broken encoder file ({str(err).splitlines()[0][:120]})") from None
    return te


def train_to_file(*, backend: Backend, data: Path, out: Path, cfg: Config, progress: bool = True) -> TrainedEncoder:
    """``stripinspect train``: read the images in ``data``, train ``backend`` on them with the
    config's settings, and write the encoder file ``out`` (and its curves beside it)."""
    images = read_training_images(data)
    te = train_encoder(backend, images, data, cfg, progress=progress)
    save_encoder(te, out)
    return te
