"""Memory-bank search: every runtime.knn choice against exact search, on real faiss."""

from pathlib import Path

import faiss
import numpy as np
import pytest

from pipeline.config import KnnConfig
from pipeline.inference.knn import FaissIndex, KnnError, build_index, build_search_index, ivf_lists, write_index
from pipeline.inference.matmul_knn import MatmulBank


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    # Patch features are clustered (a surface has a few kinds of texture), not uniform noise.
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim)).astype(np.float32) * 4
    return (centres[rng.integers(0, 40, n)] + rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32)


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    bank = _clustered(12_000, 32, seed=0)
    path = tmp_path_factory.mktemp("knn") / "index.faiss"
    write_index(build_index(bank, "flat"), path)
    return path, bank


def _brute(bank: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((q[:, None, :] - bank[None, :, :]) ** 2).sum(axis=2)
    ids = np.argsort(d2, axis=1)[:, :k]
    return np.sqrt(np.take_along_axis(d2, ids, axis=1)), ids


@pytest.mark.parametrize(
    ("knn", "min_recall"),
    [
        (KnnConfig(index="flat"), 1.0),
        (KnnConfig(index="ivf", nprobe=32), 0.95),
        (KnnConfig(index="hnsw", ef_search=256), 0.95),
        (KnnConfig(index="ivfpq", pq_m=8, nprobe=32), 0.9),
    ],
    ids=["flat", "ivf", "hnsw", "ivfpq"],
)
def test_each_search_finds_the_nearest_row(
    bank_file: tuple[Path, np.ndarray], knn: KnnConfig, min_recall: float
) -> None:
    path, bank = bank_file
    index = FaissIndex(path=path, dim=32, rows=bank.shape[0], threads=1, knn=knn)
    q = _clustered(500, 32, seed=1)
    d, ids = index.search(q, 1)
    exact_d, exact_ids = _brute(bank, q, 1)
    recall = float((ids[:, 0] == exact_ids[:, 0]).mean())
    print(f"{knn.index}: recall@1 {recall:.3f}")
    assert recall >= min_recall
    assert ids.dtype == np.int64 and d.dtype == np.float32 and (ids >= 0).all()
    # Distances are true Euclidean distances to the rows returned (PQ ones re-ranked exactly),
    # so an approximate search can only over-estimate a patch score, never under-estimate it.
    true_d = np.linalg.norm(bank[ids[:, 0]] - q, axis=1)
    np.testing.assert_allclose(d[:, 0], true_d, rtol=1e-3, atol=1e-3)
    assert (d[:, 0] >= exact_d[:, 0] - 1e-3).all()
    np.testing.assert_allclose(index.search_exact(q, 3)[0], _brute(bank, q, 3)[0], rtol=1e-4, atol=1e-3)
    assert index.backend == f"faiss-cpu {knn.index}"


def test_ivf_queries_that_find_too_few_rows_are_searched_exactly(bank_file: tuple[Path, np.ndarray]) -> None:
    path, bank = bank_file
    # One probed cell of ~400 rows cannot hold 1000 neighbours: faiss pads with id -1.
    index = FaissIndex(path=path, dim=32, rows=bank.shape[0], threads=1, knn=KnnConfig(index="ivf", nprobe=1, nlist=30))
    q = _clustered(20, 32, seed=2)
    d, ids = index.search(q, 1000)
    assert (ids >= 0).all()
    np.testing.assert_allclose(d, _brute(bank, q, 1000)[0], rtol=1e-4, atol=1e-3)


def test_matmul_search_equals_faiss() -> None:
    # The GPU fallback's arithmetic, run with NumPy standing in for CuPy (no GPU here).
    bank = _clustered(3000, 24, seed=3)
    q = _clustered(200, 24, seed=4)
    mm = MatmulBank(np, bank)
    d2, ids = mm.search(q, 5)
    flat = faiss.IndexFlatL2(24)
    flat.add(bank)
    ref_d2, ref_ids = flat.search(q, 5)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-3, atol=1e-2)
    assert (ids == ref_ids).mean() > 0.99  # ties in float32 may swap
    mm.chunk = 64  # 4 chunks
    d1, ids1 = mm.search(q, 1)
    assert (ids1[:, 0] == ref_ids[:, 0]).all() and d1.shape == (200, 1)


def test_cuda_without_a_gpu_is_one_clear_error(bank_file: tuple[Path, np.ndarray]) -> None:
    path, bank = bank_file
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(KnnError, match="knn.device is cuda but"):
        FaissIndex(path=path, dim=32, rows=bank.shape[0], threads=1, knn=KnnConfig(device="cuda"))


def test_bad_search_settings_are_rejected(bank_file: tuple[Path, np.ndarray]) -> None:
    _, bank = bank_file
    with pytest.raises(KnnError, match="must divide the embedding dim 32"):
        build_search_index(bank, KnnConfig(index="ivfpq", pq_m=7))
    assert ivf_lists(1_000_000, None) == 4000  # 4 sqrt(rows)
    assert ivf_lists(16_384, None) == 420  # 4 sqrt(rows) = 512 would leave < 39 rows per cell
    assert ivf_lists(100, None) == 2  # never fewer than ~39 training rows per cell


def test_the_highest_approximate_scores_are_searched_again_exactly(bank_file: tuple[Path, np.ndarray]) -> None:
    path, bank = bank_file
    rng = np.random.default_rng(5)
    q = _clustered(2000, 32, seed=6)
    q[:20] += rng.standard_normal((20, 32)).astype(np.float32) * 6  # far-off patches: defects
    knn = KnnConfig(index="hnsw", hnsw_m=8, ef_search=8, exact_top=0.02)
    index = FaissIndex(path=path, dim=32, rows=bank.shape[0], threads=1, knn=knn)
    d, _ = index.search(q, 1)
    exact, _ = index.search_exact(q, 1)
    top = np.argsort(d[:, 0])[-40:]  # the 2 % re-searched
    np.testing.assert_allclose(d[top, 0], exact[top, 0], rtol=1e-5)
    assert d.max() == pytest.approx(exact.max(), rel=1e-5)
    sloppy = FaissIndex.from_bank(bank, threads=1, knn=knn.model_copy(update={"exact_top": 0.0}))
    d0, _ = sloppy.search(q, 1)
    print(f"worst over-estimate without the exact top: {float((d0[:, 0] / exact[:, 0]).max()):.2f}x")
    assert (d0[:, 0] > exact[:, 0] * 1.001).sum() > (d[:, 0] > exact[:, 0] * 1.001).sum()


def test_a_rank_chooses_which_scores_are_searched_again_exactly(bank_file: tuple[Path, np.ndarray]) -> None:
    # Per-position z-scores: a query whose position is quiet (small MAD) can rank first with a
    # modest distance; those are the scores that must be exact then, not the largest distances.
    path, bank = bank_file
    q = _clustered(2000, 32, seed=6)
    knn = KnnConfig(index="hnsw", hnsw_m=8, ef_search=8, exact_top=0.02)
    index = FaissIndex(path=path, dim=32, rows=bank.shape[0], threads=1, knn=knn)
    exact, _ = index.search_exact(q, 1)
    scale = np.random.default_rng(8).uniform(0.05, 1.0, len(q)).astype(np.float32)
    d, _ = index.search(q, 1, rank=lambda dist: dist / scale)
    top = np.argsort(d[:, 0] / scale)[-40:]
    np.testing.assert_allclose(d[top, 0], exact[top, 0], rtol=1e-5)
    plain, _ = index.search(q, 1)
    top_plain = np.argsort(plain[:, 0] / scale)[-40:]
    print(f"top by rank not exact without it: {int((plain[top_plain, 0] > exact[top_plain, 0] * 1.001).sum())} of 40")
    assert (plain[top_plain, 0] > exact[top_plain, 0] * 1.001).any()


def test_a_bank_with_values_faiss_cannot_square_is_refused_before_faiss_sees_it() -> None:
    # Found by the bundle fuzzer: a forged index with 1e36 in it made faiss' k-means abort the
    # whole process ("terminate called recursively") instead of raising.
    bank = _clustered(2000, 16, seed=7)
    bank[5, 3] = 1e36
    with pytest.raises(KnnError, match="not finite or too large"):
        FaissIndex.from_bank(bank, threads=1, knn=KnnConfig(index="ivf"))
    bank[5, 3] = np.nan
    with pytest.raises(KnnError, match="not finite or too large"):
        FaissIndex.from_bank(bank, threads=1, knn=KnnConfig(index="flat"))
