"""Thin adapter over the onnxruntime session of the patch-feature graph.

The same class embeds training images in ``export/`` and frames in the daemon, so what was
fitted is what runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.config import RuntimeConfig
from pipeline.errors import StripinspectError

INPUT_NAME = "pixels"
OUTPUT_NAME = "features"
# The graph mirrors up to border_pad pixels outwards (ONNX reflect Pad needs pad < side).
MIN_SIDE = 48


_OPT_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class EmbedderError(StripinspectError):
    """The ONNX model cannot be used (missing, wrong inputs or outputs, no provider)."""


def provider_options(providers: Sequence[str], *, fp16: bool, trt_cache_dir: Path | None) -> list[dict[str, str]]:
    """onnxruntime options per provider, in the order of ``providers``."""
    out: list[dict[str, str]] = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            trt = {"trt_fp16_enable": str(fp16), "trt_max_workspace_size": str(4 << 30)}
            if trt_cache_dir is not None:
                trt |= {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(trt_cache_dir)}
            out.append(trt)
        elif p == "CUDAExecutionProvider":
            # Frames keep one size: search the fastest convolution algorithms once, then reuse them.
            out.append({"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "True"})
        else:
            out.append({})
    return out


class OnnxEmbedder:
    """uint8 pixels (N, H, W, C) -> float32 patch features (N, h, w, D), C-contiguous."""

    def __init__(
        self,
        *,
        model_path: Path,
        embedding_dim: int,
        input_channels: int | None,
        threads: int,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        warmup_hw: tuple[int, int] | None = (64, 64),
        optimization: str = "all",
        arena: bool = True,
        spinning: bool = False,
        gpu_fp16: bool = True,
        trt_cache_dir: Path | None = None,
    ) -> None:
        if threads < 1:
            raise EmbedderError(f"threads must be >= 1, got {threads}")
        if embedding_dim < 1:
            raise EmbedderError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if input_channels not in (None, 1, 3):
            raise EmbedderError(f"input_channels must be 1, 3 or None, got {input_channels}")
        if not Path(model_path).is_file():
            raise EmbedderError(f"ONNX model not found: {model_path}")
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available]
        if not chosen:
            raise EmbedderError(f"none of the providers {list(providers)} is available (have {sorted(available)})")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if optimization not in _OPT_LEVELS:
            raise EmbedderError(f"optimization must be one of {sorted(_OPT_LEVELS)}, got {optimization!r}")
        opts.graph_optimization_level = _OPT_LEVELS[optimization]
        opts.enable_cpu_mem_arena = arena
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self._session = ort.InferenceSession(
                str(model_path),
                sess_options=opts,
                providers=chosen,
                provider_options=provider_options(chosen, fp16=gpu_fp16, trt_cache_dir=trt_cache_dir),
            )
        except Exception as err:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise EmbedderError(f"cannot load ONNX model {model_path}: {str(err).splitlines()[0]}") from None
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME]:
            raise EmbedderError(f"model inputs are {[i.name for i in inputs]}, expected [{INPUT_NAME!r}]")
        if inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            raise EmbedderError(f"input {INPUT_NAME!r} is {inputs[0].type} {inputs[0].shape}, expected uint8 rank 4")
        if [o.name for o in outputs] != [OUTPUT_NAME]:
            raise EmbedderError(f"model outputs are {[o.name for o in outputs]}, expected [{OUTPUT_NAME!r}]")
        out_shape = outputs[0].shape
        if outputs[0].type != "tensor(float)" or len(out_shape) != 4:
            raise EmbedderError(f"output {OUTPUT_NAME!r} is {outputs[0].type} {out_shape}, expected float rank 4")
        if isinstance(out_shape[3], int) and out_shape[3] != embedding_dim:
            raise EmbedderError(f"model embeds {out_shape[3]} dims, manifest says {embedding_dim}")
        self.embedding_dim = embedding_dim
        self.input_channels = input_channels
        self.providers = tuple(self._session.get_providers())
        if warmup_hw is not None:
            # The first run allocates the arena and picks kernels; do it here, not on frame one.
            self.embed(np.zeros((1, *warmup_hw, input_channels or 3), dtype=np.uint8))

    @classmethod
    def for_runtime(
        cls, *, model_path: Path, embedding_dim: int, input_channels: int | None, runtime: RuntimeConfig
    ) -> OnnxEmbedder:
        """The embedder with every onnxruntime setting of ``runtime``: fitting and the daemon
        build it here, so what was fitted runs under the same session options."""
        return cls(
            model_path=model_path,
            embedding_dim=embedding_dim,
            input_channels=input_channels,
            threads=runtime.onnx_threads,
            providers=runtime.providers,
            optimization=runtime.onnx_optimization,
            arena=runtime.onnx_arena,
            spinning=runtime.onnx_spinning,
            gpu_fp16=runtime.gpu_fp16,
            trt_cache_dir=runtime.trt_cache_dir,
        )

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4:
            raise ValueError(
                f"pixels must be a uint8 array (N, H, W, C), got "
                f"{getattr(pixels, 'dtype', type(pixels).__name__)} {getattr(pixels, 'shape', '')}"
            )
        n, h, w, c = pixels.shape
        if n == 0 or h < MIN_SIDE or w < MIN_SIDE:
            raise ValueError(f"pixels shape {pixels.shape} too small (need N >= 1, H and W >= {MIN_SIDE})")
        expected = (1, 3) if self.input_channels is None else (self.input_channels,)
        if c not in expected:
            raise ValueError(f"pixels have {c} channels, the model was fitted on {expected[0]}")
        out = self._session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(pixels)})[0]
        if out.ndim != 4 or out.shape[0] != n:
            raise EmbedderError(f"model returned shape {out.shape} for {n} images")
        if out.shape[3] != self.embedding_dim:
            raise EmbedderError(f"model embeds {out.shape[3]} dims, manifest says {self.embedding_dim}")
        return np.ascontiguousarray(out, dtype=np.float32)
