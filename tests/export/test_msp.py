"""Multi-scale patch encoders (Tsai et al. 2022): dense codes equal per-patch codes at 64, 32 and
16 px, dense training reads the same codes, the losses do what they claim, ONNX = torch."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.msp import (
    ANGLES,
    SCALES,
    CropSampler,
    DenseMsp,
    MspEncoder,
    _offsets_cells,
    train_msp,
)
from export.svdd import SvddError, export_dense_encoder
from pipeline.config import MspConfig
from tests.export.test_svdd import _recording, _structured_images


def _encoder(channels: int = 1, dim: int = 16) -> MspEncoder:
    torch.manual_seed(0)
    return MspEncoder(channels, dim).eval()


def test_dense_codes_of_every_scale_equal_per_patch_codes() -> None:
    enc = _encoder()
    img = torch.rand(1, 1, 140, 108) * 2 - 1
    with torch.no_grad():
        dense = enc(img)
        for k in SCALES:
            c = dense[k]
            assert c.shape[2:] == ((140 - k) // 4 + 1, (108 - k) // 4 + 1)
            for i, j in [(0, 0), (3, 5), (c.shape[2] - 1, c.shape[3] - 1), (7, 2)]:
                y, x = 4 * i, 4 * j
                one = enc.encode_patches(img[:, :, y : y + k, x : x + k])[0]
                np.testing.assert_allclose(c[0, :, i, j].numpy(), one.numpy(), atol=1e-5)


def test_sampled_offsets_follow_the_paper() -> None:
    rng = np.random.default_rng(0)
    for k in SCALES:
        cells = k / 4
        off, labels = _offsets_cells("direction", k, 2000, rng)
        assert labels is not None and set(labels.tolist()) == set(range(ANGLES))
        # The 12 directions are 30 degrees apart: the mean offset of each class points its way.
        for c in range(ANGLES):
            mean = off[labels == c].mean(axis=0)
            angle = np.degrees(np.arctan2(mean[0], mean[1])) % 360
            assert min(abs(angle - 30 * c), 360 - abs(angle - 30 * c)) < 12
            assert np.linalg.norm(mean) == pytest.approx(cells, rel=0.3)
        near, _ = _offsets_cells("near", k, 500, rng)
        far, _ = _offsets_cells("far", k, 500, rng)
        assert (np.abs(near) <= max(1, round(k / 32))).all() and (np.abs(near).sum(axis=1) > 0).all()
        assert (np.linalg.norm(far, axis=1) >= cells - 1).all()


def test_short_training_learns_directions_and_every_loss_falls(tmp_path: Path) -> None:
    images = _structured_images(6, seed=1)
    cfg = MspConfig(dim=32, iterations=120, crops=2, crop=224, samples=48, lr=2e-3, patience=100, seed=0)
    _, hist = train_msp(images, cfg, progress=False)
    acc_start, acc_end = np.mean(hist.ssl_accuracy[:20]), np.mean(hist.ssl_accuracy[-20:])
    print(
        f"SSL accuracy {acc_start:.2f} -> {acc_end:.2f} (chance {1 / ANGLES:.2f}); "
        f"SVDD' {np.mean(hist.svdd[:20]):.3f} -> {np.mean(hist.svdd[-20:]):.3f}; "
        f"cosine {np.mean(hist.cos[:20]):.3f} -> {np.mean(hist.cos[-20:]):.3f}; "
        f"k-means {np.mean(hist.kmeans[1:20]):.3f} -> {np.mean(hist.kmeans[-20:]):.3f}"
    )
    assert acc_end > 0.3 and acc_end > acc_start + 0.15  # chance is 1/12 = 0.083
    assert np.mean(hist.loss[-20:]) < np.mean(hist.loss[:20])
    assert np.mean(hist.cos[-20:]) < np.mean(hist.cos[:20])
    assert len(hist.kmeans) == len(hist.loss) and all(np.isfinite(hist.kmeans))


def test_training_is_reproducible() -> None:
    images = _structured_images(3, seed=2)
    cfg = MspConfig(dim=8, iterations=4, crops=1, samples=8, clusters=4, kmeans_every=2, seed=3)
    a, ha = train_msp(images, cfg, progress=False)
    b, hb = train_msp(images, cfg, progress=False)
    assert ha.loss == hb.loss and ha.kmeans == hb.kmeans
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_export_matches_torch_at_the_inference_strides(tmp_path: Path) -> None:
    enc = _encoder(channels=3, dim=16)
    worst = export_dense_encoder(DenseMsp(enc), 3, tmp_path / "msp.onnx", outputs=("codes64", "codes32", "codes16"))
    assert worst <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "msp.onnx"), providers=["CPUExecutionProvider"])
    c64, c32, c16 = sess.run(None, {"pixels": np.zeros((1, 192, 256, 3), np.uint8)})
    assert c64.shape == (1, (192 - 64) // 16 + 1, (256 - 64) // 16 + 1, 16)
    assert c32.shape == (1, (192 - 32) // 8 + 1, (256 - 32) // 8 + 1, 16)
    assert c16.shape == (1, (192 - 16) // 4 + 1, (256 - 16) // 4 + 1, 16)


def test_bad_training_input_is_one_clear_error() -> None:
    with pytest.raises(SvddError, match="at least 224 px"):
        CropSampler([np.zeros((100, 300, 1), np.uint8)], crop=224, seed=0)
    with pytest.raises(SvddError, match="no training images"):
        CropSampler([], crop=224, seed=0)
    if not torch.cuda.is_available():
        images = _structured_images(1, seed=0)
        with pytest.raises(SvddError, match="sees no CUDA GPU"):
            train_msp(images, MspConfig(iterations=1, device="cuda"), progress=False)


def test_trainer_reads_every_setting_of_its_config_section(monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer takes the `msp:` section itself; every key but the bank size and the image scale
    # (both the fit's: images arrive resized, export/trained.py) is read.
    read: set[str] = set()
    cfg = _recording(MspConfig, read, dim=8, iterations=3, crops=1, samples=8, clusters=4, kmeans_every=2, lr=3e-3)
    lrs: list[float] = []
    adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: lrs.append(lr) or adam(params, lr=lr))
    enc, hist = train_msp(_structured_images(1, seed=0), cfg, progress=False)
    assert read == set(MspConfig.model_fields) - {"bank_rows", "scale"}
    assert lrs == [3e-3] and len(hist.loss) == len(hist.kmeans) == 3 and enc.enc16.net[-2].out_channels == 8
