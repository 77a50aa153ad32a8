from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pipeline.inference.embed import EmbedderError, OnnxEmbedder, provider_options


def test_embeds_any_size_at_stride_8(effnet_model_dir: Path) -> None:
    e = OnnxEmbedder(model_path=effnet_model_dir / "model.onnx", embedding_dim=152, input_channels=1, threads=1)
    for h, w in ((64, 64), (100, 260), (128, 333)):
        f = e.embed(np.full((2, h, w, 1), 128, np.uint8))
        assert f.shape[0] == 2 and f.shape[3] == 152
        assert abs(f.shape[1] - h / 8) <= 1 and abs(f.shape[2] - w / 8) <= 1
        assert f.dtype == np.float32 and f.flags.c_contiguous


def test_grey_equals_rgb_of_grey(effnet_model_dir: Path) -> None:
    e = OnnxEmbedder(model_path=effnet_model_dir / "model.onnx", embedding_dim=152, input_channels=None, threads=1)
    grey = np.random.default_rng(0).integers(0, 256, (1, 64, 96, 1), dtype=np.uint8)
    np.testing.assert_allclose(e.embed(grey), e.embed(np.repeat(grey, 3, axis=3)), rtol=1e-5, atol=1e-5)


def test_rejects_bad_input(effnet_model_dir: Path) -> None:
    e = OnnxEmbedder(model_path=effnet_model_dir / "model.onnx", embedding_dim=152, input_channels=1, threads=1)
    with pytest.raises(ValueError, match="uint8"):
        e.embed(np.zeros((1, 64, 64, 1), np.float32))
    with pytest.raises(ValueError, match="channels"):
        e.embed(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        e.embed(np.zeros((0, 64, 64, 1), np.uint8))


def test_manifest_mismatch_and_missing_model(effnet_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="embeds 152 dims, manifest says 100"):
        OnnxEmbedder(model_path=effnet_model_dir / "model.onnx", embedding_dim=100, input_channels=1, threads=1)
    with pytest.raises(EmbedderError, match="not found"):
        OnnxEmbedder(model_path=tmp_path / "none.onnx", embedding_dim=152, input_channels=1, threads=1)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file")
    with pytest.raises(EmbedderError, match="cannot load"):
        OnnxEmbedder(model_path=junk, embedding_dim=152, input_channels=1, threads=1)
    with pytest.raises(EmbedderError, match="none of the providers"):
        OnnxEmbedder(
            model_path=effnet_model_dir / "model.onnx",
            embedding_dim=152,
            input_channels=1,
            threads=1,
            providers=("NoSuchExecutionProvider",),
        )


def test_gpu_providers_are_skipped_where_not_installed(effnet_model_dir: Path) -> None:
    # This machine has no GPU: onnxruntime's CPU build lists neither GPU provider.
    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("a GPU provider is installed")
    e = OnnxEmbedder(
        model_path=effnet_model_dir / "model.onnx",
        embedding_dim=152,
        input_channels=1,
        threads=1,
        providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    )
    assert e.providers == ("CPUExecutionProvider",)
    with pytest.raises(EmbedderError, match="none of the providers"):
        OnnxEmbedder(
            model_path=effnet_model_dir / "model.onnx",
            embedding_dim=152,
            input_channels=1,
            threads=1,
            providers=("CUDAExecutionProvider",),
        )


def test_provider_options_follow_the_providers(tmp_path: Path) -> None:
    opts = provider_options(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        fp16=True,
        trt_cache_dir=tmp_path,
    )
    assert opts[0]["trt_fp16_enable"] == "True" and opts[0]["trt_engine_cache_path"] == str(tmp_path)
    assert opts[1]["cudnn_conv_algo_search"] == "EXHAUSTIVE" and opts[2] == {}
    assert (
        "trt_engine_cache_enable"
        not in provider_options(["TensorrtExecutionProvider"], fp16=False, trt_cache_dir=None)[0]
    )


@pytest.mark.parametrize("settings", [{"optimization": "basic"}, {"arena": False}, {"spinning": True}])
def test_onnxruntime_settings_do_not_change_the_features(effnet_model_dir: Path, settings: dict) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (1, 96, 128, 1), dtype=np.uint8)
    ref = OnnxEmbedder(model_path=effnet_model_dir / "model.onnx", embedding_dim=152, input_channels=1, threads=1)
    other = OnnxEmbedder(
        model_path=effnet_model_dir / "model.onnx", embedding_dim=152, input_channels=1, threads=1, **settings
    )
    np.testing.assert_allclose(other.embed(pixels), ref.embed(pixels), rtol=1e-4, atol=1e-4)
