"""The GPU training preset, measured: train each learned encoder on the GPU, time steps against
the CPU in the same run, and bring the encoder files back to fit their banks elsewhere.

    python benchmarks/gpu_train.py --data DIR --out OUTDIR [--preset presets/train-gpu.yaml]
        [--backends msp svdd] [--minutes 3.5] [--cpu-steps 20]

For each backend: ``--cpu-steps`` steps of the preset's settings on the CPU and the same number
on the GPU (a timing of the step, the same seed), then a training run on the GPU of at most
``--minutes`` (the preset's ``max_minutes`` replaced; the preset's iterations and plateau stop
still apply). Writes ``OUTDIR/<backend>.pt`` (an encoder file: ``stripinspect fit --backend
<backend> --encoder OUTDIR/<backend>.pt --data DIR`` fits its banks on any machine), the loss
curves beside it, and ``OUTDIR/gpu_train.json``; prints a table.

Needs torch with CUDA, OpenCV, tqdm, numpy, pydantic and PyYAML; not faiss or onnxruntime, so
it runs on a bare GPU machine with the images and any missing wheels carried over.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from export.trained import Backend, read_training_images, save_encoder, train_encoder
from pipeline.config import Config, load_config


def _with(cfg: Config, backend: Backend, **update: Any) -> Config:
    section = cfg.svdd if backend == "svdd" else cfg.msp
    return cfg.model_copy(update={backend: section.model_copy(update=update)})


def _step_seconds(backend: Backend, images: list[Any], cfg: Config, device: str, steps: int) -> float:
    """Seconds per training step of ``steps`` steps on ``device`` (no plateau stop can fire)."""
    c = _with(cfg, backend, device=device, iterations=steps, max_minutes=None)
    t0 = time.perf_counter()
    train_encoder(backend, images, Path("."), c, progress=False)  # ends on the CPU: synchronised
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder of defect-free training images")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", type=Path, default=Path("presets/train-gpu.yaml"))
    ap.add_argument("--backends", nargs="+", choices=["msp", "svdd"], default=["msp", "svdd"])
    ap.add_argument("--minutes", type=float, default=3.5, help="GPU training budget per backend")
    ap.add_argument("--cpu-steps", type=int, default=20, help="steps timed on each device")
    ap.add_argument("--device", default=None, help="training device instead of the preset's (cpu: a dry run)")
    args = ap.parse_args()
    cfg = load_config(args.preset)
    images = read_training_images(args.data)
    gpu = args.device or (cfg.msp.device if "msp" in args.backends else cfg.svdd.device)
    cuda = gpu.startswith("cuda")
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": gpu,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "images": len(images),
        "backends": {},
    }
    print(f"{len(images)} images; torch {torch.__version__}, GPU {report['gpu']}, {report['cpu_threads']} CPU threads")
    for backend in args.backends:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cpu_s = _step_seconds(backend, images, cfg, "cpu", args.cpu_steps)
        gpu_s = _step_seconds(backend, images, cfg, gpu, args.cpu_steps)
        t0 = time.perf_counter()
        run = _with(cfg, backend, device=gpu, max_minutes=args.minutes)
        te = train_encoder(backend, images, args.data, run, progress=False)
        wall = time.perf_counter() - t0
        save_encoder(te, args.out / f"{backend}.pt")
        h = te.hist
        row = {
            "cpu_step_s": cpu_s,
            "gpu_step_s": gpu_s,
            "gpu_speedup": cpu_s / gpu_s,
            "iterations": len(h.loss),
            "stop_reason": h.stop_reason,
            "train_s": h.seconds,
            "wall_s": wall,
            "loss_first_100": sum(h.loss[:100]) / len(h.loss[:100]),
            "loss_last_100": sum(h.loss[-100:]) / len(h.loss[-100:]),
            "ssl_accuracy_first_100": sum(h.ssl_accuracy[:100]) / len(h.ssl_accuracy[:100]),
            "ssl_accuracy_last_100": sum(h.ssl_accuracy[-100:]) / len(h.ssl_accuracy[-100:]),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "training": te.training,
        }
        report["backends"][backend] = row
        print(
            f"{backend}: step {1000 * cpu_s:.0f} ms CPU vs {1000 * gpu_s:.1f} ms GPU ({row['gpu_speedup']:.1f}x); "
            f"trained {row['iterations']} steps in {h.seconds:.0f} s (stop: {h.stop_reason}), SSL accuracy "
            f"{row['ssl_accuracy_first_100']:.3f} -> {row['ssl_accuracy_last_100']:.3f}, loss "
            f"{row['loss_first_100']:.4f} -> {row['loss_last_100']:.4f}",
            flush=True,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_train.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
