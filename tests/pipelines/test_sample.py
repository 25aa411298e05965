"""``curate sample`` on a clusters table read batch by batch: the same rows as the in-memory sampler,
without ever holding the table (Arrow's peak allocation is a fraction of the table's size)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog.schemas import CLUSTERS_TABLE, POOL, POOL_TABLE, clusters, stamp
from catalog.shards import read_table, write_shards
from curation.sampling import balanced_sample
from pipelines.stage import run_stage
from pipelines.stages.sample import SampleConfig

N = 400_000


def _catalog(root: str) -> pa.Table:
    """A 3-level long-tailed tree over N rows in 32 shards, and a pool where every 7th row is an error."""
    rng = np.random.default_rng(0)
    leaf = (rng.pareto(1.2, N) * 40).astype(np.int64) % 3000
    mid_of = rng.integers(0, 120, 3000)
    top_of = rng.integers(0, 9, 120)
    ids = rng.permutation(10 * N)[:N].astype(np.int64)
    table = pa.table({"image_id": ids, "l1": leaf, "l2": mid_of[leaf], "l3": top_of[mid_of[leaf]],
                      "distance": rng.random(N).astype(np.float32)},
                     schema=stamp(clusters(3), CLUSTERS_TABLE))
    write_shards(root, CLUSTERS_TABLE, "cluster", table, max_rows=N // 32)
    status = np.where(np.arange(N) % 7 == 0, "error", "ok")
    empty = {f.name: pa.nulls(N, f.type) for f in POOL if f.name not in ("image_id", "uri", "status")}
    pool = pa.table({"image_id": ids[::-1], "uri": [f"/img/{i}.jpg" for i in ids[::-1]], **empty,
                     "status": status[::-1]}, schema=stamp(POOL, POOL_TABLE))
    write_shards(root, POOL_TABLE, "ingest", pool, max_rows=N // 32)
    return table


def _unused_pool() -> pa.MemoryPool:
    """An Arrow allocator no one has used in this process, so its peak is this test's alone."""
    for make in (pa.system_memory_pool, pa.jemalloc_memory_pool, pa.mimalloc_memory_pool):
        try:
            pool = make()
        except NotImplementedError:
            continue
        if pool.backend_name != pa.default_memory_pool().backend_name and pool.max_memory() == 0:
            return pool
    pytest.fail("no unused Arrow memory pool to measure with")


@pytest.mark.parametrize("strategy", ["random", "closest"])
def test_sample_streams_and_matches_in_memory_sampler(tmp_path, strategy):
    root = str(tmp_path / strategy)
    table = _catalog(root)
    config = SampleConfig(target_size=5_000, strategy=strategy, seed=3, report=False, batch_rows=8192)
    pool, default = _unused_pool(), pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        run_stage("sample", root, config)
    finally:
        pa.set_memory_pool(default)
    labels = np.stack([table.column(c).to_numpy() for c in ("l1", "l2", "l3")], axis=1)
    rows = balanced_sample(labels, 5_000, seed=3, strategy=strategy, distances=table.column("distance").to_numpy())
    got = pq.read_table(str(tmp_path / strategy / "curated" / "lvd"))
    want = table.take(pa.array(rows))
    assert got.num_rows == 5_000
    assert got.column("image_id").to_pylist() == want.column("image_id").to_pylist()
    for col in ("l1", "l2", "l3", "distance"):
        assert got.column(col).equals(want.column(col))
    ok = set(read_table(root, POOL_TABLE).filter(pa.compute.equal(pa.compute.field("status"), "ok"))
             .column("image_id").to_pylist())
    assert got.column("uri").to_pylist() == [f"/img/{i}.jpg" if i in ok else None for i in want.column("image_id").to_pylist()]
    # never the whole table at once: the peak Arrow allocation is a small part of it
    assert pool.max_memory() < table.nbytes / 3, (pool.max_memory(), table.nbytes)
