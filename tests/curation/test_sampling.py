import numpy as np
import pytest

from curation.hierarchy import LevelSpec, hierarchical_kmeans
from curation.sampling import LeafPicker, balanced_sample, leaf_budgets, level_counts, water_fill, water_fill_segments
from curation.synthetic import concept_embeddings, normalised_entropy


def brute_level(sizes, budget):
    """Largest t with sum(min(t, s)) <= budget, by linear scan."""
    t = 0
    while t <= sizes.max() and np.minimum(t + 1, sizes).sum() <= budget:
        t += 1
    return t


def check_fair(sizes, budget, alloc):
    assert alloc.sum() == min(budget, sizes.sum())
    assert (alloc >= 0).all() and (alloc <= sizes).all()
    if sizes.sum() <= budget:
        assert np.array_equal(alloc, sizes)
        return
    t = brute_level(sizes, budget)
    base = np.minimum(t, sizes)
    extra = alloc - base
    assert set(np.unique(extra)) <= {0, 1}
    assert (sizes[extra == 1] > t).all()
    assert extra.sum() == budget - base.sum() < (sizes > t).sum()


def test_water_fill_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, rng.integers(1, 60), size=rng.integers(1, 25))
        budget = int(rng.integers(0, sizes.sum() + 10))
        check_fair(sizes, budget, water_fill(sizes, budget, rng))


def test_water_fill_segments_each_fair():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n_seg = int(rng.integers(1, 12))
        seg = rng.integers(0, n_seg, size=int(rng.integers(1, 80)))
        sizes = rng.integers(0, 40, size=len(seg))
        budgets = rng.integers(0, 150, size=n_seg)
        alloc = water_fill_segments(sizes, seg, budgets, rng)
        for s in range(n_seg):
            if (seg == s).any():
                check_fair(sizes[seg == s], budgets[s], alloc[seg == s])


def test_remainder_is_spread_randomly():
    sizes = np.full(10, 100)
    hits = sum(water_fill(sizes, 15, np.random.default_rng(s)) for s in range(400))
    assert hits.min() > 0.6 * hits.mean()  # each cluster gets the +1 about half the time


def tree(rng, n=3000):
    """Random 3-level tree of point labels, built bottom-up so children have a unique parent."""
    leaf = rng.integers(0, 200, size=n) ** 2 % 151  # skewed leaf sizes
    mid_of = rng.integers(0, 25, size=151)
    top_of = rng.integers(0, 6, size=25)
    return np.stack([leaf, mid_of[leaf], top_of[mid_of[leaf]]], axis=1)


def test_balanced_sample_exact_and_fair():
    rng = np.random.default_rng(2)
    pl = tree(rng)
    for target in [1, 100, 777, 2999, 3000, 5000]:
        idx = balanced_sample(pl, target, seed=target)
        assert len(idx) == min(target, len(pl)) == len(np.unique(idx))
        assert np.all(np.diff(idx) > 0)
        # top clusters are split max-min fairly
        check_fair(np.bincount(pl[:, 2]), min(target, len(pl)), np.bincount(pl[idx, 2], minlength=pl[:, 2].max() + 1))
        # inside every mid cluster, the budget it got is split fairly over its leaves
        for m in np.unique(pl[:, 1]):
            sel = pl[:, 1] == m
            leaves = np.unique(pl[sel, 0])
            got = np.array([np.sum(pl[idx, 0] == leaf) for leaf in leaves])
            check_fair(np.array([np.sum(pl[:, 0] == leaf) for leaf in leaves]), got.sum(), got)


@pytest.mark.parametrize("strategy", ["closest", "farthest"])
def test_closest_and_farthest_pick_expected_rows(strategy):
    rng = np.random.default_rng(3)
    pl = tree(rng, 2000)
    dist = rng.random(2000)
    idx = balanced_sample(pl, 400, seed=0, strategy=strategy, distances=dist)
    chosen = np.zeros(2000, bool)
    chosen[idx] = True
    for leaf in np.unique(pl[:, 0]):
        rows = np.flatnonzero(pl[:, 0] == leaf)
        n = chosen[rows].sum()
        ranked = rows[np.argsort(dist[rows] if strategy == "closest" else -dist[rows])]
        assert set(ranked[:n]) == set(rows[chosen[rows]])


def test_multiplier_oversamples_small_clusters():
    pl = np.repeat([0, 1, 2], [2, 10, 100])[:, None]
    idx = balanced_sample(pl, 60, seed=0, multiplier=3.0)
    assert len(idx) == 60
    counts = np.bincount(pl[idx, 0])
    assert counts.tolist() == [6, 27, 27]  # t* = 27: 6 + 2t = 60
    assert np.bincount(idx[pl[idx, 0] == 0]).max() == 3  # the 2-row cluster is taken three times


def test_sample_flatter_than_pool_on_long_tail():
    x, concept, _ = concept_embeddings(n=6000, d=32, n_concepts=80, n_super=8, seed=4)
    h = hierarchical_kmeans(x, [LevelSpec(k=300), LevelSpec(k=60, resampling_steps=5), LevelSpec(k=12, resampling_steps=5)],
                            seed=0, metric="cosine")
    idx = balanced_sample(h.point_labels(), 1200, seed=0)
    rand = np.random.default_rng(0).choice(6000, 1200, replace=False)
    pool_h, rand_h, ours = (normalised_entropy(concept[i], 80) for i in (np.arange(6000), rand, idx))
    assert ours > pool_h + 0.05 and ours > rand_h + 0.05


def one_shot_sample(labels, target, seed, strategy, distances, multiplier):
    """The in-memory sampler as it was before streaming (every row's key drawn at once, one sort),
    kept here as the independent reference the streamed one must match bit for bit."""
    rng = np.random.default_rng(seed)
    cap = lambda s: np.floor(s * multiplier).astype(np.int64)  # noqa: E731
    budget = water_fill(cap(np.bincount(labels[:, -1])), target, rng)
    for level in range(labels.shape[1] - 2, -1, -1):
        child, parent = labels[:, level], labels[:, level + 1]
        sizes = np.bincount(child)
        parent_of = np.zeros(len(sizes), dtype=np.int64)
        parent_of[child] = parent
        ids = np.flatnonzero(sizes)
        child_budget = np.zeros(len(sizes), dtype=np.int64)
        child_budget[ids] = water_fill_segments(cap(sizes[ids]), parent_of[ids], budget, rng)
        budget = child_budget
    leaf = labels[:, 0]
    n = len(leaf)
    sizes = np.bincount(leaf, minlength=len(budget))
    copies = budget // np.maximum(sizes, 1)
    rem = budget - copies * sizes
    key = rng.random(n) if strategy == "random" else distances * (1.0 if strategy == "closest" else -1.0)
    order = np.lexsort((np.arange(n), key, leaf))
    rank = np.arange(n) - np.searchsorted(leaf[order], leaf[order], side="left")
    picked = order[rank < rem[leaf[order]]]
    return np.sort(np.concatenate([picked, np.repeat(np.arange(n), copies[leaf])]))


@pytest.mark.parametrize("strategy,multiplier", [("random", 1.0), ("closest", 1.0), ("farthest", 1.0),
                                                 ("random", 2.5), ("closest", 3.0)])
def test_streamed_picks_equal_one_shot_picks(strategy, multiplier):
    rng = np.random.default_rng(7)
    for trial in range(25):
        n = int(rng.integers(1, 3000))
        pl = tree(rng, n)[:, : int(rng.integers(1, 4))]
        dist = rng.random(n).astype(np.float32).astype(np.float64)
        dist[rng.random(n) < 0.1] = 0.5  # ties: broken by row order in both
        target = int(rng.integers(0, n + 50))
        want = one_shot_sample(pl, target, trial, strategy, dist, multiplier)
        assert np.array_equal(balanced_sample(pl, target, seed=trial, strategy=strategy, distances=dist,
                                              multiplier=multiplier), want)
        gen = np.random.default_rng(trial)
        budget, sizes = leaf_budgets(level_counts(pl), target, gen, multiplier)
        picker = LeafPicker(budget, sizes, gen, strategy, merge_rows=int(rng.integers(1, 80)))
        step = int(rng.integers(1, 500))
        for i in range(0, n, step):
            picker.add(pl[i : i + step, 0], dist[i : i + step])
        assert np.array_equal(picker.rows(), want)
