import csv
import json
from pathlib import Path

import pytest

from calibration.evaluate import EvaluationError, evaluate, find_test_images
from tests.conftest import small_config


def test_evaluate_synthetic_strip(synthetic_bundle: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval" / "metrics.json"
    metrics = evaluate(bundle=synthetic_bundle, data=synthetic_dataset, out=out, cfg=small_config(), progress=False)
    saved = json.loads(out.read_text())
    assert saved["image_auroc"] == metrics["image_auroc"]
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["images"] == 2 + 6 and saved["images_defect"] == 6
    assert saved["seconds_per_image"] > 0
    # Planted defects on a texture the bank has seen: PatchCore should find them clearly.
    assert saved["image_auroc"] >= 0.9
    assert saved["pixel_auroc"] >= 0.9
    with open(out.parent / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["type"] for r in rows} == {"good", "defect"}
    overlays = sorted((out.parent / "overlays").glob("*.png"))
    assert len(overlays) == 2 + 4


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="no test/ folder"):
        find_test_images(tmp_path)
    (tmp_path / "test" / "good").mkdir(parents=True)
    (tmp_path / "test" / "scratch").mkdir()
    (tmp_path / "test" / "good" / "a.png").write_bytes(b"")
    (tmp_path / "test" / "scratch" / "b.png").write_bytes(b"")
    with pytest.raises(EvaluationError, match="no mask"):
        find_test_images(tmp_path)
    (tmp_path / "ground_truth" / "scratch").mkdir(parents=True)
    (tmp_path / "ground_truth" / "scratch" / "b_mask.png").write_bytes(b"")
    items = find_test_images(tmp_path)
    assert [i.defect_type for i in items] == ["good", "scratch"]
    assert items[1].mask_path is not None and items[1].mask_path.name == "b_mask.png"


def test_per_type_figures(synthetic_bundle: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    import shutil

    # The one defect type split into two: the per-type figures must add up to the overall ones.
    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    for root in ("test", "ground_truth"):
        files = sorted((data / root / "defect").iterdir())
        for i, f in enumerate(files):
            dst = data / root / ("a" if i < len(files) // 2 else "b")
            dst.mkdir(exist_ok=True)
            f.rename(dst / f.name)
        (data / root / "defect").rmdir()
    out = tmp_path / "eval" / "metrics.json"
    m = evaluate(bundle=synthetic_bundle, data=data, out=out, cfg=small_config(), progress=False)
    per = json.loads(out.read_text())["per_type"]
    assert set(per) == {"a", "b"} and per["a"]["images"] == per["b"]["images"] == 3
    whole = evaluate(
        bundle=synthetic_bundle,
        data=synthetic_dataset,
        out=tmp_path / "w" / "m.json",
        cfg=small_config(),
        progress=False,
    )
    assert whole["per_type"]["defect"]["image_auroc"] == whole["image_auroc"]
    assert whole["per_type"]["defect"]["pixel_aupro"] == pytest.approx(whole["pixel_aupro"])
    # Same negatives, positives split: the overall pixel AUROC is the positives-weighted mean.
    sizes = {t: 0 for t in per}
    for t in per:
        from calibration.evaluate import find_test_images
        from pipeline.acquisition.images import read_mask

        for it in find_test_images(data):
            if it.defect_type == t and it.mask_path is not None:
                sizes[t] += int(read_mask(it.mask_path, (128, 256)).sum())
    mean = sum(per[t]["pixel_auroc"] * sizes[t] for t in per) / sum(sizes.values())
    assert m["pixel_auroc"] == pytest.approx(mean, abs=1e-9)
