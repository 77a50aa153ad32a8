from pathlib import Path

import numpy as np
import pytest
import torch

import export.onnx_export as onnx_export
from export.backbones import SPECS, BackboneError, build_feature_extractor
from export.onnx_export import ExportError, ModelInfo, export_backbone
from pipeline.config import BackboneConfig
from pipeline.inference.embed import OnnxEmbedder


def test_effnet_export_has_imagenet_weights_and_paper_layers(effnet_model_dir: Path) -> None:
    info = ModelInfo.read(effnet_model_dir / "model.json")
    assert info.backbone == "efficientnet_lite0"
    assert info.layers == ("_blocks.4", "_blocks.10") and info.layer_channels == (40, 112)
    assert info.embedding_dim == 152 and info.feature_stride == 8
    assert info.verified_relative_error <= 1e-4
    assert "ImageNet" in info.weights
    # Pretrained and random weights must give different features: the package weights loaded.
    x = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8).float().permute(0, 3, 1, 2)
    with torch.no_grad():
        a = build_feature_extractor("efficientnet_lite0", weights=None, random_weights=False)(x)[0]
        b = build_feature_extractor("efficientnet_lite0", weights=None, random_weights=True)(x)[0]
    assert not torch.allclose(a, b)


def _torchvision_style_state(name: str) -> dict[str, torch.Tensor]:
    """A state_dict with torchvision's keys, including the layer4 and fc the extractor drops."""
    net = build_feature_extractor(name, weights=None, random_weights=True)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["layer4.0.conv1.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(1000, 512)
    return state


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_resnet_from_user_weights_file(name: str, tmp_path: Path) -> None:
    weights = tmp_path / f"{name}.pth"
    torch.save(_torchvision_style_state(name), weights)
    info = export_backbone(BackboneConfig(name=name, weights=weights), tmp_path / "m")
    assert info.layers == ("layer2", "layer3")
    assert info.embedding_dim == sum(SPECS[name].channels)
    assert info.weights_sha256 is not None and len(info.weights_sha256) == 64
    e = OnnxEmbedder(
        model_path=tmp_path / "m" / "model.onnx", embedding_dim=info.embedding_dim, input_channels=3, threads=1
    )
    assert e.embed(np.zeros((1, 96, 128, 3), np.uint8)).shape == (1, 12, 16, info.embedding_dim)


def test_resnet_needs_weights_or_explicit_random_flag(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="needs a weights file"):
        export_backbone(BackboneConfig(name="resnet18"), tmp_path)
    with pytest.raises(BackboneError, match="not found"):
        export_backbone(BackboneConfig(name="resnet18", weights=tmp_path / "none.pth"), tmp_path)


def test_weights_with_wrong_shapes_or_keys_are_refused(tmp_path: Path) -> None:
    state = _torchvision_style_state("resnet18")
    state["layer3.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(BackboneError, match=r"shape of 'layer3.0.conv1.weight'"):
        export_backbone(BackboneConfig(name="resnet18", weights=bad), tmp_path)
    del state["layer3.0.conv1.weight"]
    torch.save(state, bad)
    with pytest.raises(BackboneError, match="keys missing"):
        export_backbone(BackboneConfig(name="resnet18", weights=bad), tmp_path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(BackboneError, match="cannot read weights"):
        export_backbone(BackboneConfig(name="resnet18", weights=junk), tmp_path)


def test_projection_sets_embedding_dim(tmp_path: Path) -> None:
    info = export_backbone(BackboneConfig(name="resnet18", random_weights=True, projection_dim=48), tmp_path)
    assert info.embedding_dim == 48 and info.projection_dim == 48
    assert "random" in info.weights


def test_export_check_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch-vs-onnxruntime check is real: with a zero tolerance the tiny float differences
    # between the two runtimes must make the export fail and remove the model.
    monkeypatch.setattr(onnx_export, "MAX_RELATIVE_ERROR", 0.0)
    with pytest.raises(ExportError, match="relative error"):
        export_backbone(BackboneConfig(name="resnet18", random_weights=True), tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_graph_scales_pixels_inside(effnet_model_dir: Path) -> None:
    # Raw uint8 in: a caller cannot forget the (x - 127) / 128 scaling; constant images of
    # different brightness give different features.
    e = OnnxEmbedder(model_path=effnet_model_dir / "model.onnx", embedding_dim=152, input_channels=3, threads=1)
    dark = e.embed(np.full((1, 64, 64, 3), 10, np.uint8))
    bright = e.embed(np.full((1, 64, 64, 3), 240, np.uint8))
    assert np.abs(dark - bright).max() > 0.1


def test_border_pad_changes_only_the_border(tmp_path: Path) -> None:
    # Mirrored context replaces zero padding at the image border; far inside, features are equal.
    x = np.random.default_rng(3).integers(0, 256, (1, 448, 448, 3), dtype=np.uint8)
    feats = {}
    for pad in (0, 32):
        info = export_backbone(BackboneConfig(border_pad=pad), tmp_path / str(pad))
        assert info.border_pad == pad
        e = OnnxEmbedder(model_path=tmp_path / str(pad) / "model.onnx", embedding_dim=152, input_channels=3, threads=1)
        feats[pad] = e.embed(x)[0]
    assert feats[0].shape == feats[32].shape == (56, 56, 152)
    scale = np.abs(feats[0]).max()
    assert np.abs(feats[0][0] - feats[32][0]).max() / scale > 1e-2  # top row differs
    inner = slice(26, 30)  # 208+ px from every border: beyond the receptive radius
    np.testing.assert_allclose(feats[0][inner, inner], feats[32][inner, inner], atol=1e-3 * scale)
