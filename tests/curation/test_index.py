"""PoolIndex against brute-force numpy search on small random data."""

import numpy as np
import pytest

from curation.index import TRAIN_POINTS_PER_LIST, PoolIndex, build_index


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int = 32, n_centres: int = 40, seed: int = 0) -> np.ndarray:
    """Unit centres (fixed for all calls) plus isotropic noise: cosine ~0.6 to the centre."""
    centres = unit(np.random.default_rng(12345).standard_normal((n_centres, d)))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, d)) / np.sqrt(d)
    return unit(centres[rng.integers(n_centres, size=n)] + 1.2 * noise)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ x.astype(np.float64).T
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, rows, axis=1), rows


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)])


def test_exact_index_equals_brute_force():
    x = clustered(3000, seed=1)
    q = clustered(200, seed=2)
    index = build_index(x)
    assert index.params["kind"] == "flat"
    sims, rows = index.search(q, 10, batch_size=64)
    ref_s, ref_r = brute_force(x, q, 10)
    assert sims.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_array_equal(rows, ref_r)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)


def test_ivf_meets_recall_target_on_clustered_data():
    x = clustered(40_000, seed=5)
    index = build_index(x, exact_max=1_000, recall_target=0.95, seed=0)
    p = index.params
    assert p["kind"] == "ivf_fp16"
    assert p["nlist"] == min(round(4 * np.sqrt(40_000)), 40_000 // TRAIN_POINTS_PER_LIST)
    assert 1 <= p["nprobe"] <= p["nlist"] and p["recall_at_10"] >= 0.95
    # Fresh queries never seen in tuning; a small margin for the sampling noise of 1,000 queries.
    q = clustered(1000, seed=6)
    _, rows = index.search(q, 10)
    _, ref = brute_force(x, q, 10)
    assert recall(rows, ref) >= 0.93


def test_nprobe_override_is_per_call():
    x = clustered(20_000, seed=12)
    index = build_index(x, exact_max=1_000)
    q = clustered(100, seed=13)
    before = index.search(q, 10)
    s_all, r_all = index.search(q, 10, nprobe=index.params["nlist"])
    ref_s, _ = brute_force(x.astype(np.float16).astype(np.float32), q, 10)  # the lists hold float16
    np.testing.assert_allclose(s_all, ref_s, atol=1e-5)  # probing every list is exhaustive (ties may swap rows)
    after = index.search(q, 10)
    np.testing.assert_array_equal(before[1], after[1])


def test_float16_memmap_input(tmp_path):
    x = clustered(2000, seed=7).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    index = build_index(mm)
    _, rows = index.search(mm[:20], 5)
    _, ref = brute_force(x.astype(np.float32), x[:20].astype(np.float32), 5)
    assert recall(rows, ref) >= 0.99
    assert index.fingerprint == build_index(x).fingerprint
    assert index.fingerprint != build_index(x.astype(np.float32)).fingerprint


@pytest.mark.parametrize("exact_max", [100_000, 1_000])
def test_serialisation_round_trip(exact_max):
    x = clustered(12_000, seed=8)
    index = build_index(x, exact_max=exact_max)
    again = PoolIndex.from_bytes(index.to_bytes())
    assert again.params == index.params and again.fingerprint == index.fingerprint
    q = clustered(300, seed=9)
    s1, r1 = index.search(q, 10)
    s2, r2 = again.search(q, 10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)


def test_memory_budget_selects_ivf_pq():
    n, d = 10_000, 32
    x = clustered(n, d=d, seed=10)
    index = build_index(x, exact_max=1_000, memory_budget_bytes=n * 24, recall_target=0.8)
    p = index.params
    assert p["kind"] == "ivf_pq" and d % p["m"] == 0 and n * (p["m"] + 8) <= n * 24
    assert p["recall_at_10"] >= 0.8
    q = clustered(200, seed=11)
    _, rows = index.search(q, 10)
    _, ref = brute_force(x, q, 10)
    assert recall(rows, ref) >= 0.75


def test_presized_float16_lists_are_the_index_faiss_add_builds():
    """build_index writes each list at its final size; faiss's own add on the same trained quantiser
    gives the same index byte for byte (lists, order within them, labels)."""
    import faiss

    for x in (clustered(30_000, d=48, seed=7).astype(np.float16), clustered(30_000, d=48, seed=8)):  # and float32
        built = build_index(x, exact_max=1_000, seed=0, use_gpu=False)
        assert built.params["kind"] == "ivf_fp16"
        reference = faiss.deserialize_index(faiss.serialize_index(built.index))
        reference.reset()  # the same quantiser, empty lists
        for start in range(0, len(x), 4096):  # faiss's add, in other batches than build_index's
            reference.add(np.ascontiguousarray(x[start : start + 4096], np.float32))
        np.testing.assert_array_equal(faiss.serialize_index(built.index), faiss.serialize_index(reference))
