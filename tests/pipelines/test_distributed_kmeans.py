"""Level 1 on Ray actors: bit-identical to one worker and to in-process k-means on the sorted rows."""

import os

import numpy as np
import pytest

from catalog.array_store import CatalogArrayStore
from catalog.embeddings import embeddings_table
from catalog.ledger import Ledger
from catalog.shards import read_table, write_shards
from curation.hierarchy import LevelSpec, hierarchical_kmeans
from curation.kmeans import (
    ArrayRows,
    default_chunk_size,
    kmeans,
    kmeans_rows,
    resolve_device,
)
from curation.synthetic import concept_embeddings
from pipelines.distributed_kmeans import (
    RowIndex,
    ShardedEmbeddings,
    distributed_kmeans,
    worker_bounds,
)
from pipelines.stage import run_stage
from pipelines.stages.cluster import ClusterConfig

CHUNK = 256  # small chunks so 4000 rows spread over several workers
CPUS = 0.25  # per actor: the tests run on two cores


def _catalog(root: str, n: int, d: int, dtype: type, rows_per_shard: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A catalog whose embeddings are shuffled over shards; returns (sorted ids, rows in that order)."""
    x, _, _ = concept_embeddings(n=n, d=d, n_concepts=60, n_super=8, seed=seed)
    ids = np.random.default_rng(seed).choice(2**62, size=n, replace=False).astype(np.int64)
    write_shards(root, "embeddings", "unit", embeddings_table(ids, x.astype(dtype), {}), max_rows=rows_per_shard)
    order = np.argsort(ids, kind="stable")
    return ids[order], x.astype(dtype).astype(np.float32)[order]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
    root = str(tmp_path_factory.mktemp("dkm") / "cat")
    ids, x = _catalog(root, 4000, 32, np.float32, 700, seed=1)
    return root, ids, x


@pytest.fixture(scope="module")
def source(pool):
    """Three actors over the pool (ranges of 5, 5 and 6 chunks)."""
    root, _, _ = pool
    with ShardedEmbeddings(RowIndex.read(root), workers=3, chunk_size=CHUNK, num_cpus=CPUS) as rows:
        yield rows


def _same(a, b) -> None:
    assert np.array_equal(a.centroids, b.centroids)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.distances, b.distances)
    assert a.n_iter == b.n_iter


def test_worker_bounds_lie_on_the_chunk_grid():
    assert worker_bounds(4000, 2, 256) == [0, 2048, 4000]
    assert worker_bounds(4000, 3, 256) == [0, 1280, 2560, 4000]
    assert worker_bounds(4000, 2, 65536) == [0, 4000]  # one chunk: one worker
    for n, w, c in [(1, 4, 8), (1000, 7, 64), (100_003, 5, 4096)]:
        b = worker_bounds(n, w, c)
        assert b[0] == 0 and b[-1] == n and len(b) - 1 <= w
        assert all(e % c == 0 for e in b[:-1]) and all(x < y for x, y in zip(b, b[1:]))


def test_two_workers_equal_one_and_in_process(pool):
    root, ids, x = pool
    drop = ids[::7]  # excluded rows (as the stage drops duplicates)
    keep = ~np.isin(ids, drop)
    kw = dict(seed=3, n_iter=30, metric="cosine", chunk_size=CHUNK, exclude_ids=drop, num_cpus=CPUS)
    ids2, two = distributed_kmeans(root, 40, workers=2, **kw)
    ids1, one = distributed_kmeans(root, 40, workers=1, **kw)
    ref = kmeans(x[keep], 40, seed=3, n_iter=30, metric="cosine", chunk_size=CHUNK)
    assert np.array_equal(ids2, ids[keep]) and np.array_equal(ids1, ids[keep])
    _same(two, one)
    _same(two, ref)
    assert 1 < ref.n_iter < 30  # stopped by the shift rule, not by n_iter


def test_take_gathers_rows_in_any_order(pool, source):
    _, _, x = pool
    rows = np.random.default_rng(0).permutation(len(x))[:500]
    assert np.array_equal(source.take(rows), x[rows])
    assert np.array_equal(source.take(slice(3, None, 9)), x[3::9])
    assert source.max_abs() == float(np.abs(x).max())


def test_l2_with_empty_clusters_reseeds_like_one_process(pool, source):
    _, _, x = pool
    init = np.repeat(x[:3], 4, axis=0)  # 12 centroids, 9 of them duplicates: clusters start empty
    got = kmeans_rows(source, 12, init_centroids=init, n_iter=15, metric="l2")
    ref = kmeans(x, 12, init_centroids=init, n_iter=15, metric="l2", chunk_size=CHUNK)
    _same(got, ref)
    assert np.bincount(got.labels, minlength=12).min() > 0


@pytest.mark.parametrize("levels", [
    [LevelSpec(k=60, resampling_steps=2), LevelSpec(k=12, resampling_steps=1)],
    [LevelSpec(k=15, n_splits=4), LevelSpec(k=8, resampling_steps=1)],
], ids=["level1-resampling", "level1-splits"])
def test_hierarchy_with_level1_on_workers(pool, source, levels):
    _, _, x = pool
    got = hierarchical_kmeans(source, levels, seed=4, metric="cosine", n_iter=10)
    ref = hierarchical_kmeans(ArrayRows(x, chunk_size=CHUNK), levels, seed=4, metric="cosine", n_iter=10)
    for a, b in zip(got.centroids + got.labels, ref.centroids + ref.labels):
        assert np.array_equal(a, b)
    assert np.array_equal(got.distances, ref.distances)


@pytest.mark.slow
def test_cluster_stage_with_two_workers_matches_one(tmp_path):
    root = str(tmp_path / "cat")
    # Level 1 of k=256 has 65536-row chunks: 70k rows give the two workers one range each.
    _catalog(root, 70_000, 32, np.float16, 25_000, seed=2)
    assert len(worker_bounds(70_000, 2, default_chunk_size(256, resolve_device("cpu")))) == 3
    levels = [LevelSpec(k=256), LevelSpec(k=40, resampling_steps=2), LevelSpec(k=8, resampling_steps=1)]
    one = ClusterConfig(levels=levels, n_iter=8, device="cpu")
    two = ClusterConfig(levels=levels, n_iter=8, device="cpu", workers=2, worker_cpus=CPUS)

    def tables() -> tuple[list, list]:
        return read_table(root, "clusters").to_pylist(), read_table(root, "centroids").to_pylist()

    assert not run_stage("cluster", root, one).skipped
    expected = tables()
    assert run_stage("cluster", root, two).skipped  # same plan: the worker count does not change the result
    assert not run_stage("cluster", root, two, overwrite=True).skipped
    assert tables() == expected
    # resume on the distributed path from the level-1 checkpoint
    store_dir = CatalogArrayStore(root, "cluster").dir
    for name in os.listdir(store_dir):
        if not name.startswith("level1__"):
            os.remove(os.path.join(store_dir, name))
    Ledger(root, "cluster").reset()
    assert not run_stage("cluster", root, two).skipped
    assert tables() == expected
