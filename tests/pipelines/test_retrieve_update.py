"""k-NN retrieval on a grown pool searches only the new pool images (and, against the whole pool, the seed
images whose kept neighbours left the pool) and retrieves what a search of the whole pool retrieves."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from catalog.embeddings import embeddings_table
from catalog.ledger import Ledger
from catalog.schemas import DUPLICATES, DUPLICATES_TABLE, EMBEDDINGS_TABLE, stamp
from catalog.shards import write_shards
from catalog.sql import query
from pipelines.retrieve_lists import lists_file
from pipelines.stage import run_stage
from tests.helpers import EMBEDDING_IDENTITY, write_embedded_pool

RETRIEVED_SQL = "SELECT image_id, seed_image_id, rank, round(similarity, 4) AS s FROM retrieved ORDER BY ALL"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def searched(monkeypatch) -> list[int]:
    """Pool rows in the indexes the k-NN search queries (the real search still runs)."""
    import pipelines.retrieve_lists as lists

    count, real = [0], lists._searched

    def counted(search, index, ids, q, depth):
        count[0] += index.ntotal
        return real(search, index, ids, q, depth)

    monkeypatch.setattr(lists, "_searched", counted)
    return count


def test_knn_retrieval_of_a_grown_pool_searches_only_the_new_images(tmp_path, searched):
    rng = np.random.default_rng(5)
    pool = _unit(rng.normal(size=(3_000, 32)))
    seed_x = _unit(pool[:40] + rng.normal(0, 0.05, (40, 32)))  # each seed image near a pool image
    seed_root = str(tmp_path / "seed")
    write_shards(seed_root, EMBEDDINGS_TABLE, "embed=s", embeddings_table(np.arange(40) + 10**6, seed_x,
                                                                          EMBEDDING_IDENTITY))
    root = str(tmp_path / "cat")
    write_embedded_pool(root, "first", np.arange(3_000), pool)
    config = {"seed_set": "s", "mode": "knn", "seeds": {"seeds": {"s": {"embeddings": seed_root}}}}
    run_stage("retrieve", root, config, executor="local")
    assert searched[0] == 3_000 and os.path.exists(os.path.join(root, lists_file("retrieve-s")))
    # 300 new images, 20 of them nearer to a seed image than anything before
    new = _unit(np.concatenate([seed_x[:20] + rng.normal(0, 0.01, (20, 32)), rng.normal(size=(280, 32))]))
    scratch = shutil.copytree(root, str(tmp_path / "scratch"))
    for catalog in (root, scratch):
        write_embedded_pool(catalog, "grown", np.arange(3_000, 3_300), new)
    searched[0] = 0
    grown = run_stage("retrieve", root, config, executor="local")
    assert searched[0] == 300 and not grown.skipped
    os.remove(os.path.join(scratch, lists_file("retrieve-s")))  # a search of the whole grown pool
    run_stage("retrieve", scratch, config, executor="local")
    rows = query(root, RETRIEVED_SQL).to_pylist()
    assert rows == query(scratch, RETRIEVED_SQL).to_pylist()
    assert {r["image_id"] for r in rows} >= set(range(3_000, 3_020))  # the nearer new images were found
    # images leave the pool (dedup removed them): all 8 kept neighbours of seed image 0, the nearest of 1
    kept = np.load(os.path.join(root, lists_file("retrieve-s")))["ids"]
    gone = np.concatenate([kept[0], kept[1, :1]])
    for catalog in (root, scratch):
        write_shards(catalog, DUPLICATES_TABLE, "dedup=planted", pa.table(
            {"image_id": gone, "kept_id": np.full(len(gone), -1), "similarity": np.ones(len(gone), np.float32),
             "reason": ["copy"] * len(gone)}, schema=stamp(DUPLICATES, DUPLICATES_TABLE)))
    searched[0] = 0
    run_stage("retrieve", root, config, executor="local")
    assert searched[0] == 3_300 - len(gone)  # seed image 0 searched again against the whole pool, nothing new
    os.remove(os.path.join(scratch, lists_file("retrieve-s")))
    run_stage("retrieve", scratch, config, executor="local")
    rows = query(root, RETRIEVED_SQL).to_pylist()
    assert rows == query(scratch, RETRIEVED_SQL).to_pylist() and not {r["image_id"] for r in rows} & set(gone)
    ledger = Ledger(root, "retrieve-s")  # a kill after the unit's kept lists, before its marker: the same rows
    for name in ("all", "_complete"):
        os.remove(os.path.join(ledger.dir, f"{name}.json"))
    searched[0] = 0
    assert run_stage("retrieve", root, config, executor="local").units_run == 1 and searched[0] == 0
    assert query(root, RETRIEVED_SQL).to_pylist() == rows
