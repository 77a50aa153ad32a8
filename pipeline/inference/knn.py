"""Thin adapter over faiss: the memory bank and the structure that searches it.

The bundle stores the bank exactly (a flat index, ``index.faiss``). How it is searched is a
runtime choice (``runtime.knn``), built from the bank when the bundle is opened: exact flat
search, IVF-flat, HNSW or IVF-PQ on the CPU, or exact search on a GPU (faiss-gpu, else a
matrix product in CuPy). Changing the search never needs a refit, and the exact bank is always
at hand for PatchCore's image-score re-weighting (eq. 7) and for measuring recall.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.config import KnnConfig
from pipeline.errors import StripinspectError
from pipeline.inference.matmul_knn import MatmulBank

INDEX_TYPES = ("flat",)
# faiss' k-means wants at least this many training points per centroid (it warns below 39).
_MIN_POINTS_PER_LIST = 39


class KnnError(StripinspectError):
    """The index cannot be built, read or searched as asked."""


def build_index(vectors: np.ndarray, kind: str) -> faiss.Index:
    """The bank as stored in a bundle: an exact faiss index over float32 (rows, dim)."""
    if kind not in INDEX_TYPES:
        raise KnnError(f"unknown index type {kind!r}; known: {', '.join(INDEX_TYPES)}")
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.dtype != np.float32:
        raise KnnError(f"bank must be non-empty float32 (rows, dim), got {vectors.dtype} {vectors.shape}")
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors))
    return index


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def ivf_lists(rows: int, requested: int | None) -> int:
    """IVF cells: the configured number, else 4 sqrt(rows) (faiss' guideline), never fewer than
    the k-means needs points for."""
    n = requested if requested is not None else round(4 * float(np.sqrt(rows)))
    return max(1, min(n, rows // _MIN_POINTS_PER_LIST))


def build_search_index(bank: np.ndarray, knn: KnnConfig) -> faiss.Index:
    """The CPU search structure of ``knn.index`` over the bank rows (float32 (rows, dim))."""
    rows, dim = bank.shape
    if knn.index == "flat":
        flat = faiss.IndexFlatL2(dim)
        flat.add(bank)
        return flat
    if knn.index == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, knn.hnsw_m)
        hnsw.hnsw.efConstruction = knn.ef_construction
        hnsw.hnsw.efSearch = knn.ef_search
        hnsw.add(bank)
        return hnsw
    if knn.index not in ("ivf", "ivfpq"):  # pragma: no cover - the config's Literal rejects it first
        raise KnnError(f"unknown knn.index {knn.index!r}")
    nlist = ivf_lists(rows, knn.nlist)
    quantizer = faiss.IndexFlatL2(dim)
    if knn.index == "ivf":
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist)
        ivf.cp.seed = knn.seed
        ivf.train(bank)
        ivf.nprobe = min(knn.nprobe, nlist)
        ivf.add(bank)
        return ivf
    if dim % knn.pq_m:
        raise KnnError(f"knn.pq_m = {knn.pq_m} must divide the embedding dim {dim}")
    # 8-bit codes need 256 centroids per sub-quantiser, trained on at least 39 x 256 rows.
    bits = 8 if rows >= 256 * _MIN_POINTS_PER_LIST else 4 if rows >= 16 * _MIN_POINTS_PER_LIST else 2
    pq = faiss.IndexIVFPQ(quantizer, dim, nlist, knn.pq_m, bits)
    pq.cp.seed = knn.seed
    pq.pq.cp.seed = knn.seed
    pq.train(bank)
    pq.nprobe = min(knn.nprobe, nlist)
    # PQ distances are to compressed codes: re-rank refine x k candidates on the exact rows.
    refined = faiss.IndexRefineFlat(pq)
    refined.k_factor = float(knn.refine)
    refined.add(bank)
    return refined


class _GpuSearch:
    """Exact search on a CUDA GPU: faiss-gpu when installed, else a CuPy matrix product."""

    def __init__(self, bank: np.ndarray) -> None:
        self.backend = ""
        self._faiss_gpu: Any = None
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._res = faiss.StandardGpuResources()
            cpu = faiss.IndexFlatL2(bank.shape[1])
            cpu.add(bank)
            self._faiss_gpu = faiss.index_cpu_to_gpu(self._res, 0, cpu)
            self.backend = "faiss-gpu flat"
            return
        try:
            self._cp = importlib.import_module("cupy")
            if self._cp.cuda.runtime.getDeviceCount() < 1:
                raise KnnError("CuPy sees no CUDA device")
        except ImportError:
            raise KnnError("knn.device is cuda but neither faiss-gpu nor CuPy is installed") from None
        except Exception as err:  # CuPy raises its own CUDARuntimeError when no driver is present
            raise KnnError(f"knn.device is cuda but CUDA is not usable: {str(err).splitlines()[0]}") from None
        self._matmul = MatmulBank(self._cp, bank)
        self.backend = "cupy matmul"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._faiss_gpu is not None:
            d2, ids = self._faiss_gpu.search(queries, k)
            return d2, ids
        cp = self._cp
        d2, ids = self._matmul.search(cp.asarray(queries), k)
        return cp.asnumpy(d2).astype(np.float32), cp.asnumpy(ids).astype(np.int64)


class FaissIndex:
    """Memory bank searcher: Euclidean distances (not squared) to the k nearest bank rows."""

    @classmethod
    def from_bank(cls, bank: np.ndarray, *, threads: int, knn: KnnConfig) -> FaissIndex:
        """Search structure over bank rows in memory (benchmarks compare choices on one bank)."""
        obj = cls.__new__(cls)
        obj._setup(np.ascontiguousarray(bank, dtype=np.float32), threads=threads, knn=knn)
        return obj

    def __init__(self, *, path: Path, dim: int, rows: int, threads: int, knn: KnnConfig | None = None) -> None:
        if not Path(path).is_file():
            raise KnnError(f"index file not found: {path}")
        try:
            stored = faiss.read_index(str(path))
        except RuntimeError as err:
            raise KnnError(f"cannot read faiss index {path}: {str(err).splitlines()[0]}") from None
        if stored.d != dim:
            raise KnnError(f"index has dim {stored.d}, manifest says {dim}")
        if stored.ntotal != rows:
            raise KnnError(f"index has {stored.ntotal} rows, manifest says {rows}")
        # The bank is small (rows x dim float32); PatchCore's image score needs its rows.
        bank = np.ascontiguousarray(stored.reconstruct_n(0, rows), dtype=np.float32)
        self._setup(bank, threads=threads, knn=knn if knn is not None else KnnConfig())

    def _setup(self, bank: np.ndarray, *, threads: int, knn: KnnConfig) -> None:
        if threads < 1:
            raise KnnError(f"threads must be >= 1, got {threads}")
        # faiss aborts the process (no exception) when k-means or distances meet inf or NaN: a
        # corrupt bank must be refused here, in Python. Squared norms must fit in float32.
        if not np.isfinite(4.0 * np.einsum("ij,ij->i", bank, bank)).all():
            raise KnnError("bank rows are not finite or too large (corrupt index?)")
        faiss.omp_set_num_threads(threads)
        self.knn = knn
        self.rows, self.dim = bank.shape
        self.vectors = bank
        self._exact = faiss.IndexFlatL2(self.dim)
        self._exact.add(self.vectors)
        self._gpu: _GpuSearch | None = None
        self._index: faiss.Index
        if self.knn.device == "cuda":
            self._gpu = _GpuSearch(self.vectors)
            self._index = self._exact
            self.backend = self._gpu.backend
        else:
            self._index = self._exact if self.knn.index == "flat" else build_search_index(self.vectors, self.knn)
            self.backend = f"faiss-cpu {self.knn.index}"

    def search(
        self, queries: np.ndarray, k: int, *, rank: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 (n, dim) -> distances float32 (n, k), row ids int64 (n, k), by the
        configured search (approximate for ivf, hnsw and ivfpq). ``rank`` maps the nearest
        distances (n,) to the values whose top ``exact_top`` must be exact (default: the
        distances themselves; per-position z-scores when those decide)."""
        q = self._check(queries, k)
        d2, ids = self._gpu.search(q, k) if self._gpu is not None else self._index.search(q, k)
        missed = np.flatnonzero((ids < 0).any(axis=1))
        if missed.size:
            # IVF: the probed cells held fewer than k rows; search those queries exhaustively.
            d2[missed], ids[missed] = self._exact.search(q[missed], k)
        if self.knn.index != "flat" and self._gpu is None and self.knn.exact_top > 0 and len(q) > 1:
            self._exact_top(q, d2, ids, k, rank)
        return np.sqrt(np.maximum(d2, 0.0, out=d2), out=d2), ids

    def _exact_top(
        self, q: np.ndarray, d2: np.ndarray, ids: np.ndarray, k: int, rank: Callable[[np.ndarray], np.ndarray] | None
    ) -> None:
        # An approximate neighbour is a real bank row, so its distance can only over-estimate a
        # patch score. The highest scores decide defects and the image score: search them again
        # exhaustively until the top fraction holds exact scores only (HNSW can miss badly on
        # far-off queries; a re-searched score may drop and let another one into the top).
        n = len(q)
        n_top = max(1, int(np.ceil(self.knn.exact_top * n)))
        exact = np.zeros(n, dtype=bool)
        for _ in range(16):
            key = d2[:, 0] if rank is None else rank(np.sqrt(np.maximum(d2[:, 0], 0.0)))
            top = np.argpartition(key, n - n_top)[n - n_top :]
            todo = top[~exact[top]]
            if todo.size == 0:
                return
            d2[todo], ids[todo] = self._exact.search(q[todo], k)
            exact[todo] = True

    def search_exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive search over the bank on the CPU: the reference for recall, and N_b(m*)."""
        q = self._check(queries, k)
        d2, ids = self._exact.search(q, k)
        return np.sqrt(np.maximum(d2, 0.0, out=d2), out=d2), ids

    def _check(self, queries: np.ndarray, k: int) -> np.ndarray:
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}), got {queries.shape}")
        if not 1 <= k <= self.rows:
            raise ValueError(f"k must be in [1, {self.rows}], got {k}")
        return np.ascontiguousarray(queries, dtype=np.float32)
