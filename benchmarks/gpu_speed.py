"""GPU path of the daemon's scoring, measured with whatever of it is installed (issue 5).

    python benchmarks/gpu_speed.py --bundle runs/bench/bundle_2048 [--frames 30] [--json out.json]

Self-contained: needs numpy and onnxruntime, and uses what it finds of onnxruntime-gpu (CUDA
execution provider, IO binding), faiss-gpu, CuPy and torch with CUDA; it does not need faiss,
OpenCV or the rest of the daemon, so it runs on a bare GPU machine with the bundle carried over.
Each stage says which library ran it where. Frames are 8-bit noise of the workload's size
(2048 x 1024 new lines + 384 lines of context): timing does not depend on the picture.
Finishes in well under 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.matmul_knn import matmul_search


def read_flat_bank(bundle: Path) -> np.ndarray:
    """The bank rows of a bundle's faiss IndexFlatL2 file, without faiss: the file ends with
    the rows as float32 (faiss' IxF2 layout)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows, dim = manifest["index"]["rows"], manifest["features"]["embedding_dim"]
    data = (bundle / "index.faiss").read_bytes()
    if data[:4] != b"IxF2" or len(data) < rows * dim * 4:
        raise SystemExit(f"{bundle}/index.faiss is not a flat L2 faiss index of {rows} x {dim}")
    return np.frombuffer(data[-rows * dim * 4 :], dtype=np.float32).reshape(rows, dim).copy()


def optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def pct(values: list[float]) -> str:
    v = 1000 * np.array(values)
    return " | ".join(f"{np.percentile(v, q):.1f}" for q in (50, 95, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cp, torch, faiss = optional("cupy"), optional("torch"), optional("faiss")
    has_cupy = cp is not None and cp.cuda.runtime.getDeviceCount() > 0
    has_torch = torch is not None and torch.cuda.is_available()
    bank = read_flat_bank(args.bundle)
    lines, context, stride, sigma = 1024, 192, 8, 4.0

    providers = ort.get_available_providers()
    use_cuda_ep = "CUDAExecutionProvider" in providers
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda_ep else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(args.bundle / "model.onnx"), sess_options=opts, providers=chosen)
    embed_how = (
        "onnxruntime CUDA execution provider, IO binding (output stays on the GPU)"
        if use_cuda_ep
        else f"onnxruntime CPU (no CUDA execution provider; have {providers})"
    )

    if faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        cpu_index = faiss.IndexFlatL2(bank.shape[1])
        cpu_index.add(bank)
        gpu_index = faiss.index_cpu_to_gpu(res, 0, cpu_index)
        knn_how = "faiss-gpu flat (exact)"

        def knn(q: Any) -> Any:
            d2, _ = gpu_index.search(np.asarray(q), 1)
            return np.sqrt(d2[:, 0])
    elif has_cupy:
        gb = cp.asarray(bank)
        gb_sq = (gb * gb).sum(axis=1)
        knn_how = "CuPy matrix product (exact; the daemon's fallback without faiss-gpu)"

        def knn(q: Any) -> Any:
            d2, _ = matmul_search(cp, gb, gb_sq, cp.asarray(q), 1)
            return cp.sqrt(d2[:, 0])
    elif has_torch:
        tb = torch.from_numpy(bank).cuda()
        tb_sq = (tb * tb).sum(dim=1)
        knn_how = "torch CUDA matrix product (exact)"

        def knn(q: Any) -> Any:
            q = torch.as_tensor(q, device="cuda")
            out = [
                ((c * c).sum(1, keepdim=True) - 2 * c @ tb.T + tb_sq).min(dim=1).values for c in torch.split(q, 8192)
            ]
            return torch.cat(out).clamp_min(0).sqrt()
    else:
        raise SystemExit("no GPU kNN backend: install faiss-gpu, CuPy or torch with CUDA")

    k = 2 * int(4 * sigma + 0.5) + 1
    if has_torch:
        import torch.nn.functional as F

        g = torch.exp(-((torch.arange(k, device="cuda") - k // 2) ** 2) / (2 * sigma**2))
        g = (g / g.sum()).float()
        map_how = "torch CUDA (bilinear upsampling, separable Gaussian)"

        def amap(patch: Any, h: int, w: int) -> Any:
            p = torch.as_tensor(patch, device="cuda").float().reshape(1, 1, h // stride, w // stride)
            up = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            up = F.pad(up, (k // 2,) * 4, mode="reflect")
            up = F.conv2d(F.conv2d(up, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
            return up[0, 0]
    else:
        ndi = importlib.import_module("cupyx.scipy.ndimage")
        map_how = "CuPy (cupyx.scipy.ndimage zoom + gaussian_filter)"

        def amap(patch: Any, h: int, w: int) -> Any:
            p = cp.asarray(patch).reshape(h // stride, w // stride)
            return ndi.gaussian_filter(ndi.zoom(p, stride, order=1), sigma, mode="reflect")

    def sync() -> None:
        if has_torch:
            torch.cuda.synchronize()
        if has_cupy:
            cp.cuda.Device().synchronize()

    h = lines + 2 * context
    rng = np.random.default_rng(0)
    frame = rng.integers(60, 190, size=(1, h, args.width, 1), dtype=np.uint8)
    times: dict[str, list[float]] = {"embed": [], "knn": [], "map": [], "total": []}
    for i in range(args.frames + 3):
        t0 = time.perf_counter()
        if use_cuda_ep:
            io = session.io_binding()
            io.bind_cpu_input("pixels", frame)
            io.bind_output("features", "cuda")
            session.run_with_iobinding(io)
            out = io.get_outputs()[0]
            try:
                feats: Any = cp.from_dlpack(out.to_dlpack()) if has_cupy else torch.from_dlpack(out.to_dlpack())
            except (AttributeError, RuntimeError, TypeError):
                feats = out.numpy()  # no DLPack in this onnxruntime build: one copy to the host
        else:
            feats = session.run(["features"], {"pixels": frame})[0]
        sync()
        t1 = time.perf_counter()
        gw, d = feats.shape[2:]
        band = feats[0, (context - 32) // stride : (h - context + 32) // stride].reshape(-1, d)
        dist = knn(band)
        sync()
        t2 = time.perf_counter()
        amap(dist, band.shape[0] // gw * stride, gw * stride)
        sync()
        t3 = time.perf_counter()
        if i >= 3:  # warm-up: CUDA context, cuDNN autotuning, allocator pools
            for name, v in (("embed", t1 - t0), ("knn", t2 - t1), ("map", t3 - t2), ("total", t3 - t0)):
                times[name].append(v)
    total = float(np.median(times["total"]))
    gpu_name = torch.cuda.get_device_name(0) if has_torch else "CUDA device"
    print(
        f"\n`python benchmarks/gpu_speed.py --bundle {args.bundle} --frames {args.frames}` on {gpu_name}, "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{args.width} px x {lines} new lines (+{2 * context} context), bank {bank.shape[0]:,} x {bank.shape[1]}\n")
    print("| stage | ran on | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|")
    print(f"| embed | {embed_how} | {pct(times['embed'])} |")
    print(f"| kNN | {knn_how} | {pct(times['knn'])} |")
    print(f"| map | {map_how} | {pct(times['map'])} |")
    print(f"| frame, stages in sequence | | {pct(times['total'])} |")
    print(f"\n{lines * args.width / total / 1e6:.1f} Mpx/s of new strip, one frame at a time (no stage overlap)")
    if args.json:
        args.json.write_text(
            json.dumps({"embed": embed_how, "knn": knn_how, "map": map_how, "seconds": times}, indent=2)
        )


if __name__ == "__main__":
    main()
