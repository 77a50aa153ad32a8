"""Quality and kNN time versus memory-bank size, measured side by side in one run.

The bank of a bundle is stored in greedy k-center order, so its first k rows are the greedy
coreset of size k. This script embeds every test image once and scores it against several
prefixes of the bank, printing image AUROC, pixel AUROC, AUPRO and kNN time per image.

    python benchmarks/bank_size.py --bundle B --data ../shared/datasets/bsdata --rows 39698 16384 8192 --every 3

Data citation (BSData): Schlagenhauf et al., "Industrial Machine Tool Element Surface Defect
Dataset", arXiv:2103.13003, CC BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from calibration.evaluate import find_test_images
from calibration.metrics import auroc, auroc_from_sorted, label_regions, pro_auc_from_regions
from pipeline.config import Config
from pipeline.images import read_image, read_mask
from pipeline.patchcore import PatchCoreScorer, resize_for_model
from pipeline.scoring import anomaly_map, reweighted_image_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rows", type=int, nargs="+", required=True, help="bank prefix sizes to compare")
    ap.add_argument("--every", type=int, default=1, help="use every n-th test image")
    args = ap.parse_args()
    cfg = Config()
    scorer = PatchCoreScorer.open(args.bundle, runtime=cfg.runtime, scoring=cfg.scoring)
    bank = scorer.index.vectors
    rows = [min(r, bank.shape[0]) for r in args.rows]
    indexes = {}
    for r in rows:
        idx = faiss.IndexFlatL2(bank.shape[1])
        idx.add(np.ascontiguousarray(bank[:r]))
        indexes[r] = idx
    items = find_test_images(args.data)[:: args.every]
    acc: dict[int, dict[str, list]] = {r: {"img": [], "neg": [], "reg": [], "t": []} for r in rows}
    labels = []
    for n, item in enumerate(items):
        image = read_image(item.path, scorer.channels)
        mask = read_mask(item.mask_path, image.shape[:2]) if item.mask_path else np.zeros(image.shape[:2], bool)
        labels.append(item.defect_type != "good")
        pixels = resize_for_model(image, scorer.scale)
        feats = scorer.embedder.embed(pixels[None])[0]
        flat = feats.reshape(-1, feats.shape[2])
        n_reg, lab = label_regions(mask)
        for r in rows:
            t = time.perf_counter()
            d2, ids = indexes[r].search(flat, 1)
            dist = np.sqrt(np.maximum(d2[:, 0], 0))
            acc[r]["t"].append(time.perf_counter() - t)
            w = int(np.argmax(dist))
            _, nb = indexes[r].search(bank[ids[w, 0]][None], min(cfg.scoring.num_neighbors, r))
            s = reweighted_image_score(float(dist[w]), np.linalg.norm(bank[nb[0]] - flat[w], axis=1))
            amap = anomaly_map(
                dist.reshape(feats.shape[:2]), stride=scorer.stride, out_hw=image.shape[:2], sigma=cfg.scoring.sigma
            )
            acc[r]["img"].append(s)
            acc[r]["neg"].append(amap[~mask])
            acc[r]["reg"] += [amap[lab == k] for k in range(1, n_reg + 1)]
        print(f"\r{n + 1}/{len(items)}", end="", flush=True)
    print(f"\n\nBSData, {len(items)} test images (every {args.every}), bundle {args.bundle}")
    print(f"{'bank rows':>10} {'image AUROC':>12} {'pixel AUROC':>12} {'AUPRO':>8} {'kNN ms/img':>11}")
    for r in rows:
        neg = np.sort(np.concatenate(acc[r]["neg"]))
        pos = np.concatenate(acc[r]["reg"])
        print(
            f"{r:>10} {auroc(np.array(acc[r]['img']), np.array(labels)):>12.4f} {auroc_from_sorted(neg, pos):>12.4f} "
            f"{pro_auc_from_regions(neg, acc[r]['reg']):>8.4f} {1000 * np.mean(acc[r]['t']):>11.0f}"
        )


if __name__ == "__main__":
    main()
