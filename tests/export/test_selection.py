"""Fit-time choice of the 'auto' settings: the rule, the candidates, and planted sets where one
setting is known to be better (with and without a fixed view)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from export.anomalies import KINDS, paint
from export.fit import fit_bundle
from export.onnx_export import ModelInfo
from export.selection import candidate_scales, choose_candidate, choose_settings, scoring_candidates
from pipeline.acquisition.images import survey_training_folder
from pipeline.config import ChooseConfig, Config, FitConfig, ScoringConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.bundle import CandidateResult, Selection, read_manifest
from pipeline.inference.embed import OnnxEmbedder


def _result(norm: str, floor: float, replicates: list[float]) -> CandidateResult:
    return CandidateResult(
        scale=1.0,
        position_normalise=norm,  # type: ignore[arg-type]
        mad_floor=floor,
        image_score="window",
        image_auroc=0.9,
        pixel_auroc=0.9,
        aupro=0.9,
        objective=float(np.mean(replicates)),
        replicates=replicates,
    )


def test_the_preferred_candidate_stays_unless_beaten_in_every_replicate() -> None:
    first = _result("map", 0.5, [0.90, 0.90])
    noisy = _result("map", 2.0, [0.95, 0.905])  # far better once, within the margin the other time
    assert choose_candidate([first, noisy], margin=0.01) is first
    clear = _result("none", 0.0, [0.93, 0.92])
    clearer = _result("image", 1.0, [0.95, 0.94])
    assert choose_candidate([first, noisy, clear, clearer], margin=0.01) is clearer
    assert choose_candidate([first, clear], margin=0.05) is first


def test_pinned_settings_are_not_chosen_and_scales_fit_the_images() -> None:
    cfg = Config(fit=FitConfig(scale=1.0), scoring=ScoringConfig(position_normalise="map", mad_floor=0.5))
    assert candidate_scales(cfg, [(512, 512)]) == [1.0]
    assert scoring_candidates(cfg, with_stats=True) == [("map", 0.5, "window")]
    auto = Config()
    assert candidate_scales(auto, [(100, 160)]) == [1.0]  # the daemon scores frames at full resolution
    # For still images: 2.0 would make a 512 px image 1,024 px (over max_side 768); 0.5 leaves 256
    # (over min_side 96); small images may be enlarged.
    still = Config(fit=FitConfig(choose=ChooseConfig(scales=[1.0, 0.5, 2.0])))
    assert candidate_scales(still, [(512, 512)]) == [1.0, 0.5]
    assert candidate_scales(still, [(100, 160), (120, 90)]) == [1.0, 2.0]
    # Without position statistics (mixed sizes) only 'none' applies, eq. 7 first.
    assert scoring_candidates(auto, with_stats=False) == [("none", 0.0, "reweighted"), ("none", 0.0, "window")]
    with_stats = scoring_candidates(auto, with_stats=True)
    assert with_stats[0] == ("map", 0.5, "window") and ("none", 0.0, "reweighted") in with_stats


def test_painted_anomalies_are_what_the_mask_says() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(80, 170, (96, 128, 3), dtype=np.uint8)
    for kind in KINDS:
        painted, mask = paint(img, kind, np.random.default_rng(1))
        changed = np.abs(painted.astype(int) - img.astype(int)).max(axis=2)
        assert mask.any(), kind
        assert (changed[~mask] <= 2).all(), kind  # outside the mask at most the threshold
        assert mask.mean() < 0.1, kind  # a defect, not a new image
        again, _ = paint(img, kind, np.random.default_rng(1))
        assert np.array_equal(again, painted), kind  # deterministic by seed
    with pytest.raises(ValueError, match="unknown anomaly kind"):
        paint(img, "dent", rng)


def _write(folder: Path, images: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return folder


def _choose(folder: Path, model_dir: Path, cfg: Config) -> Selection:
    survey = survey_training_folder(folder)
    info = ModelInfo.read(model_dir / "model.json")
    embedder = OnnxEmbedder.for_runtime(
        model_path=model_dir / "model.onnx",
        embedding_dim=info.embedding_dim,
        input_channels=survey.channels,
        runtime=cfg.runtime,
    )
    return choose_settings(
        files=survey.files,
        sizes=survey.sizes,
        channels=survey.channels,
        cfg=cfg,
        embedder=embedder,
        stride=info.feature_stride,
        progress=False,
    )


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A fine grey texture (blurred noise around mid grey), 3 channels."""
    t = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.2)
    t = 128 + 18 * t / t.std()
    return np.repeat(np.clip(t, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def test_fixed_view_with_a_flat_background_chooses_a_mad_floor(tmp_path: Path, effnet_model_dir: Path) -> None:
    """A fixed view whose left third is a black background, clean in most images and with a faint
    speck of dust in a few: without a MAD floor, a speck is dozens of MADs at a position whose
    normal images never vary (MVTec bottle's failure). The preferred candidate here is the planted-
    worse one (floor 0), so only the self-validation can move the choice."""
    rng = np.random.default_rng(5)
    images = []
    for i in range(24):
        h, w = 160, 192
        x = np.arange(w)[None, :] + rng.uniform(0, 12)
        t = 128 + 30 * np.sin(2 * np.pi * x / 12) + rng.normal(0, 3, (h, w))
        img = np.repeat(np.clip(t, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
        img[:, :64] = 0
        if i % 3 == 0:
            y, x0 = int(rng.integers(8, h - 8)), int(rng.integers(8, 56))
            img[y : y + 3, x0 : x0 + 3] = 40
        images.append(img)
    cfg = Config(fit=FitConfig(scale=1.0, choose=ChooseConfig(images=24, mad_floors=[0.0, 0.5])))
    sel = _choose(_write(tmp_path / "fixed", images), effnet_model_dir, cfg)
    first = sel.candidates[0]
    assert (first.position_normalise, first.mad_floor) == ("map", 0.0)
    assert sel.chosen.mad_floor == 0.5 or sel.chosen.position_normalise == "none", sel.chosen
    floored = next(c for c in sel.candidates if (c.position_normalise, c.mad_floor) == ("map", 0.5))
    assert all(a > b for a, b in zip(floored.replicates, first.replicates, strict=True))


def test_no_fixed_view_of_a_fine_texture_chooses_full_resolution(tmp_path: Path, effnet_model_dir: Path) -> None:
    """Mixed sizes (no fixed view, so no position statistics) of a fine texture whose grain is one
    or two pixels: halving the resolution averages the grain away together with the thin lines
    and faint stains painted on it. Half resolution is made the preferred candidate here, so only
    the figures can move the choice to the planted-better full resolution."""
    rng = np.random.default_rng(6)
    images = [_texture(rng, *((192, 256) if i % 2 else (224, 208))) for i in range(24)]
    cfg = Config(fit=FitConfig(choose=ChooseConfig(images=24, scales=[0.5, 1.0])))
    sel = _choose(_write(tmp_path / "mixed", images), effnet_model_dir, cfg)
    assert {c.position_normalise for c in sel.candidates} == {"none"}
    assert sel.candidates[0].scale == 0.5
    assert sel.chosen.scale == 1.0, [(c.scale, c.image_score, c.replicates) for c in sel.candidates]


def test_fit_records_the_choice_and_the_scorer_uses_it(
    synthetic_dataset: Path, effnet_model_dir: Path, tmp_path: Path
) -> None:
    cfg = Config(fit=FitConfig(choose=ChooseConfig(images=8, scales=[1.0, 0.5], min_side=32)))
    m = fit_bundle(
        data=synthetic_dataset / "train/good", out=tmp_path / "b", cfg=cfg, model_dir=effnet_model_dir, progress=False
    )
    assert m.selection is not None and read_manifest(tmp_path / "b").selection == m.selection
    assert m.input.scale == m.selection.chosen.scale
    assert {c.scale for c in m.selection.candidates} == {1.0, 0.5}
    chosen = m.selection.chosen
    backend = open_backend(tmp_path / "b", runtime=cfg.runtime, scoring=cfg.scoring)
    assert backend.settings == chosen  # type: ignore[attr-defined]
    # The config pins over the bundle's choice.
    other = "none" if chosen.position_normalise != "none" else "map"
    pinned = open_backend(
        tmp_path / "b", runtime=cfg.runtime, scoring=ScoringConfig(position_normalise=other, image_score="reweighted")
    )
    assert pinned.settings.position_normalise == other and pinned.settings.image_score == "reweighted"  # type: ignore[attr-defined]
