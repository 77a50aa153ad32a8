"""Export a registered backbone's patch-feature network to ONNX and verify it against torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from export.backbones import (
    SPECS,
    BackboneError,
    PatchFeatureNet,
    build_feature_extractor,
)
from pipeline.config import BackboneConfig
from pipeline.errors import StripinspectError
from pipeline.inference.bundle import MODEL_FILE, sha256_file
from pipeline.inference.embed import INPUT_NAME, OUTPUT_NAME, OnnxEmbedder

OPSET = 17
MAX_RELATIVE_ERROR = 1e-4
MODEL_INFO_FILE = "model.json"


class ExportError(StripinspectError):
    """Export failed or the exported graph disagrees with torch."""


@dataclass(frozen=True)
class ModelInfo:
    """Describes model.onnx; copied into the bundle manifest."""

    backbone: str
    layers: tuple[str, str]
    layer_channels: tuple[int, int]
    feature_stride: int
    aggregation_size: int
    border_pad: int
    projection_dim: int | None
    embedding_dim: int
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]
    weights: str
    weights_sha256: str | None
    opset: int
    verified_relative_error: float

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> ModelInfo:
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in ("layers", "layer_channels", "input_mean", "input_std"):
            data[key] = tuple(data[key])
        return cls(**data)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    scale = max(float(np.abs(want).max()), 1e-12)
    return float(np.abs(got - want).max()) / scale


def export_backbone(cfg: BackboneConfig, out_dir: Path, *, threads: int = 2) -> ModelInfo:
    """Write ``model.onnx`` and ``model.json`` into ``out_dir``; raise ExportError on mismatch."""
    spec = SPECS.get(cfg.name)
    if spec is None:
        raise BackboneError(f"unknown backbone {cfg.name!r}")
    extractor = build_feature_extractor(cfg.name, weights=cfg.weights, random_weights=cfg.random_weights)
    net = PatchFeatureNet(
        spec=spec,
        extractor=extractor,
        aggregation_size=cfg.aggregation_size,
        projection_dim=cfg.projection_dim,
        border_pad=cfg.border_pad,
    ).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / MODEL_FILE
    example = torch.zeros((1, 64, 96, 3), dtype=torch.uint8)
    with torch.no_grad():
        # The TorchScript-based exporter handles the data-dependent Resize and Expand shapes of
        # this graph with plain dynamic_axes; the dynamo exporter needs onnxscript.
        torch.onnx.export(
            net,
            (example,),
            str(onnx_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAME: {0: "batch", 1: "height", 2: "width", 3: "channels"},
                OUTPUT_NAME: {0: "batch", 1: "grid_height", 2: "grid_width"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    # Verify on two different sizes (and both channel counts) that onnxruntime computes what
    # torch computes; a silent mismatch here would change every score after export.
    embedder = OnnxEmbedder(
        model_path=onnx_path,
        embedding_dim=net.embedding_dim,
        input_channels=None,
        threads=threads,
        warmup_hw=None,
    )
    rng = np.random.default_rng(1234)
    worst = 0.0
    for shape in ((1, 160, 224, 3), (2, 136, 200, 1)):
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        with torch.no_grad():
            want = net(torch.from_numpy(pixels)).numpy()
        got = embedder.embed(pixels)
        err = _relative_error(got, want)
        worst = max(worst, err)
        if not err <= MAX_RELATIVE_ERROR:
            onnx_path.unlink(missing_ok=True)
            raise ExportError(
                f"onnxruntime differs from torch on input {shape}: relative error {err:.2e} "
                f"> {MAX_RELATIVE_ERROR:.0e}; model.onnx removed"
            )
    if cfg.random_weights:
        weights, weights_sha = "random (test only)", None
    elif cfg.weights is not None:
        weights, weights_sha = str(cfg.weights), sha256_file(cfg.weights)
    else:
        weights, weights_sha = spec.weights_source, None
    info = ModelInfo(
        backbone=spec.name,
        layers=spec.layers,
        layer_channels=spec.channels,
        feature_stride=spec.strides[0],
        aggregation_size=cfg.aggregation_size,
        border_pad=cfg.border_pad,
        projection_dim=cfg.projection_dim,
        embedding_dim=net.embedding_dim,
        input_mean=spec.mean,
        input_std=spec.std,
        weights=weights,
        weights_sha256=weights_sha,
        opset=OPSET,
        verified_relative_error=worst,
    )
    info.write(out_dir / MODEL_INFO_FILE)
    return info
