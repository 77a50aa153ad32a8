from pathlib import Path

import cv2
import numpy as np
import pytest

from export.fit import FitError, fit, fit_bundle
from pipeline.config import Config, CoresetConfig, FitConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.bundle import read_manifest
from tests.conftest import FIXED, small_config


def test_fit_ratio_and_budget(synthetic_dataset: Path, effnet_model_dir: Path, tmp_path: Path) -> None:
    base = small_config()
    cfg = Config(
        synthetic=base.synthetic, fit=FitConfig(coreset=CoresetConfig(ratio=0.05, max_rows=100), choose=FIXED.choose)
    )
    m = fit_bundle(
        data=synthetic_dataset / "train/good", out=tmp_path / "b", cfg=cfg, model_dir=effnet_model_dir, progress=False
    )
    assert m.index.rows == 100 and m.coreset.max_rows == 100
    # 10 frames of 128 x 256 at stride 8 = 10 * 16 * 32 patches.
    assert m.coreset.patches_seen == 10 * 16 * 32
    assert m.fitted_on.image_sizes == [(128, 256)]
    assert read_manifest(tmp_path / "b") == m


def test_fit_at_half_scale_scores_at_full_size(synthetic_dataset: Path, effnet_model_dir: Path, tmp_path: Path) -> None:
    cfg = Config(fit=FitConfig(scale=0.5))
    m = fit_bundle(
        data=synthetic_dataset / "train/good", out=tmp_path / "b", cfg=cfg, model_dir=effnet_model_dir, progress=False
    )
    assert m.input.scale == 0.5 and m.coreset.patches_seen == 10 * 8 * 16
    scorer = open_backend(tmp_path / "b", runtime=cfg.runtime, scoring=cfg.scoring)
    result = scorer.score(np.full((128, 256), 120, np.uint8))
    assert result.anomaly_map.shape == (128, 256) and result.patch_scores.shape == (8, 16)


def test_fit_refuses_bad_folders(tmp_path: Path, effnet_model_dir: Path) -> None:
    def fit_here(model_dir: Path = effnet_model_dir) -> None:
        fit_bundle(data=tmp_path, out=tmp_path / "o", cfg=Config(fit=FIXED), model_dir=model_dir, progress=False)

    with pytest.raises(FitError, match="no images"):
        fit_here()
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(FitError, match="1 image; fitting needs at least 2 normal images"):
        fit_here()
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "d.png").write_bytes(b"")
    # Every unreadable file is named with its reason, not only the first.
    with pytest.raises(
        FitError, match=r"2 of 3 images cannot be read: c.png \(not a decodable.*\); d.png \(empty file\)"
    ):
        fit_here()
    (tmp_path / "c.png").unlink()
    (tmp_path / "d.png").unlink()
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((64, 64, 3), np.uint8) + 1)
    with pytest.raises(FitError, match="run `stripinspect export` first"):
        fit_here(model_dir=tmp_path / "nomodel")


def test_fit_takes_any_image_set_a_user_brings(effnet_model_dir: Path, tmp_path: Path) -> None:
    # Mixed sizes (100-630 px, square and not), a small one, grey and RGB, 8- and 16-bit.
    from pipeline.acquisition.synthetic import SyntheticStrip

    strip = SyntheticStrip(width=640, seed=3)
    folder = tmp_path / "normal"
    folder.mkdir()
    shapes = [(100, 100), (630, 200), (240, 630), (160, 320), (40, 90), (300, 300)]
    line = 0
    for i, (h, w) in enumerate(shapes):
        grey, _ = strip.render(line, h, [])
        line += h + 50
        crop = grey[:, :w]
        if i % 3 == 1:
            img = np.repeat(crop[:, :, None], 3, axis=2)  # an RGB file
            cv2.imwrite(str(folder / f"{i}.png"), img)
        elif i % 3 == 2:
            cv2.imwrite(str(folder / f"{i}.png"), crop.astype(np.uint16) * 257)  # 16-bit, same content
        else:
            cv2.imwrite(str(folder / f"{i}.png"), crop)
    cfg = Config(fit=FitConfig(coreset=CoresetConfig(ratio=0.05, max_rows=200), choose=FIXED.choose))
    m = fit_bundle(data=folder, out=tmp_path / "b", cfg=cfg, model_dir=effnet_model_dir, progress=False)
    assert m.input.channels == 3  # one colour file makes the folder colour
    assert m.fitted_on.images == 6 and sorted(m.fitted_on.image_sizes) == sorted(set(shapes))
    assert m.position_stats is None  # no fixed view: statistics per position only for one size
    backend = open_backend(tmp_path / "b", runtime=cfg.runtime, scoring=cfg.scoring)
    for (h, w), path in zip(shapes, sorted(folder.iterdir(), key=lambda p: int(p.stem)), strict=True):
        from pipeline.acquisition.images import read_image

        image = read_image(path, backend.channels)
        result = backend.score(backend.check_image(image))
        assert result.anomaly_map.shape == (h, w) and np.isfinite(result.score)


def test_fit_is_the_one_entry_for_every_backend(
    synthetic_dataset: Path, effnet_model_dir: Path, tmp_path: Path
) -> None:
    cfg = Config(fit=FitConfig(coreset=CoresetConfig(ratio=0.05, max_rows=50), choose=FIXED.choose))
    result = fit(
        backend="patchcore",
        data=synthetic_dataset / "train/good",
        out=tmp_path / "b",
        cfg=cfg,
        model_dir=effnet_model_dir,
        progress=False,
    )
    assert result.manifest == read_manifest(tmp_path / "b")
    assert result.summary.startswith(f"bundle {tmp_path / 'b'}: 10 images, 5120 patches -> 50 bank rows")
    with pytest.raises(FitError, match="--encoder is for --backend svdd or msp"):
        fit(
            backend="patchcore",
            data=synthetic_dataset / "train/good",
            out=tmp_path / "c",
            cfg=cfg,
            encoder=tmp_path / "enc.pt",
            progress=False,
        )
