"""Shared fixtures: a real exported EfficientNet-Lite0, a synthetic strip dataset, a bundle.

Everything is real (onnxruntime, faiss, files in tmp dirs); nothing is faked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ChooseConfig, Config, DaemonConfig, FitConfig, SyntheticConfig

REPO = Path(__file__).resolve().parent.parent
BSDATA = REPO.parent / "shared" / "datasets" / "bsdata"

SMALL_SYNTHETIC = SyntheticConfig(width=256, frame_lines=128, seed=3, train_frames=10, test_frames=6)


# Settings fixed at the values they had before the fit-time choice (scale 1, z-score map, MAD floor
# 0.5): tests about other things need neither its minute nor a scale that moves under them. The
# choice has its own tests (tests/export/test_selection.py).
FIXED = FitConfig(choose=ChooseConfig(images=0))


def small_config() -> Config:
    return Config(synthetic=SMALL_SYNTHETIC, fit=FIXED)


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative default paths (the alert journal) land in the test's own folder, not the repo.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def effnet_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_export import export_backbone

    out = tmp_path_factory.mktemp("effnet")
    export_backbone(small_config().backbone, out)
    return out


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stripinspect.demo import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(small_config(), root)
    return root


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset: Path, effnet_model_dir: Path) -> Path:
    from export.fit import fit_bundle

    out = tmp_path_factory.mktemp("bundle")
    fit_bundle(
        data=synthetic_dataset / "train" / "good",
        out=out,
        cfg=small_config(),
        model_dir=effnet_model_dir,
        progress=False,
    )
    return out


STRIP_SYNTHETIC = SyntheticConfig(width=256, frame_lines=256, seed=3, train_frames=40, test_frames=6)


@pytest.fixture(scope="session")
def strip_bundle(tmp_path_factory: pytest.TempPathFactory, effnet_model_dir: Path) -> Path:
    """A bank fitted on 10,240 lines of normal strip, for the daemon tests."""
    from export.fit import fit_bundle
    from stripinspect.demo import write_synthetic_dataset

    cfg = Config(synthetic=STRIP_SYNTHETIC, fit=FIXED)
    root = tmp_path_factory.mktemp("strip")
    write_synthetic_dataset(cfg, root / "data")
    fit_bundle(
        data=root / "data" / "train" / "good", out=root / "bundle", cfg=cfg, model_dir=effnet_model_dir, progress=False
    )
    return root / "bundle"


@pytest.fixture(scope="session")
def svdd_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stripinspect.demo import write_synthetic_dataset

    # Frames of 256 x 256: room for the 3 x 3 grid of 64 px patches the SSL loss samples.
    root = tmp_path_factory.mktemp("svdd_data")
    write_synthetic_dataset(
        Config(synthetic=SyntheticConfig(width=256, frame_lines=256, seed=7, train_frames=8, test_frames=6)), root
    )
    return root


@pytest.fixture(scope="session")
def svdd_bundle(tmp_path_factory: pytest.TempPathFactory, svdd_data: Path) -> Path:
    from export.svdd_fit import fit_svdd
    from pipeline.config import SvddConfig

    out = tmp_path_factory.mktemp("svdd") / "bundle"
    # A barely trained encoder: 40 steps at lr 1e-3 collapse every code to one point on this strip
    # (SVDD' wins before SSL starts to learn), which would leave nothing to score.
    cfg = Config(svdd=SvddConfig(dim=16, iterations=40, crops=1, samples=8, lr=1e-5, bank_rows=512))
    fit_svdd(data=svdd_data / "train" / "good", out=out, cfg=cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def msp_bundle(tmp_path_factory: pytest.TempPathFactory, svdd_data: Path) -> Path:
    from export.svdd_fit import fit_msp
    from pipeline.config import MspConfig

    out = tmp_path_factory.mktemp("msp") / "bundle"
    cfg = Config(msp=MspConfig(dim=8, iterations=6, crops=1, samples=16, clusters=4, lr=1e-5, bank_rows=256))
    fit_msp(data=svdd_data / "train" / "good", out=out, cfg=cfg, progress=False)
    return out


def loopback_daemon_config(*, bundle: Path, **overrides: Any) -> DaemonConfig:
    """A daemon config for tests: PUB and control on loopback at random ports, and a threshold
    no score reaches unless the test gives one."""
    base: dict[str, Any] = {
        "bundle": bundle,
        "threshold": 1e9,
        "pub_endpoint": "tcp://127.0.0.1:*",
        "control_endpoint": "tcp://127.0.0.1:*",
    }
    return DaemonConfig(**{**base, **overrides})
