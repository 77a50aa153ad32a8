"""GPU path of the daemon's scoring, measured with whatever of it is installed (issue 5).

    python benchmarks/gpu_speed.py --bundle runs/bench/bundle_2048 [--frames 30] [--json out.json]

Self-contained: needs numpy and onnxruntime, and uses what it finds of onnxruntime-gpu (CUDA
execution provider, IO binding), faiss-gpu, CuPy and torch with CUDA; it does not need faiss,
OpenCV or the rest of the daemon, so it runs on a bare GPU machine with the bundle carried over.
Each stage says which library ran it where. Frames are 8-bit noise of the workload's size
(2048 x 1024 new lines + 384 lines of context): timing does not depend on the picture.

Where torch with CUDA and the backbone's package are importable, it also runs the bundle's
patch-feature network in torch on the GPU (fp32 and fp16 autocast), checks its features and
patch scores against the ONNX model's, and runs a naive reference written the way anomalib
does it (eager fp32 torch on 256 x 256 tiles, torch.cdist to the whole bank) in the same run.
Finishes in well under 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.inference.matmul_knn import MatmulBank

LINES, CONTEXT, STRIDE, SIGMA = 1024, 192, 8, 4.0


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


def rel_err(got: Any, want: np.ndarray) -> float:
    g = np.asarray(got, dtype=np.float64)
    return float(np.linalg.norm(g - want) / np.linalg.norm(want))


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "get"):  # CuPy
        return np.asarray(x.get())
    if hasattr(x, "detach"):  # torch
        return np.asarray(x.detach().float().cpu().numpy())
    return np.asarray(x)


def time_stages(
    stages: list[tuple[str, Callable[[Any], Any]]], first: Any, frames: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Run the stages in sequence ``frames`` + 3 times (3 warm-ups: CUDA context, cuDNN autotune,
    allocator pools); per-stage and whole-frame seconds of the timed runs."""
    times: dict[str, list[float]] = {name: [] for name, _ in stages}
    times["total"] = []
    for i in range(frames + 3):
        x, t_start = first, time.perf_counter()
        for name, fn in stages:
            t0 = time.perf_counter()
            x = fn(x)
            sync()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
        if i >= 3:
            times["total"].append(time.perf_counter() - t_start)
    return times


def torch_feature_net(bundle: Path, torch: Any, dev: str) -> Any:
    """The bundle's patch-feature network in torch (the one its ONNX graph was exported from)."""
    from export.backbones import SPECS, PatchFeatureNet, build_feature_extractor

    f = json.loads((bundle / "manifest.json").read_text())["features"]
    if f["backbone"] != "efficientnet_lite0":
        raise SystemExit(f"--torch needs the packaged efficientnet_lite0 weights; bundle has {f['backbone']}")
    net = PatchFeatureNet(
        spec=SPECS[f["backbone"]],
        extractor=build_feature_extractor(f["backbone"], weights=None, random_weights=False),
        aggregation_size=f["aggregation_size"],
        projection_dim=f["projection_dim"],
        border_pad=f["border_pad"],
    )
    net = net.eval().to(dev)
    return net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch CUDA network and the naive reference")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="torch on the CPU stands in for CUDA: checks the script, times nothing",
    )
    args = ap.parse_args()
    cp, torch, faiss = optional("cupy"), optional("torch"), optional("faiss")
    if args.dry_run_cpu:
        cp = faiss = None
    has_cupy = cp is not None and cp.cuda.runtime.getDeviceCount() > 0
    has_torch = torch is not None and (args.dry_run_cpu or torch.cuda.is_available())
    dev = "cpu" if args.dry_run_cpu else "cuda"
    bank = read_flat_bank(args.bundle)

    providers = ort.get_available_providers()
    use_cuda_ep = "CUDAExecutionProvider" in providers
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda_ep else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(args.bundle / "model.onnx"), sess_options=opts, providers=chosen)
    embed_how = (
        "onnxruntime CUDA execution provider, IO binding (output stays on the GPU)"
        if use_cuda_ep
        else f"onnxruntime {ort.__version__} CPU (no CUDA execution provider; have {providers})"
    )

    def sync() -> None:
        if has_torch and dev == "cuda":
            torch.cuda.synchronize()
        if has_cupy:
            cp.cuda.Device().synchronize()

    def ort_embed(frame: np.ndarray) -> Any:
        if not use_cuda_ep:
            return session.run(["features"], {"pixels": frame})[0]
        io = session.io_binding()
        io.bind_cpu_input("pixels", frame)
        io.bind_output("features", "cuda")
        session.run_with_iobinding(io)
        out = io.get_outputs()[0]
        try:
            return cp.from_dlpack(out.to_dlpack()) if has_cupy else torch.from_dlpack(out.to_dlpack())
        except (AttributeError, RuntimeError, TypeError):
            return out.numpy()  # no DLPack in this onnxruntime build: one copy to the host

    knn_backends: dict[str, tuple[str, Callable[[Any], Any]]] = {}
    if faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        cpu_index = faiss.IndexFlatL2(bank.shape[1])
        cpu_index.add(bank)
        gpu_index = faiss.index_cpu_to_gpu(res, 0, cpu_index)

        def faiss_knn(q: Any) -> Any:
            d2, _ = gpu_index.search(to_numpy(q), 1)
            return np.sqrt(d2[:, 0])

        knn_backends["faiss"] = ("faiss-gpu flat (exact)", faiss_knn)
    if has_cupy:
        gbank = MatmulBank(cp, bank)

        def cupy_knn(q: Any) -> Any:
            d2, _ = gbank.search(cp.asarray(q), 1)
            return cp.sqrt(d2[:, 0])

        knn_backends["cupy"] = ("CuPy matrix product, fp32 (exact; the daemon's fallback without faiss-gpu)", cupy_knn)
    if has_torch:
        tb = torch.from_numpy(bank).to(dev)
        tb_sq = (tb * tb).sum(dim=1)

        def torch_knn(q: Any) -> Any:
            q = torch.as_tensor(q, device=dev)
            out = [
                ((c * c).sum(1, keepdim=True) - 2 * c @ tb.T + tb_sq).min(dim=1).values for c in torch.split(q, 8192)
            ]
            return torch.cat(out).clamp_min(0).sqrt()

        knn_backends["torch"] = ("torch CUDA matrix product, fp32 (exact)", torch_knn)
    if not knn_backends:
        raise SystemExit("no GPU kNN backend: install faiss-gpu, CuPy or torch with CUDA")
    knn_name = next(iter(knn_backends))
    knn_how, knn = knn_backends[knn_name]

    k = 2 * int(4 * SIGMA + 0.5) + 1
    if has_torch:
        import torch.nn.functional as F

        g = torch.exp(-((torch.arange(k, device=dev) - k // 2) ** 2) / (2 * SIGMA**2))
        g = (g / g.sum()).float()
        map_how = "torch CUDA (bilinear upsampling, separable Gaussian)"

        def smooth(up: Any) -> Any:
            up = F.pad(up, (k // 2,) * 4, mode="reflect")
            return F.conv2d(F.conv2d(up, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))

        def amap(patch: Any, h: int, w: int) -> Any:
            p = torch.as_tensor(patch, device=dev).float().reshape(1, 1, h // STRIDE, w // STRIDE)
            return smooth(F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False))[0, 0]
    else:
        ndi = importlib.import_module("cupyx.scipy.ndimage")
        map_how = "CuPy (cupyx.scipy.ndimage zoom + gaussian_filter)"

        def amap(patch: Any, h: int, w: int) -> Any:
            p = cp.asarray(patch).reshape(h // STRIDE, w // STRIDE)
            return ndi.gaussian_filter(ndi.zoom(p, STRIDE, order=1), SIGMA, mode="reflect")

    h = LINES + 2 * CONTEXT
    rng = np.random.default_rng(0)
    frame = rng.integers(60, 190, size=(1, h, args.width, 1), dtype=np.uint8)

    def band(feats: Any) -> Any:
        d = feats.shape[3]
        return feats[0, (CONTEXT - 32) // STRIDE : (h - CONTEXT + 32) // STRIDE].reshape(-1, d)

    grid_w = args.width // STRIDE

    def to_map(dist: Any) -> Any:
        return amap(dist, dist.shape[0] // grid_w * STRIDE, grid_w * STRIDE)

    gpu_name = "CPU (dry run)" if dev == "cpu" else torch.cuda.get_device_name(0) if has_torch else "CUDA device"
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = ""
    report: dict[str, Any] = {"gpu": gpu_name, "nvidia_smi": smi, "bank": list(bank.shape), "runs": {}}
    rows: list[tuple[str, str, dict[str, list[float]]]] = []

    # 1. The ONNX model as the daemon runs it, with the first GPU kNN found.
    t = time_stages([("embed", ort_embed), ("knn", lambda f: knn(band(f))), ("map", to_map)], frame, args.frames, sync)
    rows.append(("ONNX model", f"embed: {embed_how}; kNN: {knn_how}; map: {map_how}", t))
    ref_feats = to_numpy(ort_embed(frame))

    # 2. Every GPU kNN backend on the ONNX features: time, and exactness against float64 NumPy.
    q = np.ascontiguousarray(band(ref_feats))
    sample = q[rng.choice(len(q), size=2048, replace=False)].astype(np.float64)
    b64 = bank.astype(np.float64)
    exact = np.sqrt(
        np.maximum(((sample**2).sum(1)[:, None] - 2 * sample @ b64.T + (b64**2).sum(1)[None]).min(axis=1), 0)
    )
    knn_rows = []
    for name, (how, fn) in knn_backends.items():
        dev_q = cp.asarray(q) if has_cupy else torch.as_tensor(q, device=dev)
        kt = time_stages([("knn", fn)], dev_q, args.frames, sync)["knn"]
        got = to_numpy(fn(cp.asarray(sample.astype(np.float32)) if has_cupy else sample.astype(np.float32)))
        err = float(np.max(np.abs(got - exact)) / np.max(exact))
        knn_rows.append((how, kt, err))
        report["runs"][f"knn_{name}"] = {"how": how, "seconds": kt, "max_error_relative_to_max": err}

    # 3. The same network in torch on the GPU, fp32 and fp16, and a naive anomalib-style reference.
    ratio_line = ""
    if has_torch and not args.no_torch:
        torch.backends.cudnn.benchmark = True
        net = torch_feature_net(args.bundle, torch, dev)

        def torch_embed(dtype: Any) -> Callable[[np.ndarray], Any]:
            @torch.no_grad()
            def run(x: np.ndarray) -> Any:
                pixels = torch.from_numpy(x).to(dev, non_blocking=True)
                if dtype is torch.float32:
                    return net(pixels)
                with torch.autocast(dev, dtype=dtype):
                    return net(pixels).float()

            return run

        for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            embed_fn = torch_embed(dtype)
            feats = embed_fn(frame)
            err = rel_err(to_numpy(feats), ref_feats.astype(np.float64))
            score_err = rel_err(to_numpy(knn(band(feats))), to_numpy(knn(band(ref_feats))).astype(np.float64))
            t = time_stages(
                [("embed", embed_fn), ("knn", lambda f: knn(band(f))), ("map", to_map)], frame, args.frames, sync
            )
            how = (
                f"embed: torch {torch.__version__} CUDA {label}"
                f"{' autocast' if label == 'fp16' else ''}, channels_last, cuDNN autotune; kNN: {knn_how}; "
                f"map: {map_how}"
            )
            rows.append((f"torch network {label}", how, t))
            report["runs"][f"torch_{label}"] = {
                "how": how,
                "seconds": t,
                "feature_relative_error_vs_onnx": err,
                "patch_score_relative_error_vs_onnx": score_err,
            }
            print(f"torch {label}: features vs ONNX relative error {err:.2e}, patch scores {score_err:.2e}")

        naive_t = naive_reference(
            torch, dev, net, bank, frame[0, CONTEXT : CONTEXT + LINES, :, 0], args.frames, smooth, sync
        )
        rows.append(
            ("naive reference", "torch CUDA fp32 eager, 256 px tiles, torch.cdist, upsample + Gaussian", naive_t)
        )
        report["runs"]["naive"] = {"seconds": naive_t}
        best = min((float(np.median(r[2]["total"])), r[0]) for r in rows if r[0] != "naive reference")
        ratio = float(np.median(naive_t["total"])) / best[0]
        ratio_line = f"fastest ({best[1]}) vs naive reference, same run: {ratio:.1f}x"
        report["ratio_fastest_vs_naive"] = ratio

    print(
        f"\n`python benchmarks/gpu_speed.py --bundle {args.bundle} --frames {args.frames}` on {gpu_name}, "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{args.width} px x {LINES} new lines (+{2 * CONTEXT} context), bank {bank.shape[0]:,} x {bank.shape[1]}\n")
    print("| run | stage | p50 ms | p95 ms | p99 ms | Mpx/s |\n|---|---|---|---|---|---|")
    for label, _how, t in rows:
        mpx = LINES * args.width / float(np.median(t["total"])) / 1e6
        for stage in [s for s in t if s != "total"]:
            print(f"| {label} | {stage} | {pct(t[stage])} | |")
        print(f"| {label} | **frame, stages in sequence** | {pct(t['total'])} | {mpx:.1f} |")
    print()
    for label, how, _ in rows:
        print(f"- {label}: {how}")
    print("\nkNN alone on one frame's band of ONNX features (exactness: max |d - d_float64| / max d, 2,048 queries)\n")
    print("| kNN | p50 ms | p95 ms | p99 ms | error |\n|---|---|---|---|---|")
    for how, kt, err in knn_rows:
        print(f"| {how} | {pct(kt)} | {err:.1e} |")
    if ratio_line:
        print(f"\n{ratio_line}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def naive_reference(
    torch: Any,
    dev: str,
    net: Any,
    bank: np.ndarray,
    image: np.ndarray,
    frames: int,
    smooth: Callable[[Any], Any],
    sync: Callable[[], None],
) -> dict[str, list[float]]:
    """anomalib's way on the GPU: 256 px tiles embedded without overlap handling, batch 8, fp32
    eager, distances to the whole bank by torch.cdist, upsampling and Gaussian per tile."""
    import torch.nn.functional as F

    t = 256
    tb = torch.from_numpy(bank).to(dev)
    h, w = image.shape

    @torch.no_grad()
    def score(img: np.ndarray) -> Any:
        tiles = torch.from_numpy(img).to(dev).reshape(h // t, t, w // t, t).permute(0, 2, 1, 3).reshape(-1, t, t, 1)
        maps = []
        for i in range(0, tiles.shape[0], 8):
            feats = net(tiles[i : i + 8])
            n, gh, gw, d = feats.shape
            dist = torch.cdist(feats.reshape(-1, d), tb).min(dim=1).values.reshape(n, 1, gh, gw)
            maps.append(smooth(F.interpolate(dist, size=(t, t), mode="bilinear", align_corners=False))[:, 0])
        return torch.cat(maps)

    return time_stages([("naive", score)], image, frames, sync)


if __name__ == "__main__":
    main()
