"""k-NN retrieval past exact search: its IVF index is built from the embeddings table read batch by batch,
saved under a key of the table's state and the pool's images, and used again only while both hold."""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa

from catalog.embeddings import embeddings_table
from catalog.schemas import DUPLICATES, DUPLICATES_TABLE, EMBEDDINGS_TABLE, stamp
from catalog.shards import write_shards
from catalog.sql import query
from curation.index import EXACT_MAX
from pipelines.stage import run_stage
from tests.helpers import EMBEDDING_IDENTITY, write_embedded_pool


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_retrieval_past_exact_search_finds_each_seeds_neighbour_and_keys_its_index(tmp_path):
    rng = np.random.default_rng(3)
    n = EXACT_MAX + 5_000
    pool = _unit(rng.normal(size=(n, 32)))
    near = rng.choice(n, size=30, replace=False)
    seed_x = _unit(pool[near] + rng.normal(0, 0.02, (30, 32)))  # each seed image next to one pool image
    seed_root = str(tmp_path / "seed")
    write_shards(seed_root, EMBEDDINGS_TABLE, "embed=s",
                 embeddings_table(np.arange(30) + 10**6, seed_x, EMBEDDING_IDENTITY))
    root = str(tmp_path / "cat")
    write_embedded_pool(root, "first", np.arange(n), pool)
    config = {"seed_set": "s", "mode": "knn", "k": 5, "seeds": {"seeds": {"s": {"embeddings": seed_root}}}}
    run_stage("retrieve", root, config, executor="local")
    first = query(root, "SELECT seed_image_id - 1000000 AS seed, image_id FROM retrieved WHERE rank = 0 "
                        "ORDER BY seed").to_pylist()
    assert [r["image_id"] for r in first] == near.tolist()  # every seed's nearest is its planted neighbour
    saved = glob.glob(os.path.join(root, "_index", "pool-*.faiss"))
    assert len(saved) == 1
    # a planted neighbour leaves the pool (a duplicate now): the pool's images differ, so another index
    write_shards(root, DUPLICATES_TABLE, "dedup=planted", pa.table(
        {"image_id": near[:1], "kept_id": [-1], "similarity": np.ones(1, np.float32), "reason": ["copy"]},
        schema=stamp(DUPLICATES, DUPLICATES_TABLE)))
    run_stage("retrieve", root, config, executor="local", overwrite=True)
    assert len(glob.glob(os.path.join(root, "_index", "pool-*.faiss"))) == 2
    again = query(root, "SELECT image_id FROM retrieved WHERE seed_image_id = 1000000 ORDER BY rank").to_pylist()
    assert near[0] not in {r["image_id"] for r in again} and len(again) == 5
