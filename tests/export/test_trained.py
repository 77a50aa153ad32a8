"""Encoder files: `stripinspect train` then `fit --encoder` gives the bundle an in-place fit gives;
bad files are one clear line; the training time budget stops a run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.msp import train_msp
from export.svdd import SvddError
from export.svdd_fit import fit_msp, fit_svdd
from export.trained import load_encoder, read_training_images, save_encoder, train_encoder
from pipeline.config import Config, MspConfig, SvddConfig
from stripinspect.cli import main

MSP = MspConfig(dim=8, iterations=6, crops=1, samples=16, clusters=4, lr=1e-4, bank_rows=128)
SVDD = SvddConfig(dim=8, iterations=4, crops=1, samples=4, lr=1e-4, bank_rows=128)


def _write_config(path: Path, cfg: Config) -> Path:
    path.write_text(json.dumps(cfg.model_dump(mode="json", include={"msp", "svdd"})))  # JSON is YAML
    return path


def test_train_then_fit_equals_fit_that_trains(svdd_data: Path, tmp_path: Path) -> None:
    cfg = Config(msp=MSP)
    good = svdd_data / "train" / "good"
    config = _write_config(tmp_path / "cfg.yaml", cfg)
    rc = main(
        [
            "train",
            "--backend",
            "msp",
            "--config",
            str(config),
            "--quiet",
            "--data",
            str(good),
            "--out",
            str(tmp_path / "enc" / "msp.pt"),
        ]
    )
    assert rc == 0 and (tmp_path / "enc" / "msp.loss.png").is_file()
    assert len(json.loads((tmp_path / "enc" / "msp.training.json").read_text())["loss"]) == MSP.iterations
    fit_msp(data=good, out=tmp_path / "from_file", cfg=cfg, encoder=tmp_path / "enc" / "msp.pt", progress=False)
    fit_msp(data=good, out=tmp_path / "in_place", cfg=cfg, progress=False)
    # Seeded training: the same weights, hence the same banks, byte for byte.
    for name in ("index.faiss", "index32.faiss", "index16.faiss"):
        a, b = (tmp_path / "from_file" / name).read_bytes(), (tmp_path / "in_place" / name).read_bytes()
        assert a == b, name
    m = json.loads((tmp_path / "from_file" / "manifest.json").read_text())["training"]
    assert m["encoder_file"].endswith("msp.pt") and len(m["encoder_sha256"]) == 64 and m["trained_images"] == 8
    assert (
        m["steps"] == m["iterations"] == MSP.iterations
        and m["samples"] == MSP.samples
        and m["stop_reason"] == "iterations"
    )


def test_saved_encoder_loads_to_the_same_codes(svdd_data: Path, tmp_path: Path) -> None:
    images = read_training_images(svdd_data / "train" / "good")
    te = train_encoder("svdd", images, svdd_data, Config(svdd=SVDD), progress=False)
    save_encoder(te, tmp_path / "svdd.pt")
    back = load_encoder(tmp_path / "svdd.pt", "svdd")
    assert (back.channels, back.dim, back.images, back.training) == (te.channels, te.dim, 8, te.training)
    assert back.hist.loss == te.hist.loss and back.hist.stop_reason == te.hist.stop_reason
    px = torch.from_numpy(images[0][None, :160, :160].copy())
    with torch.no_grad():
        for a, b in zip(te.dense()(px), back.dense()(px), strict=True):
            assert torch.equal(a, b)
    # The file fits a bundle of the right backend ...
    sm = fit_svdd(
        data=svdd_data / "train" / "good",
        out=tmp_path / "b",
        cfg=Config(),
        encoder=tmp_path / "svdd.pt",
        progress=False,
    )
    assert sm.dim == SVDD.dim and sm.training["samples"] == SVDD.samples  # its own settings, not the config's
    # ... and is refused by the other, in one line naming what it is.
    with pytest.raises(SvddError, match="backend 'svdd', not 'msp'"):
        fit_msp(data=svdd_data / "train" / "good", out=tmp_path / "c", cfg=Config(), encoder=tmp_path / "svdd.pt")


def test_bad_encoder_files_are_one_line(svdd_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    torch.save({"format": 1, "backend": "msp", "channels": 1, "dim": 8, "state_dict": {}}, tmp_path / "partial.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {
        "missing.pt": "no such encoder file",
        "junk.pt": "not a stripinspect encoder file",
        "list.pt": "not a stripinspect encoder file of format 1",
        "partial.pt": "broken encoder file",
    }
    for name, message in cases.items():
        with pytest.raises(SvddError, match=message):
            load_encoder(tmp_path / name, "msp")
        rc = main(
            [
                "fit",
                "--backend",
                "msp",
                "--quiet",
                "--data",
                str(svdd_data / "train" / "good"),
                "--out",
                str(tmp_path / "o"),
                "--encoder",
                str(tmp_path / name),
            ]
        )
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and "\n" not in err
    rc = main(
        [
            "fit",
            "--data",
            str(svdd_data / "train" / "good"),
            "--out",
            str(tmp_path / "p"),
            "--encoder",
            str(tmp_path / "list.pt"),
        ]
    )
    assert rc == 2 and "--encoder is for --backend svdd or msp" in capsys.readouterr().err


def test_time_budget_stops_training(svdd_data: Path) -> None:
    images = read_training_images(svdd_data / "train" / "good")
    cfg = MspConfig(dim=8, iterations=500, crops=1, samples=16, clusters=4, max_minutes=1e-6)
    _, hist = train_msp(images, cfg, progress=False)
    assert hist.stopped_early and hist.stop_reason == "time" and len(hist.loss) == 1
    _, full = train_msp(images, cfg.model_copy(update={"iterations": 3, "max_minutes": None}), progress=False)
    assert not full.stopped_early and full.stop_reason == "iterations" and len(full.loss) == 3
    assert np.isfinite(full.loss).all()


def test_a_scaled_encoder_is_the_same_as_resizing_the_images_outside(svdd_data: Path, tmp_path: Path) -> None:
    """``svdd.scale`` 0.5 on 512 px images trains, fits and scores exactly as scale 1 on the same
    images resized beforehand; the encoder file's scale, not the config's, decides at ``fit
    --encoder``; maps come back at the image's own size; the daemon refuses such a bundle."""
    import cv2

    from pipeline.acquisition.images import read_image
    from pipeline.config import KnnConfig, RuntimeConfig, ScoringConfig
    from pipeline.inference.backends import open_backend
    from pipeline.inference.framescore import EncoderFrameScorer
    from pipeline.inference.resize import resize_to

    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir()
    small.mkdir()
    for f in sorted((svdd_data / "train" / "good").iterdir())[:4]:
        im = cv2.resize(read_image(f, 1), (512, 512), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(big / f.name), im)
        cv2.imwrite(str(small / f.name), resize_to(im[:, :, None], (256, 256)))

    def tiny(scale: float) -> Config:
        return Config(svdd=SvddConfig(dim=8, iterations=6, crops=1, samples=8, lr=1e-5, bank_rows=128, scale=scale))

    enc_file = tmp_path / "half.pt"
    save_encoder(train_encoder("svdd", read_training_images(big), big, tiny(0.5)), enc_file)
    assert load_encoder(enc_file, "svdd").scale == 0.5
    m_half = fit_svdd(data=big, out=tmp_path / "half", cfg=tiny(1.0), encoder=enc_file)
    m_out = fit_svdd(data=small, out=tmp_path / "out", cfg=tiny(1.0))
    assert m_half.input.scale == 0.5 and m_out.input.scale == 1.0
    assert m_half.fitted_on.image_sizes == [(512, 512)] and m_half.training["scale"] == 0.5
    for name in ("index.faiss", "index32.faiss"):
        assert m_half.files[name] == m_out.files[name]  # the same banks, byte for byte

    runtime = RuntimeConfig(knn=KnnConfig(index="flat"))
    half = open_backend(tmp_path / "half", runtime=runtime, scoring=ScoringConfig())
    out = open_backend(tmp_path / "out", runtime=runtime, scoring=ScoringConfig())
    image = read_training_images(big)[0]
    got, want = half.score(image), out.score(resize_to(image, (256, 256)))
    assert got.anomaly_map.shape == (512, 512) and got.score == pytest.approx(want.score, rel=1e-5)
    want_map = cv2.resize(want.anomaly_map, (512, 512), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(got.anomaly_map, want_map, rtol=1e-4, atol=1e-6 * float(want_map.max()))
    with pytest.raises(ValueError, match="full resolution; bundle scale is 0.5"):
        EncoderFrameScorer(scorer=half, tile=None)  # type: ignore[arg-type]
