"""A recluster warm-started from the clustering it replaces (`curation.warm_start`): the old rows keep
their partition where the pool did not change, and rows of concepts the old clustering never saw get
centroids of their own."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from curation.drift import far_limit
from curation.hierarchy import Hierarchy, LevelSpec, hierarchical_kmeans
from curation.kmeans import as_rows, assign, kmeans_plusplus
from curation.synthetic import concept_embeddings
from curation.warm_start import WarmStart, loss_if_dropped

LEVELS = [LevelSpec(k=60), LevelSpec(k=12, resampling_steps=2)]
SPLIT = [LevelSpec(k=8, n_splits=8), LevelSpec(k=12, resampling_steps=2)]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pool():
    """4,000 rows of 40 concepts; three of them arrive only with the update."""
    x, concept, _ = concept_embeddings(n=4000, d=32, n_concepts=40, n_super=6, seed=2)
    late = np.argsort(-np.bincount(concept))[5:8]  # 10 % of the rows
    return x, np.where(np.isin(concept, late), concept, -1)


def _warm(x: np.ndarray, old: np.ndarray, h: Hierarchy) -> WarmStart:
    """What the cluster stage keeps of a clustering fitted on ``x[old]``, for the whole of ``x``."""
    labels = h.point_labels()
    sizes = [np.bincount(labels[:, t], minlength=len(c)) for t, c in enumerate(h.centroids)]
    distance = assign(x, h.centroids[0], metric="cosine")[1]
    return WarmStart(h.centroids, sizes, float((distance > far_limit(h.distances)).mean()))


def _fit(x, levels, **kw) -> Hierarchy:
    return hierarchical_kmeans(x, levels, seed=0, metric="cosine", n_iter=30, **kw)


def test_given_centres_come_first_and_the_drawn_seeds_go_where_they_leave_rows_far(pool):
    x, concept = pool
    late = concept >= 0
    given = x[~late][:5]
    seeds = kmeans_plusplus(x, 8, seed=0, metric="cosine", given=given)
    np.testing.assert_allclose(seeds[:5], given / np.linalg.norm(given, axis=1, keepdims=True), atol=1e-6)
    nearest = assign(seeds[5:], x, metric="cosine")[0]
    assert len(seeds) == 8 and not np.isin(nearest, np.flatnonzero(~late)[:5]).any()


def test_seeds_keep_the_old_clusters_that_cost_most_to_lose_and_give_the_far_share_fresh_ones(pool):
    x, concept = pool
    late = concept >= 0
    old = _fit(x[~late], LEVELS)
    warm = _warm(x, ~late, old)
    assert 0.1 < warm.far_share < late.mean() + 0.02  # the late concepts lie far, little else does
    costly = np.argsort(-loss_if_dropped(old.centroids[0], warm.sizes[0], "cosine"), kind="stable")
    for k in (60, 70):  # the same k, and a k that grew with the pool
        fresh = max(k - 60, round(k * warm.far_share))
        seeds = warm.seeds(1, as_rows(x), k, pre=False, seed=0, metric="cosine", device=CPU)
        assert len(seeds) == k
        np.testing.assert_allclose(seeds[: k - fresh], old.centroids[0][np.sort(costly[: k - fresh])], atol=1e-6)
        nearest_rows = assign(seeds[k - fresh :], x, metric="cosine")[0]
        assert late[nearest_rows].mean() > late.mean()  # D² draws the fresh seeds towards the new concepts
        assert set(concept[nearest_rows]) >= set(concept[late])  # each of them gets some


def test_a_tail_cluster_costs_more_to_lose_than_one_of_two_twins():
    c = np.array([[1, 0, 0], [1, 0.01, 0], [0, 1, 0]], np.float32)
    loss = loss_if_dropped(c, np.array([50, 60, 5]), "l2")
    assert loss[0] < loss[1] < loss[2]


@pytest.mark.parametrize("levels", [LEVELS, SPLIT], ids=["direct", "two-step"])
def test_a_warm_recluster_keeps_the_old_partition_and_covers_the_new_concepts(pool, levels):
    x, concept = pool
    late = concept >= 0
    old = _fit(x[~late], levels)
    warm = _warm(x, ~late, old)
    if levels is SPLIT:  # the stage keeps level 1's pre-clusters from its checkpoints
        pre = hierarchical_kmeans(x[~late], [LevelSpec(k=8)], seed=0, metric="cosine", n_iter=30)
        warm = WarmStart(warm.centroids, warm.sizes, warm.far_share, pre.centroids[0],
                         np.bincount(pre.labels[0], minlength=8))
    again, cold = _fit(x, levels, previous=warm), _fit(x, levels)
    before = old.point_labels()[:, 0]
    kept = adjusted_rand_score(before, again.point_labels()[~late, 0])
    fresh = adjusted_rand_score(before, cold.point_labels()[~late, 0])
    assert kept >= 0.65 and kept > fresh + 0.15, (kept, fresh)  # measured: 0.89 vs 0.50 direct, 0.70 vs 0.47 two-step
    leaves = again.point_labels()[:, 0]
    late_leaves = np.unique(leaves[late])
    assert np.isin(leaves[~late], late_leaves).mean() < 0.02  # the new concepts' leaves hold little else
    assert again.inertia[0] <= 1.05 * cold.inertia[0]
