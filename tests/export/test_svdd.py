"""Patch SVDD: dense codes equal per-patch codes, the losses do what they claim, ONNX = torch."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydantic import BaseModel

from export.svdd import (
    Encoder32,
    Encoder64,
    SvddError,
    export_svdd,
    plot_history,
    train_svdd,
)
from pipeline.config import SvddConfig


def _encoder(channels: int = 1, dim: int = 16) -> Encoder64:
    torch.manual_seed(0)
    return Encoder64(Encoder32(channels, dim), dim).eval()


def test_fully_convolutional_codes_equal_per_patch_codes() -> None:
    enc = _encoder()
    img = torch.rand(1, 1, 136, 104) * 2 - 1
    with torch.no_grad():
        dense32 = enc.enc32(img)
        dense64 = enc(img)
        assert dense32.shape[2:] == ((136 - 32) // 4 + 1, (104 - 32) // 4 + 1)
        assert dense64.shape[2:] == ((136 - 64) // 4 + 1, (104 - 64) // 4 + 1)
        for i, j in [(0, 0), (3, 5), (dense64.shape[2] - 1, dense64.shape[3] - 1), (7, 2)]:
            y, x = 4 * i, 4 * j
            one32 = enc.enc32(img[:, :, y : y + 32, x : x + 32])[0, :, 0, 0]
            np.testing.assert_allclose(dense32[0, :, i, j].numpy(), one32.numpy(), atol=1e-5)
            one64 = enc.encode_patches(img[:, :, y : y + 64, x : x + 64])[0]
            np.testing.assert_allclose(dense64[0, :, i, j].numpy(), one64.numpy(), atol=1e-5)


def _structured_images(n: int, seed: int) -> list[np.ndarray]:
    # Small synthetic data with spatial structure: red ramps across, green ramps down, blue is
    # noise, each image offset at random; where a patch lies relative to another is learnable.
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
        r = (xx * 0.6 + rng.uniform(0, 60)) % 256
        g = (yy * 0.6 + rng.uniform(0, 60)) % 256
        b = rng.uniform(0, 255, (256, 256))
        out.append(np.stack([r, g, b], axis=2).astype(np.uint8))
    return out


def _compactness(enc: Encoder64, images: list[np.ndarray]) -> float:
    """Mean code distance of 64 px patches 8 px apart over that of random pairs (lower: tighter)."""
    rng = np.random.default_rng(5)
    with torch.no_grad():
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        codes = enc(x)  # (N, D, h, w), stride 4
        n, _, h, w = codes.shape
        b, i, j = rng.integers(n, size=256), rng.integers(h, size=256), rng.integers(w - 2, size=256)
        fa, fb = codes[b, :, i, j], codes[b, :, i, j + 2]
        adjacent = (fa - fb).norm(dim=1).mean()
        random = fa - codes[rng.integers(n, size=256), :, rng.integers(h, size=256), rng.integers(w, size=256)]
    return float(adjacent / random.norm(dim=1).mean())


def test_short_training_learns_relative_positions_and_tightens_adjacent_codes(tmp_path: Path) -> None:
    images = _structured_images(6, seed=1)
    cfg = SvddConfig(dim=32, lam=1.0, iterations=150, crops=2, samples=32, lr=2e-3, patience=100, seed=0)
    torch.manual_seed(0)
    before = _compactness(Encoder64(Encoder32(3, 32), 32), images)
    enc, hist = train_svdd(images, cfg, progress=False)
    after = _compactness(enc, images)
    # SSL accuracy on each batch's fresh pairs (drawn anew every iteration); chance is 1/8.
    acc_start, acc_end = np.mean(hist.ssl_accuracy[:30]), np.mean(hist.ssl_accuracy[-30:])
    print(f"SSL accuracy {acc_start:.2f} -> {acc_end:.2f}; adjacent/random code distance {before:.2f} -> {after:.2f}")
    assert acc_end > 0.4 and acc_end > acc_start + 0.25  # chance is 0.125
    assert after < 0.8 * before
    assert np.mean(hist.loss[-30:]) < np.mean(hist.loss[:30])
    plot_history(hist, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_training_is_reproducible() -> None:
    images = _structured_images(3, seed=2)
    cfg = SvddConfig(dim=8, iterations=5, crops=1, samples=4, seed=3)
    a, ha = train_svdd(images, cfg, progress=False)
    b, hb = train_svdd(images, cfg, progress=False)
    assert ha.loss == hb.loss
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_export_matches_torch_and_uses_the_paper_strides(tmp_path: Path) -> None:
    enc = _encoder(channels=1, dim=16)
    worst = export_svdd(enc, 1, tmp_path / "svdd.onnx")
    assert worst <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "svdd.onnx"), providers=["CPUExecutionProvider"])
    c64, c32 = sess.run(None, {"pixels": np.zeros((1, 192, 256, 1), np.uint8)})
    # 64 px patches every 16 px, 32 px patches every 4 px (Patch SVDD's inference strides).
    assert c64.shape == (1, (192 - 64) // 16 + 1, (256 - 64) // 16 + 1, 16)
    assert c32.shape == (1, (192 - 32) // 4 + 1, (256 - 32) // 4 + 1, 16)


def test_too_small_images_are_one_clear_error() -> None:
    with pytest.raises(SvddError, match="at least 224 px"):
        train_svdd([np.zeros((100, 300, 1), np.uint8)], SvddConfig(iterations=1), progress=False)


def test_no_early_stop_while_the_position_classifier_is_at_chance() -> None:
    # Pure noise: nothing to learn about positions, the loss is flat from the start; the run
    # must not stop as if it had converged (it did on BSData before this rule).
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (224, 224, 1), dtype=np.uint8) for _ in range(2)]
    cfg = SvddConfig(dim=8, iterations=200, crops=1, samples=2, lr=1e-4, patience=1, seed=0)
    _, hist = train_svdd(noise, cfg, progress=False)
    assert np.mean(hist.ssl_accuracy) < 0.25
    assert not hist.stopped_early and len(hist.loss) == 200  # the old rule stopped at the 200th


def _recording(section: type[BaseModel], read: set[str], **values: object) -> BaseModel:
    """An instance of the config section ``section`` (a subclass of it) that notes every field read."""

    class Recording(section):
        def __getattribute__(self, name: str) -> object:
            if name in type(self).model_fields:
                read.add(name)
            return super().__getattribute__(name)

    return Recording(**values)


def test_trainer_reads_every_setting_of_its_config_section(monkeypatch: pytest.MonkeyPatch) -> None:
    # One definition of the settings (the config schema): the trainer takes the `svdd:` section
    # itself, and every key of it but the bank size and the image scale (the fit's) changes the training.
    read: set[str] = set()
    cfg = _recording(SvddConfig, read, dim=8, iterations=3, crops=1, samples=4, lr=3e-3, seed=1)
    lrs: list[float] = []
    adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: lrs.append(lr) or adam(params, lr=lr))
    enc, hist = train_svdd(_structured_images(1, seed=0), cfg, progress=False)
    assert read == set(SvddConfig.model_fields) - {"bank_rows", "scale"}
    assert lrs == [3e-3] and len(hist.loss) == 3 and enc.enc32.net[-2].out_channels == 8
