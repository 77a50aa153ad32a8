"""Exact k-NN by one matrix product in any NumPy-like array module (CuPy on a GPU).

Kept free of faiss so that a GPU machine without faiss can run it (benchmarks/gpu_speed.py).
"""

from __future__ import annotations

from typing import Any

# Largest distance matrix computed at once (bytes): queries are taken in chunks under it.
CHUNK_BYTES = 1 << 30


class MatmulBank:
    """Exact k-NN against a fixed bank by one matrix product per chunk of queries.

    ||q - b||^2 = ||q||^2 + (||b||^2 - 2 q.b). The bracket comes out of a single GEMM of the
    queries with an extra column of ones against the bank stored as [-2 b, ||b||^2], so the
    distance matrix is written once and read once (by the arg-min); ||q||^2 is added only to
    the k winners. ``xp`` is the array module: CuPy on a GPU, NumPy in tests.
    """

    def __init__(self, xp: Any, bank: Any) -> None:
        self.xp = xp
        b = xp.asarray(bank, dtype=xp.float32)
        self.rows = int(b.shape[0])
        self._aug = xp.ascontiguousarray(xp.concatenate([-2.0 * b, (b * b).sum(axis=1, keepdims=True)], axis=1).T)
        self.chunk = max(256, CHUNK_BYTES // (4 * max(self.rows, 1)))

    def search(self, queries: Any, k: int) -> tuple[Any, Any]:
        """Squared distances (n, k) ascending and bank row ids (n, k), as arrays of ``xp``."""
        xp = self.xp
        q = xp.asarray(queries, dtype=xp.float32)
        if len(q) > self.chunk:
            parts = [self.search(q[i : i + self.chunk], k) for i in range(0, len(q), self.chunk)]
            return xp.concatenate([p[0] for p in parts]), xp.concatenate([p[1] for p in parts])
        q_aug = xp.concatenate([q, xp.ones((len(q), 1), dtype=xp.float32)], axis=1)
        part = q_aug @ self._aug  # ||b||^2 - 2 q.b, (n, rows)
        if k == 1:
            ids = xp.argmin(part, axis=1)[:, None]
        else:
            cand = xp.argpartition(part, k - 1, axis=1)[:, :k]
            order = xp.argsort(xp.take_along_axis(part, cand, axis=1), axis=1)
            ids = xp.take_along_axis(cand, order, axis=1)
        d2 = xp.take_along_axis(part, ids, axis=1) + (q * q).sum(axis=1, keepdims=True)
        return xp.maximum(d2, 0.0), ids
