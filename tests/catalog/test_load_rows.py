"""`load_rows`: the one in-memory copy of a table's vectors that dedup, cluster and retrieve work from."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from catalog.embeddings import ModelMismatchError, embeddings_table, load_embeddings, load_ids, load_rows
from catalog.shards import write_shards
from pipelines.embedding_source import load_vectors

IDENTITY = {"model": "m", "weights_sha256": "0" * 64, "preprocess": "p", "pooling": "cls", "normalized": "true"}
N, DIM = 5_000, 128


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
    """A float16 table of N rows in 5 shards, ids shuffled across them."""
    root = str(tmp_path_factory.mktemp("rows") / "catalog")
    rng = np.random.default_rng(0)
    ids = rng.permutation(N).astype(np.int64) * 7 + 3
    x = rng.normal(size=(N, DIM)).astype(np.float16)
    write_shards(root, "embeddings", "embed=a", embeddings_table(ids, x, IDENTITY), max_rows=1_000)
    return root, ids, x


def test_rows_come_sorted_by_id_in_the_storage_dtype_without_the_excluded(table):
    root, ids, x = table
    exclude = ids[::3]
    got_ids, got_x = load_rows(root, exclude_ids=exclude, batch_rows=256)
    keep = ~np.isin(ids, exclude)
    order = np.argsort(ids[keep])
    assert got_x.dtype == np.float16 and got_x.shape == (keep.sum(), DIM)
    assert np.array_equal(got_ids, ids[keep][order])
    assert np.array_equal(got_x, x[keep][order])
    assert np.array_equal(load_ids(root, exclude_ids=exclude), got_ids)  # the same rows, no vector read
    # the same rows as the whole-table loader, however the shards are laid out
    all_ids, all_x = load_embeddings(root, dtype="float16")
    by_id = dict(zip(all_ids.tolist(), all_x))
    assert np.array_equal(np.stack([by_id[i] for i in got_ids[:50].tolist()]), got_x[:50])


def test_loading_holds_one_copy_plus_a_batch(table):
    """numpy memory at the peak: the output, ~24 B a row of ids and their order, one batch; no float32 copy
    (N × DIM × 4 B alone would exceed this) and no second, sorted or filtered copy."""
    root, _, _ = table
    tracemalloc.start()
    try:
        _, x = load_rows(root, batch_rows=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    allowed = x.nbytes + 40 * N + 4 * 256 * DIM * 4
    assert peak <= allowed, f"peak {peak:,} B for a {x.nbytes:,} B result (allowed {allowed:,})"
    assert x.nbytes + N * DIM * 2 > allowed  # a second float16 copy would not fit


def test_a_sorted_npy_pair_stays_memory_mapped(tmp_path):
    x = np.random.default_rng(1).normal(size=(100, 8)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", np.arange(100, dtype=np.int64))
    ids, got = load_vectors("unused", str(tmp_path / "x.npy"), str(tmp_path / "ids.npy"))
    assert isinstance(got, np.memmap) and got.dtype == np.float16
    ids, got = load_vectors("unused", str(tmp_path / "x.npy"), str(tmp_path / "ids.npy"), exclude_ids=np.array([5]))
    assert 5 not in ids and got.dtype == np.float16 and np.array_equal(got, np.delete(x, 5, axis=0))


def test_shards_of_two_models_are_refused(table, tmp_path):
    root = str(tmp_path / "mixed")
    x = np.zeros((10, DIM), np.float16)
    write_shards(root, "embeddings", "embed=a", embeddings_table(np.arange(10), x, IDENTITY))
    write_shards(root, "embeddings", "embed=b", embeddings_table(np.arange(10, 20), x, {**IDENTITY, "model": "n"}))
    with pytest.raises(ModelMismatchError, match="mixes embeddings of 2 models"):
        load_rows(root)
