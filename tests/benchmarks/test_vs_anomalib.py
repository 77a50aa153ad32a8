"""benchmarks/vs_anomalib.py: each fit's peak is its own, and anomalib's PatchCore sees exactly our
EfficientNet-Lite0 features (skipped where the bench extra, anomalib, is not installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.vs_anomalib import BACKBONE, run_child


def test_each_child_reports_its_own_peak(tmp_path: Path) -> None:
    big = run_child([sys.executable, "-c", "import numpy as np; np.ones(300_000_000 // 8).sum()"], tmp_path / "a.log")
    small = run_child([sys.executable, "-c", "pass"], tmp_path / "b.log")
    assert big.peak_rss_bytes > 250e6
    # After the big child, RUSAGE_CHILDREN would still say 300 MB; wait4 gives the small one's own.
    assert small.peak_rss_bytes < 100e6
    assert small.wall_s > 0 and small.mean_load >= 0


def test_failing_child_names_its_log(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"exited 3; .*c\.log"):
        run_child([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "c.log")


def test_anomalib_gets_our_lite0_features_and_scaling() -> None:
    pytest.importorskip("anomalib", reason="anomalib is the benchmark-only extra (pip install .[bench])")
    import torch

    from benchmarks.vs_anomalib import _anomalib_parts
    from export.backbones import build_feature_extractor

    model, transform = _anomalib_parts("lite0")
    ours = build_feature_extractor(BACKBONE.name, weights=None, random_weights=False)
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 4 - 2
    with torch.no_grad():
        theirs = model.feature_extractor(x)
        shallow, deep = ours(x)
    assert list(theirs) == list(BACKBONE.layers)
    np.testing.assert_allclose(theirs[BACKBONE.layers[0]].numpy(), shallow.numpy(), atol=1e-4)
    np.testing.assert_allclose(theirs[BACKBONE.layers[1]].numpy(), deep.numpy(), atol=1e-4)
    # Pixels in [0, 1] at 256 x 256 come out as the Lite0 weights expect, (x - 127) / 128 in 8-bit units.
    img = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(transform(img).numpy(), ((img * 255 - 127) / 128).numpy(), atol=1e-5)
