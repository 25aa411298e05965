import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from curation.kmeans import (
    ArrayRows,
    assign,
    compute_dtype,
    device_rows,
    grid_exponent,
    kmeans,
    kmeans_plusplus,
    kmeans_rows,
    partial_sums,
    reduce_partials,
    strided_variance,
    update_centroids,
)


def blobs(n=3000, k=12, d=16, spread=20.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * spread
    truth = rng.integers(k, size=n)
    return (centers[truth] + rng.normal(size=(n, d))).astype(np.float32), truth


def greedy_kmeans_plusplus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Textbook greedy k-means++ over every row in float64, drawing from the generator in the same order."""
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64)
    trials = 2 + int(np.log(k))
    chosen = [int(rng.integers(len(x)))]
    closest = ((x - x[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(1, k):
        cum = np.cumsum(closest)
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1]), len(x) - 1)
        d = ((x[None, :, :] - x[cand][:, None, :]) ** 2).sum(axis=2)
        best = int(np.argmin(np.minimum(d, closest).sum(axis=1)))
        chosen.append(int(cand[best]))
        closest = np.minimum(closest, d[best])
    return x[chosen]


def test_kmeans_plusplus_picks_the_textbook_centres():
    # small integer coordinates: every squared distance is exact in float32, so the picks must be equal
    rng = np.random.default_rng(3)
    centres = rng.integers(-20, 21, size=(15, 8))
    x = (centres[rng.integers(15, size=1200)] + rng.integers(-2, 3, size=(1200, 8))).astype(np.float32)
    ours = kmeans_plusplus(x, 60, seed=5)  # 10k + 1000 >= 1200 rows: seeds on all of them
    np.testing.assert_array_equal(ours, greedy_kmeans_plusplus(x, 60, seed=5).astype(np.float32))


def test_finds_separated_blobs_exactly(device):
    x, truth = blobs()
    r = kmeans(x, 12, seed=3, device=device)
    assert adjusted_rand_score(truth, r.labels) == 1.0
    for j in range(12):  # centroids are the means of their clusters
        np.testing.assert_allclose(r.centroids[j], x[r.labels == j].mean(0), atol=1e-4)


def test_deterministic_for_a_seed(device):
    x, _ = blobs(k=20, spread=2.0)
    a, b = kmeans(x, 20, seed=7, device=device), kmeans(x, 20, seed=7, device=device)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.labels, b.labels)
    assert a.n_iter == b.n_iter


def test_assign_matches_brute_force_with_centroid_chunks(device):
    x, _ = blobs(n=1000, k=5, spread=1.0)
    c = x[:37] + 0.01
    labels, dist = assign(x, c, chunk_size=128, centroid_chunk=10, device=device)
    d2 = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    assert np.array_equal(labels, d2.argmin(1))
    np.testing.assert_allclose(dist, d2.min(1), rtol=1e-4, atol=1e-3)


def _lloyd_sharded(x, c0, bounds, n_iter, chunk, device):
    """A driver doing Lloyd by reducing the partial sums of shards [bounds[i], bounds[i+1])."""
    grid = grid_exponent(float(np.abs(x).max()))
    c = c0
    for _ in range(n_iter):
        parts = [
            partial_sums(x[s:e], c, grid_exp=grid, row_offset=s, chunk_size=chunk, device=device)
            for s, e in zip(bounds[:-1], bounds[1:])
        ]
        c, _ = update_centroids(reduce_partials(parts[::-1]), c)  # reduction order must not matter
    return c


def test_one_vs_many_workers_identical_centroids(device):
    x, _ = blobs(n=5000, k=30, spread=1.5, seed=1)
    c0 = x[:30].copy()
    one = _lloyd_sharded(x, c0, [0, 5000], 6, 512, device)
    two = _lloyd_sharded(x, c0, [0, 1777, 5000], 6, 512, device)
    three = _lloyd_sharded(x, c0, [0, 999, 3001, 5000], 6, 512, device)
    assert np.array_equal(one, two) and np.array_equal(one, three)
    r = kmeans(x, 30, init_centroids=c0, n_iter=6, tol=0.0, chunk_size=512, device=device)
    assert np.array_equal(r.centroids, one)


def test_partial_sums_match_numpy(device):
    x, _ = blobs(n=2000, k=8, spread=3.0)
    c = x[:8].copy()
    p = partial_sums(x, c, grid_exp=grid_exponent(float(np.abs(x).max())), device=device)
    labels, _ = assign(x, c, device=device)
    ref = np.zeros((8, x.shape[1]))
    np.add.at(ref, labels, x.astype(np.float64))
    np.testing.assert_allclose(p.sums.cpu().numpy(), ref, rtol=1e-5, atol=1e-3)
    assert np.array_equal(p.counts.cpu().numpy(), np.bincount(labels, minlength=8))


def test_empty_cluster_takes_farthest_point():
    x, _ = blobs(n=500, k=3, spread=5.0)
    c = np.concatenate([x[:3], np.full((1, x.shape[1]), 1e4, dtype=np.float32)])
    p = partial_sums(x, c, grid_exp=grid_exponent(float(np.abs(x).max())))
    assert int(p.counts[3]) == 0
    new, n_empty = update_centroids(p, c)
    d2 = ((x[:, None, :].astype(np.float64) - c[None, :3].astype(np.float64)) ** 2).sum(-1).min(1)
    assert n_empty == 1
    np.testing.assert_array_equal(new[3], x[np.argmax(d2)])


def test_reseeds_spread_over_distinct_far_points():
    x, _ = blobs(n=2000, k=6, spread=30.0, seed=4)
    init = np.repeat(x[:1], 6, axis=0)  # all centroids equal: five clusters start empty
    p = partial_sums(x, init, grid_exp=grid_exponent(float(np.abs(x).max())))
    new, n_empty = update_centroids(p, init)
    assert n_empty >= 4  # exact ties may resolve to any of the equal centroids
    assert len(np.unique(new, axis=0)) == 6
    r = kmeans(x, 6, init_centroids=init, n_iter=50)
    assert np.bincount(r.labels, minlength=6).min() > 0


def test_cosine_ignores_row_norms():
    x, truth = blobs(n=2000, k=8, spread=5.0, seed=2)
    x = x + 50.0 * np.sign(x)  # keep directions distinct
    scaled = x * np.random.default_rng(0).uniform(0.1, 10, size=(len(x), 1)).astype(np.float32)
    a = kmeans(x, 8, seed=1, metric="cosine")
    b = kmeans(scaled, 8, seed=1, metric="cosine")
    assert adjusted_rand_score(a.labels, b.labels) == 1.0
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1.0, atol=1e-5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(a.distances, 1 - (xn * a.centroids[a.labels]).sum(1), atol=1e-4)


def test_faiss_backend_same_interface():
    x, truth = blobs()
    r = kmeans(x, 12, seed=0, backend="faiss")
    assert r.centroids.shape == (12, 16) and r.labels.shape == (len(x),)
    labels, dist = assign(x, r.centroids)
    assert np.array_equal(labels, r.labels)
    assert r.inertia == pytest.approx(float(dist.astype(np.float64).sum()))
    assert adjusted_rand_score(truth, r.labels) > 0.5  # faiss may stop in a local optimum


def test_bf16_inputs_close_to_fp32(device):
    x, truth = blobs(n=1000, k=5, spread=10.0)
    labels, _ = assign(x, kmeans(x, 5, seed=0).centroids, dtype=torch.bfloat16, device=device)
    assert adjusted_rand_score(truth, labels) == 1.0


def test_bf16_scores_carry_centroid_norms_inside_the_gemm(device):
    """bf16 assignment = exact argmin of |c|²/2 − x·c over the bf16-rounded x and c (the CUDA GEMM's math)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 24)).astype(np.float32) * 3 + 5  # offset: |c|² dominates the score
    c = x[rng.choice(3000, 64, replace=False)] + rng.normal(size=(64, 24)).astype(np.float32) * 0.1
    labels, dists = assign(x, c, dtype=torch.bfloat16, device=device)
    xb, cb = (torch.from_numpy(a).bfloat16().double() for a in (x, c))
    score = 0.5 * (torch.from_numpy(c).double() ** 2).sum(1) - xb @ cb.T
    top2 = score.topk(2, dim=1, largest=False)
    clear = (top2.values[:, 1] - top2.values[:, 0]).numpy() > 1e-3  # fp32 GEMM rounding decides the rest
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(labels[clear], top2.indices[:, 0].numpy()[clear])
    # distance = |x|² + 2·score: the bias's high and low bf16 parts together keep |c|²/2 to fp32 accuracy
    expected = (xb**2).sum(1) + 2 * score.gather(1, torch.from_numpy(labels)[:, None])[:, 0]
    np.testing.assert_allclose(dists, expected.clamp_min(0).numpy(), rtol=0, atol=0.01)


def test_rows_moved_to_the_device_once_give_the_host_rows_result(device):
    x, _ = blobs(n=3000, k=16, spread=1.5, seed=2)
    moved = device_rows(x, device)
    assert torch.as_tensor(moved.x).device.type == device.type  # on CUDA the rows now live there
    assert isinstance(moved.take(np.arange(5)), np.ndarray) and np.array_equal(moved.take(np.arange(5)), x[:5])
    got = kmeans_rows(moved, 16, seed=1, n_iter=5, metric="cosine", device=device)
    ref = kmeans_rows(ArrayRows(x, device=device), 16, seed=1, n_iter=5, metric="cosine", device=device)
    assert np.array_equal(got.centroids, ref.centroids) and np.array_equal(got.labels, ref.labels)


def test_compute_dtype_is_bf16_only_where_the_fused_search_runs_unless_asked(device):
    fused = device.type == "cuda"  # CUDA builds ship Triton
    assert compute_dtype("auto", device) == (torch.bfloat16 if fused else torch.float32)
    assert compute_dtype("bf16", device) == torch.bfloat16 and compute_dtype("fp32", device) == torch.float32
    with pytest.raises(ValueError, match="precision"):
        compute_dtype("fp16", device)


def test_cpu_chunks_are_capped_by_row_width_and_float16_rows_stay_float16(tmp_path):
    """A small k must not mean 65k-row chunks (their float32/float64 temporaries are ~5 copies of the chunk);
    float16 rows are clustered as they are stored, a chunk converted at a time, with float32's result."""
    from curation.kmeans import storage_rows
    from curation.kmeans_assign import CPU_ROW_ELEMENTS, default_chunk_size

    cpu = torch.device("cpu")
    assert default_chunk_size(8, cpu, dim=384) * 384 <= CPU_ROW_ELEMENTS
    assert default_chunk_size(8, cpu) == 1 << 16  # no width given: the score budget alone
    x16 = np.random.default_rng(3).normal(size=(3000, 16)).astype(np.float16)
    assert storage_rows(x16) is x16
    a = kmeans(x16, 12, seed=0, n_iter=5, chunk_size=512)
    b = kmeans(x16.astype(np.float32), 12, seed=0, n_iter=5, chunk_size=512)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.centroids, b.centroids)
    np.save(tmp_path / "x.npy", x16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only memory map is read a chunk at a time, without torch's warning
        c = kmeans(np.load(tmp_path / "x.npy", mmap_mode="r"), 12, seed=0, n_iter=5, chunk_size=512)
    assert np.array_equal(c.labels, a.labels)


def test_stopping_scale_is_the_variance_of_the_strided_rows_read_a_chunk_at_a_time():
    """Lloyd's tolerance scale: the unbiased variance of every stride-th row, merged over chunks in float64
    without a float64 copy of the rows; any chunking gives torch.var's value to rounding."""
    x = np.random.default_rng(4).normal(3.0, 2.0, size=(10_001, 24)).astype(np.float16)
    for stride in (1, 7):
        whole = float(torch.var(torch.from_numpy(x[::stride]).double(), dim=0).mean())
        for chunk in (100, 4_096, 1 << 20):
            assert strided_variance(ArrayRows(x), stride, chunk_rows=chunk) == pytest.approx(whole, rel=1e-12)
