"""Exact k-NN by one matrix product in any NumPy-like array module (CuPy on a GPU).

Kept free of faiss so that a GPU machine without faiss can run it (benchmarks/gpu_speed.py).
"""

from __future__ import annotations

from typing import Any


def matmul_search(xp: Any, bank: Any, bank_sq: Any, queries: Any, k: int, chunk: int = 8192) -> tuple[Any, Any]:
    """Exact k-NN by one matrix product, in array module ``xp`` (CuPy on a GPU; NumPy in tests).

    ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2, ``chunk`` queries at a time so that the distance
    matrix stays small (8192 x 16,384 float32 = 512 MiB). Returns squared distances (n, k)
    ascending and row ids (n, k).
    """
    if len(queries) > chunk:
        parts = [
            matmul_search(xp, bank, bank_sq, queries[i : i + chunk], k, chunk) for i in range(0, len(queries), chunk)
        ]
        return xp.concatenate([p[0] for p in parts]), xp.concatenate([p[1] for p in parts])
    d2 = (queries * queries).sum(axis=1, keepdims=True) - 2.0 * (queries @ bank.T) + bank_sq[None, :]
    if k == 1:
        ids = xp.argmin(d2, axis=1)[:, None]
    else:
        part = xp.argpartition(d2, k - 1, axis=1)[:, :k]
        order = xp.argsort(xp.take_along_axis(d2, part, axis=1), axis=1)
        ids = xp.take_along_axis(part, order, axis=1)
    return xp.maximum(xp.take_along_axis(d2, ids, axis=1), 0.0), ids
