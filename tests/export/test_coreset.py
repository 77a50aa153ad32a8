import numpy as np
import pytest

from export.coreset import CoresetError, StreamingCoreset, greedy_kcenter, greedy_kcenter_reference


def _covering_radius(points: np.ndarray, centers: np.ndarray) -> float:
    d2 = ((points[:, None, :] - points[None, centers, :]) ** 2).sum(-1)
    return float(np.sqrt(d2.min(axis=1)).max())


@pytest.mark.parametrize(("n", "d", "m"), [(2000, 8, 150), (3000, 32, 400), (500, 3, 499)])
def test_same_picks_as_textbook_greedy(n: int, d: int, m: int) -> None:
    x = np.random.default_rng(n).standard_normal((n, d)).astype(np.float32)
    fast = greedy_kcenter(x, m, seed=11, candidates=64, max_batch=32)
    ref = greedy_kcenter_reference(x, m, seed=11)
    assert np.array_equal(fast, ref)


def test_clustered_data_and_duplicates() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16)) * 10
    x = (centres[rng.integers(0, 20, 4000)] + 0.1 * rng.standard_normal((4000, 16))).astype(np.float32)
    x[:300] = x[0]  # many exact duplicates
    labels = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    picks = greedy_kcenter(x, 20, seed=1)
    # One center per cluster: the clusters are far apart compared with their spread.
    assert sorted(labels[picks]) == list(range(20))
    assert _covering_radius(x, picks) < 2.0


def test_rejects_bad_arguments() -> None:
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(CoresetError):
        greedy_kcenter(x, 11, seed=0)
    with pytest.raises(CoresetError):
        greedy_kcenter(np.full((10, 4), np.nan, np.float32), 2, seed=0)
    with pytest.raises(CoresetError):
        greedy_kcenter(np.zeros((0, 4), np.float32), 1, seed=0)


def test_streaming_matches_global_greedy_quality() -> None:
    # Regime of real strip: many more patches per chunk kept than distinct normal patterns.
    # (With fewer rows per chunk than patterns spread evenly over every chunk, a pattern can
    # be missed by every chunk: the price of not keeping the full budget per chunk.)
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((60, 24)) * 4
    x = (centres[rng.integers(0, 60, 30_000)] + rng.standard_normal((30_000, 24))).astype(np.float32)
    rows = 600
    sc = StreamingCoreset(
        dim=24,
        total_patches=x.shape[0],
        final_rows=rows,
        oversample=2.0,
        chunk_patches=4_000,
        projection_dim=128,
        seed=0,
    )
    for part in np.array_split(x, 17):  # uneven pieces, crossing chunk boundaries
        sc.add(np.ascontiguousarray(part))
    bank = sc.finish()
    assert bank.shape == (rows, 24) and bank.dtype == np.float32
    assert sc.patches_seen == x.shape[0]
    # Every bank row is a training row.
    assert np.isin(bank.view(np.dtype((np.void, 96))), x.view(np.dtype((np.void, 96)))).all()

    def radius(bank_: np.ndarray) -> float:  # the k-center objective over all points
        worst = 0.0
        for part in np.array_split(x, 10):
            d2 = ((part[:, None, :] - bank_[None, :, :]) ** 2).sum(-1)
            worst = max(worst, float(np.sqrt(d2.min(axis=1)).max()))
        return worst

    r_stream = radius(bank)
    r_global = radius(x[greedy_kcenter(x, rows, seed=0)])
    r_random = radius(x[rng.choice(x.shape[0], rows, replace=False)])
    assert r_stream < 1.5 * r_global
    assert r_stream < r_random


def test_streaming_rejects_wrong_features() -> None:
    sc = StreamingCoreset(
        dim=4, total_patches=10, final_rows=2, oversample=2, chunk_patches=1000, projection_dim=128, seed=0
    )
    with pytest.raises(CoresetError):
        sc.add(np.zeros((3, 5), np.float32))
    with pytest.raises(CoresetError):
        sc.add(np.full((3, 4), np.inf, np.float32))
    with pytest.raises(CoresetError, match="no features"):
        sc.finish()
