"""Retrieval against a dictionary-based brute-force reference."""

import numpy as np

from curation.index import build_index
from curation.retrieval import choose_mode, cluster_retrieve, merge_neighbours, seed_support, top_neighbours


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def reference_knn(pool: np.ndarray, seeds: np.ndarray, k: int, min_sim: float | None):
    """row -> (best rank, best similarity, seed with the best similarity), by plain loops."""
    s = seeds.astype(np.float64) @ pool.T.astype(np.float64)
    out: dict[int, list] = {}
    for j in range(len(seeds)):
        for rank, row in enumerate(np.argsort(-s[j])[:k]):
            sim = s[j, row]
            if min_sim is not None and sim < min_sim:
                continue
            r = out.setdefault(int(row), [rank, sim, j])
            r[0] = min(r[0], rank)
            if sim > r[1]:
                r[1], r[2] = sim, j
    return out


def seeds_near(pool: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Seeds in small tight bunches so that several seeds retrieve the same pool rows."""
    centres = pool[rng.integers(len(pool), size=n // 3)]
    return unit(np.repeat(centres, 3, axis=0) + 0.3 * rng.standard_normal((len(centres) * 3, pool.shape[1])) / 8)


def test_knn_retrieve_merges_keeping_best_rank_and_similarity():
    rng = np.random.default_rng(0)
    pool = unit(rng.standard_normal((4000, 64)))
    seeds = seeds_near(pool, rng, 300)
    result = merge_neighbours(*build_index(pool).search(seeds, 6), min_similarity=0.3)
    ref = reference_knn(pool, seeds, 6, 0.3)
    assert len(ref) < 6 * len(seeds)  # the bunches really do collide
    assert result.rows.tolist() == sorted(ref)
    np.testing.assert_array_equal(result.rank, [ref[r][0] for r in result.rows])
    np.testing.assert_allclose(result.similarity, [ref[r][1] for r in result.rows], atol=1e-5)
    np.testing.assert_array_equal(result.seed_rows, [ref[r][2] for r in result.rows])


def test_knn_retrieve_cap_keeps_most_similar():
    rng = np.random.default_rng(1)
    pool = unit(rng.standard_normal((3000, 32)))
    seeds = seeds_near(pool, rng, 90)
    index = build_index(pool)
    full = merge_neighbours(*index.search(seeds, 4))
    capped = merge_neighbours(*index.search(seeds, 4), max_per_seed=50)
    top = np.sort(full.rows[np.argsort(-full.similarity, kind="stable")[:50]])
    np.testing.assert_array_equal(capped.rows, top)
    assert np.all(np.diff(capped.rows) > 0)


def test_the_top_of_two_halves_lists_is_the_top_of_the_whole():
    rng = np.random.default_rng(2)
    pool = unit(rng.standard_normal((2000, 32)))
    seeds = seeds_near(pool, rng, 60)
    whole_sims, whole_rows = build_index(pool).search(seeds, 8)
    halves = []
    for rows in (np.arange(0, 2000, 2), np.arange(1, 2000, 2)):
        sims, found = build_index(pool[rows]).search(seeds, 8)
        halves += [sims, rows[found]]
    sims, rows = top_neighbours(*halves, 8)
    np.testing.assert_array_equal(rows, whole_rows)
    np.testing.assert_allclose(sims, whole_sims, atol=1e-6)


def test_cluster_retrieve_takes_eligible_clusters_only():
    rng = np.random.default_rng(2)
    pool_labels = rng.integers(0, 30, size=20_000)
    pool_labels[pool_labels == 7] = 8  # cluster 7 is empty in the pool
    pool_labels[:5] = 29  # cluster 29 holds 5 rows only...
    pool_labels[5:][pool_labels[5:] == 29] = 28
    # seeds: clusters 0-9 get 4 seeds (eligible), 10-19 exactly 3 (not), 29 gets 10, 7 gets 5
    seed_labels = np.concatenate([np.repeat(np.arange(10), 4), np.repeat(np.arange(10, 20), 3), [29] * 10])
    result = cluster_retrieve(pool_labels, seed_labels, min_seed_per_cluster=3, per_cluster=100, seed=3)
    got = pool_labels[result.rows]
    expected = {c: min(100, int((pool_labels == c).sum())) for c in [*range(10), 29] if (pool_labels == c).any()}
    assert dict(zip(*np.unique(got, return_counts=True))) == expected
    assert len(np.unique(result.rows)) == len(result.rows) and np.all(np.diff(result.rows) > 0)
    again = cluster_retrieve(pool_labels, seed_labels, per_cluster=100, seed=3)
    other = cluster_retrieve(pool_labels, seed_labels, per_cluster=100, seed=4)
    np.testing.assert_array_equal(result.rows, again.rows)
    assert not np.array_equal(result.rows, other.rows)
    assert (result.seed_rows == -1).all() and (result.rank < 100).all()


def test_choose_mode_by_size():
    assert choose_mode(2_000_000) == "knn"
    assert choose_mode(50_000) == "cluster"
    assert choose_mode(500, threshold=100) == "knn"


def test_seed_support_counts_seeds_per_cluster():
    rng = np.random.default_rng(4)
    seed_labels = rng.integers(0, 40, size=150)
    support = seed_support(seed_labels, min_seed_per_cluster=4)
    per_cluster: dict[int, int] = {}
    for c in seed_labels.tolist():
        per_cluster[c] = per_cluster.get(c, 0) + 1
    eligible = {c: n for c, n in per_cluster.items() if n > 4}
    assert support.n_seed == 150 and support.clusters_with_seeds == len(per_cluster)
    assert support.max_seeds_in_one == max(per_cluster.values())
    assert support.eligible_clusters == len(eligible) and support.seeds_in_eligible == sum(eligible.values())


def test_small_clusters_make_auto_mode_choose_knn():
    """A 30-image seed on a pool whose clusters hold ~4 images: no cluster gets more than 3 seeds."""
    spread = np.arange(30) // 2  # two seeds in each of 15 clusters
    support = seed_support(spread)
    assert support.eligible_clusters == 0
    assert choose_mode(30, support=support) == "knn"
    bunched = np.repeat([3, 9, 17], 10)  # the seeds sit in three clusters of ten
    assert choose_mode(30, support=seed_support(bunched)) == "cluster"
    # eligible clusters hold only 8 of 30 seeds (27%): most seeds would retrieve nothing in cluster mode
    partial = np.concatenate([[5] * 8, np.arange(100, 122)])
    assert seed_support(partial).eligible_clusters == 1
    assert choose_mode(30, support=seed_support(partial)) == "knn"
    assert choose_mode(30, support=seed_support(partial), min_seed_share=0.2) == "cluster"


def test_empty_cluster_retrieval_says_why():
    pool_labels = np.repeat(np.arange(200), 4)  # clusters of 4 images
    seed_labels = np.arange(30) // 2
    result = cluster_retrieve(pool_labels, seed_labels)
    assert len(result) == 0
    assert result.note == ("cluster mode retrieved nothing: 0 of the 15 clusters holding seed images hold more than 3 "
                           "of the 30 seed images (at most 2 in one); they hold 0% of the seeds")
    # eligible clusters exist, but no pool image is in them (the seeds' nearest centroids lost their rows)
    lonely = cluster_retrieve(pool_labels, np.full(5, 250))
    assert len(lonely) == 0 and "hold no pool image" in lonely.note
    found = cluster_retrieve(pool_labels, np.full(5, 7))
    assert len(found) == 4 and found.note == ""
