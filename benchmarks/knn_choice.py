"""Quality, recall and kNN time of memory-bank search choices, measured side by side in one run.

Each choice is ``kind[:key=value,...]``: a ``runtime.knn`` setting (``flat``, ``ivf:nprobe=4``,
``hnsw:ef_search=32,exact_top=0``, ``ivfpq:nprobe=16``), searched through the daemon's own
``FaissIndex``, optionally on a prefix of the bank (``rows=6144``;
the bank is stored in greedy k-center order, so its first k rows are the greedy coreset of
size k). Every test image is embedded once and searched by every choice; the table gives image
AUROC, pixel AUROC, AUPRO, recall@1 against exact search on the same rows, and kNN time.

    python benchmarks/knn_choice.py --bundle B --data ../shared/datasets/bsdata --every 3 \\
        --choices flat ivf:nprobe=4 ivf:nprobe=16 hnsw ivfpq flat:rows=6144

Data citation (BSData): Schlagenhauf et al., "Industrial Machine Tool Element Surface Defect
Dataset", arXiv:2103.13003, CC BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.evaluate import find_test_images
from calibration.metrics import auroc, auroc_from_sorted, label_regions, pro_auc_from_regions
from pipeline.acquisition.images import read_image, read_mask
from pipeline.config import Config, KnnConfig
from pipeline.inference.backends import open_backend
from pipeline.inference.knn import FaissIndex
from pipeline.inference.patchcore import PatchCoreScorer, resize_for_model
from pipeline.inference.scoring import anomaly_map, reweighted_image_score


def parse_choice(text: str) -> tuple[KnnConfig, int | None]:
    kind, _, rest = text.partition(":")
    params: dict[str, float] = {}
    for kv in filter(None, rest.split(",")):
        key, _, value = kv.partition("=")
        params[key] = float(value) if "." in value else int(value)
    rows = params.pop("rows", None)
    return KnnConfig.model_validate({"index": kind, **params}), None if rows is None else int(rows)


@dataclass
class Setup:
    name: str
    index: FaissIndex
    bank: np.ndarray
    build_s: float
    img: list[float] = field(default_factory=list)
    neg: list[np.ndarray] = field(default_factory=list)
    reg: list[np.ndarray] = field(default_factory=list)
    t: list[float] = field(default_factory=list)
    hit: int = 0
    n: int = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--choices", nargs="+", default=["flat", "ivf:nprobe=4", "ivf:nprobe=16", "hnsw", "ivfpq"])
    ap.add_argument("--every", type=int, default=1, help="use every n-th test image")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = Config()
    scorer = open_backend(args.bundle, runtime=cfg.runtime, scoring=cfg.scoring)
    if not isinstance(scorer, PatchCoreScorer):
        raise SystemExit(f"{args.bundle}: a {scorer.kind!r} bundle; this compares searches of a PatchCore bank")
    bank = scorer.index.vectors
    setups = []
    for text in args.choices:
        knn, rows = parse_choice(text)
        sub = np.ascontiguousarray(bank[: rows or bank.shape[0]])
        t = time.perf_counter()
        index = FaissIndex.from_bank(sub, threads=cfg.runtime.faiss_threads, knn=knn)
        setups.append(Setup(name=text, index=index, bank=sub, build_s=time.perf_counter() - t))
    items = find_test_images(args.data)[:: args.every]
    labels = []
    for n, item in enumerate(items):
        image = read_image(item.path, scorer.channels)
        mask = read_mask(item.mask_path, image.shape[:2]) if item.mask_path else np.zeros(image.shape[:2], bool)
        labels.append(item.defect_type != "good")
        pixels = resize_for_model(image, scorer.scale)
        feats = scorer.embedder.embed(pixels[None])[0]
        flat = feats.reshape(-1, feats.shape[2])
        n_reg, lab = label_regions(mask)
        exact_ids_by_rows: dict[int, np.ndarray] = {}
        for a in setups:
            sub = a.bank
            t = time.perf_counter()
            _, ids = a.index.search(flat, 1)
            a.t.append(time.perf_counter() - t)
            rows_key = a.bank.shape[0]
            if rows_key not in exact_ids_by_rows:  # the reference, once per bank size
                exact_ids_by_rows[rows_key] = a.index.search_exact(flat, 1)[1]
            exact_ids = exact_ids_by_rows[rows_key]
            a.hit += int((ids[:, 0] == exact_ids[:, 0]).sum())
            a.n += flat.shape[0]
            # Distances to the rows found, computed exactly (PQ reports code distances).
            dist = np.linalg.norm(sub[np.maximum(ids[:, 0], 0)] - flat, axis=1)
            w = int(np.argmax(dist))
            _, nb = a.index.search_exact(sub[ids[w, 0]][None], min(cfg.scoring.num_neighbors, sub.shape[0]))
            a.img.append(reweighted_image_score(float(dist[w]), np.linalg.norm(sub[nb[0]] - flat[w], axis=1)))
            amap = anomaly_map(
                dist.reshape(feats.shape[:2]), stride=scorer.stride, out_hw=image.shape[:2], sigma=cfg.scoring.sigma
            )
            a.neg.append(amap[~mask])
            a.reg += [amap[lab == k] for k in range(1, n_reg + 1)]
        print(f"\r{n + 1}/{len(items)}", end="", flush=True)
    print(f"\n\n{args.data.name}, {len(items)} test images (every {args.every}), bundle {args.bundle}")
    print("\n| search | bank rows | recall@1 | image AUROC | pixel AUROC | AUPRO | kNN ms / image | build s |")
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for a in setups:
        neg = np.sort(np.concatenate(a.neg))
        row = {
            "search": a.name,
            "rows": int(a.bank.shape[0]),
            "recall_at_1": a.hit / a.n,
            "image_auroc": auroc(np.array(a.img), np.array(labels)),
            "pixel_auroc": auroc_from_sorted(neg, np.concatenate(a.reg)),
            "pixel_aupro": pro_auc_from_regions(neg, a.reg),
            "knn_ms_per_image": 1000 * float(np.mean(a.t)),
            "build_s": a.build_s,
        }
        table.append(row)
        print(
            f"| {a.name} | {row['rows']:,} | {row['recall_at_1']:.4f} | {row['image_auroc']:.4f} | "
            f"{row['pixel_auroc']:.4f} | {row['pixel_aupro']:.4f} | {row['knn_ms_per_image']:.0f} | {a.build_s:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
