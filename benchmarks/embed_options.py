"""onnxruntime settings for the embed stage, side by side in one run (issue 5).

    python benchmarks/embed_options.py [--bundle runs/bench/bundle_2048] [--repeat 5]

One 2048 x 1408-line frame (1024 new lines + CNN context) of the synthetic strip, embedded by
the bundle's model under each setting: threads, graph optimisation level, memory arena, idle
spinning (alone, and while a kNN search runs in another thread, as in the daemon), and static
int8 quantisation calibrated on normal frames (onnxruntime.quantization, QDQ, per-channel
weights), with the int8 features' error against float32. Needs the bundle of
benchmarks/speed.py (it fits one when missing).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.acquisition.synthetic import SyntheticStrip
from pipeline.config import KnnConfig
from pipeline.inference.embed import OnnxEmbedder
from pipeline.inference.knn import FaissIndex


def timed(embedder: OnnxEmbedder, frame: np.ndarray, repeat: int, busy: FaissIndex | None, q: np.ndarray) -> float:
    stop = threading.Event()

    def search() -> None:
        while not stop.is_set() and busy is not None:
            busy.search(q, 1)

    t = threading.Thread(target=search)
    t.start()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        embedder.embed(frame)
        times.append(time.perf_counter() - t0)
    stop.set()
    t.join()
    return float(np.median(times))


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """Mean feature-vector error relative to the mean feature norm."""
    return float(np.linalg.norm(got - want, axis=-1).mean() / np.linalg.norm(want, axis=-1).mean())


def quantized(model: Path, out: Path, width: int) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    strip = SyntheticStrip(width=width, seed=7)
    frames = [strip.render(i * 2048, 512)[0][None, :, :, None] for i in range(6)]  # normal strip

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(frames)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {"pixels": x}

    pre = out / "pre.onnx"
    quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
    q = out / "int8.onnx"
    quantize_static(
        str(pre),
        str(q),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("runs/bench/bundle_2048"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not (args.bundle / "model.onnx").is_file():
        from speed import ensure_bundle

        ensure_bundle(args.bundle.parent, 2048)
    model = args.bundle / "model.onnx"
    frame = SyntheticStrip(width=2048, seed=7).render(9_000_000, 1408)[0][None, :, :, None]
    index = FaissIndex(path=args.bundle / "index.faiss", dim=152, rows=16_384, threads=2, knn=KnnConfig(index="ivf"))

    def make(path: Path = model, **kw: Any) -> OnnxEmbedder:
        params: dict[str, Any] = {"threads": 2, "optimization": "all", "arena": True, "spinning": False, **kw}
        return OnnxEmbedder(model_path=path, embedding_dim=152, input_channels=1, **params)

    base = make()
    feats = base.embed(frame)
    q = np.ascontiguousarray(feats[0, 24:-24].reshape(-1, 152))
    rows: list[tuple[str, dict[str, Any]]] = [
        ("threads 2, optimisation all, arena, no spinning (default)", {}),
        ("threads 1", {"threads": 1}),
        ("optimisation basic", {"optimization": "basic"}),
        ("optimisation extended", {"optimization": "extended"}),
        ("no memory arena", {"arena": False}),
        ("spinning", {"spinning": True}),
    ]
    print(f"`python benchmarks/embed_options.py --repeat {args.repeat}`, onnxruntime {ort.__version__}")
    print("\n| setting | embed ms, alone | embed ms, kNN running beside | feature error vs default |")
    print("|---|---|---|---|")
    for name, kw in rows:
        e = make(**kw)
        alone = timed(e, frame, args.repeat, None, q)
        beside = timed(e, frame, args.repeat, index, q)
        print(f"| {name} | {1000 * alone:.0f} | {1000 * beside:.0f} | {100 * rel_error(e.embed(frame), feats):.4f} % |")
    with tempfile.TemporaryDirectory() as tmp:
        q8 = make(quantized(model, Path(tmp), 2048))
        f8 = q8.embed(frame)
        err = rel_error(f8, feats)
        alone = timed(q8, frame, args.repeat, None, q)
        beside = timed(q8, frame, args.repeat, index, q)
        print(f"| static int8 (QDQ, per-channel) | {1000 * alone:.0f} | {1000 * beside:.0f} | {100 * err:.1f} % |")


if __name__ == "__main__":
    main()
