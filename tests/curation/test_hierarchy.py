import numpy as np
import pytest

from catalog.array_store import CatalogArrayStore
from curation.checkpoint_store import MemoryStore
from curation.hierarchy import (
    LevelSpec,
    default_levels,
    default_sample_size,
    hierarchical_kmeans,
    resample_rows,
    split_clusters,
)
from curation.kmeans import assign
from curation.synthetic import concept_embeddings

LEVELS = [LevelSpec(k=120), LevelSpec(k=30, resampling_steps=3), LevelSpec(k=8, resampling_steps=2, sample_strategy="random")]


@pytest.fixture(scope="module")
def data():
    return concept_embeddings(n=4000, d=32, n_concepts=60, n_super=8, seed=1)


def _same(a, b):
    assert len(a.centroids) == len(b.centroids)
    for ca, cb, la, lb in zip(a.centroids, b.centroids, a.labels, b.labels):
        assert np.array_equal(ca, cb) and np.array_equal(la, lb)
    assert np.array_equal(a.distances, b.distances)


def test_structure_and_consistency(data):
    x, _, _ = data
    h = hierarchical_kmeans(x, LEVELS, seed=0, metric="cosine")
    pl = h.point_labels()
    assert pl.shape == (4000, 3)
    assert [len(c) for c in h.centroids] == [120, 30, 8]
    assert np.array_equal(pl[:, 1], h.labels[1][h.labels[0]])
    assert np.array_equal(pl[:, 2], h.labels[2][h.labels[1][h.labels[0]]])
    # every level's labels are the nearest centroid of that level's inputs
    inputs = x
    for c, lab in zip(h.centroids, h.labels):
        ref, _ = assign(inputs, c, metric="cosine")
        assert (ref == lab).mean() > 0.999
        inputs = c
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(h.distances, 1 - (xn * h.centroids[0][h.labels[0]]).sum(1), atol=1e-4)


def test_deterministic(data):
    x, _, _ = data
    _same(hierarchical_kmeans(x, LEVELS, seed=5), hierarchical_kmeans(x, LEVELS, seed=5))


class FailingStore(MemoryStore):
    """Dies (like a killed worker) after a number of successful checkpoint writes."""

    def __init__(self, fail_after: int):
        super().__init__()
        self.left = fail_after

    def put(self, key, arrays):
        if self.left == 0:
            raise RuntimeError("killed")
        self.left -= 1
        super().put(key, arrays)


@pytest.fixture(scope="module")
def full(data):
    return hierarchical_kmeans(data[0], LEVELS, seed=2, metric="cosine")


@pytest.mark.parametrize("fail_after", [1, 2, 4, 6])
def test_resume_after_kill_is_bit_identical(data, full, fail_after):
    x, _, _ = data
    store = FailingStore(fail_after)
    with pytest.raises(RuntimeError):
        hierarchical_kmeans(x, LEVELS, seed=2, metric="cosine", store=store)
    assert len(store.data) == fail_after
    store.left = -1  # the restarted run is not killed
    _same(full, hierarchical_kmeans(x, LEVELS, seed=2, metric="cosine", store=store))


def test_catalog_store_roundtrip_and_resume(tmp_path, data):
    x, _, _ = data
    a = hierarchical_kmeans(x, LEVELS[:2], seed=3, store=CatalogArrayStore(str(tmp_path), "cluster"))
    assert (tmp_path / "_checkpoints" / "cluster" / "level2__step3.npz").exists()
    _same(a, hierarchical_kmeans(x, LEVELS[:2], seed=3, store=CatalogArrayStore(str(tmp_path), "cluster")))


def test_split_level_batched(data):
    x, _, _ = data
    groups = np.random.default_rng(0).integers(7, size=len(x))
    groups[groups == 3] = 2  # one group is empty, one is large
    c, lab, dist = split_clusters(x, groups, 5, seed=0)
    assert len(c) <= 7 * 5 and np.bincount(lab).min() > 0
    for leaf in range(len(c)):
        assert len(np.unique(groups[lab == leaf])) == 1  # leaves never straddle groups
    # each point is nearest to its leaf among the sub-centroids of its own group
    leaf_group = np.array([groups[lab == j][0] for j in range(len(c))])
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    d2[groups[:, None] != leaf_group[None, :]] = np.inf
    assert (d2.argmin(1) == lab).mean() > 0.999
    np.testing.assert_allclose(dist, d2.min(1), rtol=1e-4, atol=1e-4)


def test_hierarchy_with_split_level(data):
    x, _, _ = data
    h = hierarchical_kmeans(x, [LevelSpec(k=20, n_splits=6), LevelSpec(k=10, resampling_steps=2)], seed=0)
    assert 20 < len(h.centroids[0]) <= 120 and h.point_labels().shape == (4000, 2)


def test_resample_rows_closest():
    labels = np.array([0, 0, 0, 1, 1, 2])
    dist = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 9.0])
    rows = resample_rows(labels, dist, 2, "closest", np.random.default_rng(0))
    assert rows.tolist() == [1, 2, 3, 4, 5]


def test_default_levels_rule():
    for n in [1_500, 10_000, 200_000, 10**8, 10**10]:
        ks = [s.clusters for s in default_levels(n)]
        assert all(a > b for a, b in zip(ks, ks[1:]))
        assert ks[-1] >= max(10, int(25_000 * (n / 17e9) ** 0.5))  # the top level keeps up with √n
    big = default_levels(17 * 10**9)
    np.testing.assert_allclose([s.k for s in big[1:]], [8e6, 800e3, 100e3, 25e3], rtol=1e-6)
    assert big[0].n_splits > 1 and 200e6 <= big[0].clusters < 200e6 + big[0].k  # two-step at this size
    with pytest.raises(ValueError):
        LevelSpec(k=5, n_splits=3, resampling_steps=2)


def test_default_sample_size_takes_one_member_of_small_clusters():
    assert default_sample_size(100_000, 1_000) == 50  # half the mean cluster size
    assert default_sample_size(600, 100) == 3
    assert default_sample_size(500, 100) == 1  # 2 of 5 would average neighbouring centroids into hubs
    assert default_sample_size(150, 100) == 1
