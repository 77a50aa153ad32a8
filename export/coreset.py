"""Greedy k-center coreset selection (PatchCore, sec. 3.2, Algorithm 1).

PatchCore picks the memory bank by greedy k-center (Gonzalez) on features randomly projected
to 128 dims (Johnson-Lindenstrauss). The textbook loop updates the distance of every point to
its nearest center after each pick, one vector at a time, which is what makes anomalib's
coreset take minutes. This implementation returns the same picks (up to ties), but picks many
centers per pass over the data, proving each one exact with a bound (see ``greedy_kcenter``),
and updates all distances for the whole batch with one matrix product.

Large training sets are reduced chunk by chunk and the union of the chunk coresets is reduced
again (a composable coreset for k-center), so memory stays bounded by the chunk size.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import StripinspectError


class CoresetError(StripinspectError):
    """Bad arguments to coreset selection."""


def _sq_dist_to(x: np.ndarray, sq: np.ndarray, c: int) -> np.ndarray:
    # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b, so each update is one matrix product (BLAS).
    return np.maximum(sq + sq[c] - 2.0 * (x @ x[c]), 0.0)


def greedy_kcenter(
    points: np.ndarray,
    m: int,
    *,
    seed: int,
    candidates: int = 4096,
    max_batch: int = 512,
    block_rows: int = 65536,
) -> np.ndarray:
    """Indices of m points chosen by greedy k-center, starting from a seeded random point.

    ``points``: float (n, d). Same picks as the textbook loop up to ties and float32 rounding.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise CoresetError(f"points must be a non-empty (n, d) array, got shape {points.shape}")
    n = points.shape[0]
    if not 1 <= m <= n:
        raise CoresetError(f"cannot pick {m} centers from {n} points")
    if not np.isfinite(points).all():
        raise CoresetError("points contain NaN or inf")
    x = np.ascontiguousarray(points, dtype=np.float32)
    sq = np.einsum("ij,ij->i", x, x)
    first = int(np.random.default_rng(seed).integers(n))
    mind = _sq_dist_to(x, sq, first)  # squared distance of every point to its nearest center
    mind[first] = 0.0
    picked = [first]
    while len(picked) < m:
        # Lazy exact batching: the T points with the largest (stale) distance are candidates and
        # tau, the (T+1)-th largest, bounds every other point. A candidate whose distance, updated
        # for the centers picked in this round, is still >= tau is exactly the next greedy pick.
        t = min(candidates, n - 1)
        part = np.argpartition(mind, n - t - 1)
        cand = part[n - t :]
        tau = mind[part[n - t - 1]]
        cvals = mind[cand]
        cx, csq = x[cand], sq[cand]
        new: list[int] = []
        while len(picked) + len(new) < m and len(new) < max_batch:
            j = int(np.argmax(cvals))
            if new and cvals[j] < tau:
                break
            c = int(cand[j])
            new.append(c)
            cvals = np.minimum(cvals, np.maximum(csq + sq[c] - 2.0 * (cx @ x[c]), 0.0))
            cvals[j] = 0.0
        centers, csq_new = x[new], sq[new]
        for s in range(0, n, block_rows):
            d2 = sq[s : s + block_rows, None] + csq_new[None, :] - 2.0 * (x[s : s + block_rows] @ centers.T)
            np.minimum(mind[s : s + block_rows], d2.min(axis=1), out=mind[s : s + block_rows])
        np.maximum(mind, 0.0, out=mind)
        mind[new] = 0.0
        picked.extend(new)
    return np.asarray(picked, dtype=np.int64)


def greedy_kcenter_reference(points: np.ndarray, m: int, *, seed: int) -> np.ndarray:
    """The textbook loop, kept as the oracle the fast version is tested against."""
    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    first = int(np.random.default_rng(seed).integers(n))
    picked = [first]
    mind = np.linalg.norm(x - x[first], axis=1)
    for _ in range(1, m):
        q = int(np.argmax(mind))
        picked.append(q)
        mind = np.minimum(mind, np.linalg.norm(x - x[q], axis=1))
    return np.asarray(picked, dtype=np.int64)


def random_projection(dim_in: int, dim_out: int, *, seed: int) -> np.ndarray | None:
    """Gaussian JL projection matrix (dim_in, dim_out), or None when it would not reduce."""
    if dim_out >= dim_in:
        return None
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / math.sqrt(dim_out)).astype(np.float32)


class StreamingCoreset:
    """Feeds patch features in bounded chunks and keeps a greedy k-center coreset of each.

    The total number of patches is known up front (from the image sizes), so each chunk keeps
    its share of the final budget times ``oversample``; ``finish()`` reduces the union of the
    chunk coresets to ``final_rows`` and returns them, float32 (final_rows, dim).
    """

    def __init__(
        self,
        *,
        dim: int,
        total_patches: int,
        final_rows: int,
        oversample: float,
        chunk_patches: int,
        projection_dim: int,
        seed: int,
    ) -> None:
        if dim < 1 or total_patches < 1 or final_rows < 1 or oversample < 1.0 or chunk_patches < 1:
            raise CoresetError(
                f"bad coreset arguments dim={dim} total_patches={total_patches} final_rows={final_rows} "
                f"oversample={oversample} chunk_patches={chunk_patches}"
            )
        self.dim = dim
        self.final_rows = min(final_rows, total_patches)
        self.keep_fraction = min(1.0, oversample * self.final_rows / total_patches)
        self.chunk_patches = chunk_patches
        self.union_cap = max(chunk_patches, math.ceil(2 * oversample * self.final_rows))
        self.seed = seed
        self.projection = random_projection(dim, projection_dim, seed=seed)
        self._buffer = np.empty((min(chunk_patches, total_patches), dim), dtype=np.float32)
        self._fill = 0
        self._kept: list[np.ndarray] = []
        self._kept_rows = 0
        self._chunks = 0
        self.patches_seen = 0

    def _project(self, x: np.ndarray) -> np.ndarray:
        return x if self.projection is None else x @ self.projection

    def add(self, features: np.ndarray) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim or features.dtype != np.float32:
            raise CoresetError(f"features must be float32 (n, {self.dim}), got {features.dtype} {features.shape}")
        if not np.isfinite(features).all():
            raise CoresetError("features contain NaN or inf")
        self.patches_seen += features.shape[0]
        start = 0
        while start < features.shape[0]:
            take = min(self._buffer.shape[0] - self._fill, features.shape[0] - start)
            self._buffer[self._fill : self._fill + take] = features[start : start + take]
            self._fill += take
            start += take
            if self._fill == self._buffer.shape[0]:
                self._reduce_buffer()

    def _reduce_buffer(self) -> None:
        if self._fill == 0:
            return
        chunk = self._buffer[: self._fill]
        m = max(1, math.ceil(self.keep_fraction * self._fill))
        if m < self._fill:
            idx = np.sort(greedy_kcenter(self._project(chunk), m, seed=self.seed + self._chunks))
            chunk = chunk[idx]
        self._kept.append(chunk.copy())
        self._kept_rows += chunk.shape[0]
        self._chunks += 1
        self._fill = 0
        # Merge and reduce: bounds the union when the planned patch count was too low.
        if self._kept_rows > self.union_cap:
            union = np.concatenate(self._kept)
            m = max(self.final_rows, self._kept_rows // 2)
            idx = np.sort(greedy_kcenter(self._project(union), m, seed=self.seed + self._chunks))
            self._kept = [union[idx]]
            self._kept_rows = m

    def finish(self) -> np.ndarray:
        self._reduce_buffer()
        if not self._kept:
            raise CoresetError("no features were added")
        union = np.concatenate(self._kept)
        self._kept = []
        if self.final_rows >= union.shape[0]:
            return np.ascontiguousarray(union)
        # Rows stay in greedy order: the first k rows are themselves the greedy k-center coreset
        # of size k, so a smaller bank is a prefix of a larger one.
        idx = greedy_kcenter(self._project(union), self.final_rows, seed=self.seed + 7919)
        return np.ascontiguousarray(union[idx])


def reduce_union(parts: list[np.ndarray], rows: int, *, projection_dim: int, seed: int) -> np.ndarray:
    """Greedy k-center of ``rows`` rows from the union of coresets ``parts`` (composable coreset),
    in greedy order, float32 (rows, dim); the union itself when it has at most ``rows`` rows."""
    if not parts:
        raise CoresetError("no coresets to reduce")
    union = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    if rows >= union.shape[0]:
        return union
    projection = random_projection(union.shape[1], projection_dim, seed=seed)
    idx = greedy_kcenter(union if projection is None else union @ projection, rows, seed=seed + 7919)
    return np.ascontiguousarray(union[idx])
