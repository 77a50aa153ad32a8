"""Thin adapter over the faiss index that holds the memory bank."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from pipeline.errors import StripinspectError

INDEX_TYPES = ("flat",)


class KnnError(StripinspectError):
    """The index cannot be built, read or searched as asked."""


def build_index(vectors: np.ndarray, kind: str) -> faiss.Index:
    """A faiss index over the memory bank rows, float32 (rows, dim)."""
    if kind not in INDEX_TYPES:
        raise KnnError(f"unknown index type {kind!r}; known: {', '.join(INDEX_TYPES)}")
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.dtype != np.float32:
        raise KnnError(f"bank must be non-empty float32 (rows, dim), got {vectors.dtype} {vectors.shape}")
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors))
    return index


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


class FaissIndex:
    """Memory bank searcher: Euclidean distances (not squared) to the k nearest bank rows."""

    def __init__(self, *, path: Path, dim: int, rows: int, threads: int) -> None:
        if threads < 1:
            raise KnnError(f"threads must be >= 1, got {threads}")
        if not Path(path).is_file():
            raise KnnError(f"index file not found: {path}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise KnnError(f"cannot read faiss index {path}: {str(err).splitlines()[0]}") from None
        if index.d != dim:
            raise KnnError(f"index has dim {index.d}, manifest says {dim}")
        if index.ntotal != rows:
            raise KnnError(f"index has {index.ntotal} rows, manifest says {rows}")
        faiss.omp_set_num_threads(threads)
        self._index = index
        self.dim = dim
        self.rows = rows
        # The bank is small (rows x dim float32); PatchCore's image score needs its rows.
        self.vectors = index.reconstruct_n(0, rows).astype(np.float32, copy=False)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 (n, dim) -> distances float32 (n, k), row ids int64 (n, k)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}), got {queries.shape}")
        if not 1 <= k <= self.rows:
            raise ValueError(f"k must be in [1, {self.rows}], got {k}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        d2, ids = self._index.search(q, k)
        return np.sqrt(np.maximum(d2, 0.0, out=d2), out=d2), ids
