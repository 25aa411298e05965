"""An index built from a table read batch by batch holds its rows: the same index as from the loaded
array, and its lists read back as that array, row for row."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from catalog.embeddings import embeddings_table, load_rows, row_stream
from catalog.shards import write_shards
from curation.dedup import copy_dedup
from curation.index import build_index, fingerprint
from curation.index_rows import ListRows, place_rows

IDENTITY = {"model": "m", "weights_sha256": "0" * 64, "preprocess": "p", "pooling": "cls", "normalized": "true"}


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    """Unit rows around 30 centres (so lists differ in size), as float16."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, d))
    x = centres[rng.integers(30, size=n)] + 0.7 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A float16 table of 30,000 rows in 7 shards, ids shuffled across them; some ids excluded later."""
    root = str(tmp_path_factory.mktemp("rows") / "catalog")
    rng = np.random.default_rng(1)
    ids = rng.permutation(30_000).astype(np.int64) * 5 + 2
    write_shards(root, "embeddings", "embed=a", embeddings_table(ids, unit_rows(30_000, 40, 2), IDENTITY),
                 max_rows=4_500)
    return root, ids[::11]


def test_a_streamed_table_builds_the_index_of_its_loaded_rows(table):
    root, exclude = table
    _, x = load_rows(root, exclude_ids=exclude)
    stream = row_stream(root, exclude_ids=exclude, batch_rows=1_000)
    loaded = build_index(x, exact_max=1_000, seed=3, use_gpu=False)
    streamed = build_index(stream, exact_max=1_000, seed=3, use_gpu=False)
    assert isinstance(streamed.rows, ListRows) and loaded.rows is x
    assert streamed.params == loaded.params and streamed.fingerprint == loaded.fingerprint == fingerprint(x)
    # the same lists, labels and order within them, though the table gave its rows in another order
    np.testing.assert_array_equal(faiss.serialize_index(streamed.index), faiss.serialize_index(loaded.index))


def test_the_lists_read_back_as_the_rows(table):
    root, exclude = table
    _, x = load_rows(root, exclude_ids=exclude)
    rows = build_index(row_stream(root, exclude_ids=exclude), exact_max=1_000, seed=0, use_gpu=False).rows
    assert rows.shape == x.shape and rows.dtype == x.dtype and len(rows) == len(x)
    picked = np.random.default_rng(4).integers(len(x), size=500)
    np.testing.assert_array_equal(rows[picked], x[picked])  # any rows, repeated, in any order
    np.testing.assert_array_equal(rows[100:9_000], x[100:9_000])
    np.testing.assert_array_equal(rows[len(x) - 1], x[-1])


def test_a_small_or_float32_table_is_loaded_not_read_from_the_index(tmp_path):
    root = str(tmp_path / "catalog")
    ids = np.arange(3_000, dtype=np.int64)
    write_shards(root, "embeddings", "embed=a", embeddings_table(ids, unit_rows(3_000, 16, 5), IDENTITY))
    built = build_index(row_stream(root), use_gpu=False)  # 3,000 rows: an exact index, rows loaded
    assert built.params["kind"] == "flat" and isinstance(built.rows, np.ndarray)
    np.testing.assert_array_equal(built.rows, load_rows(root)[1])
    wide = str(tmp_path / "float32")  # float16 codes would round float32 rows: they are loaded too
    ids = np.arange(25_000, dtype=np.int64)
    write_shards(wide, "embeddings", "embed=a",
                 embeddings_table(ids, unit_rows(25_000, 16, 6).astype(np.float32), IDENTITY))
    built = build_index(row_stream(wide), use_gpu=False)
    assert built.params["kind"] == "ivf_fp16" and built.rows.dtype == np.float32
    np.testing.assert_array_equal(built.rows, load_rows(wide)[1])


def test_places_are_rows_in_order_within_each_list():
    lists = np.array([2, 0, 2, 1, 2, 0])
    counts, place = place_rows(lists, 4)
    assert counts.tolist() == [2, 1, 3, 0]
    assert place.tolist() == [0, 0, 1, 0, 2, 1]


def test_copy_dedup_from_the_lists_equals_copy_dedup_from_the_loaded_rows(tmp_path):
    """The copy graph read from the index's own lists (queries, and the removed rows' similarities)
    is the graph of the loaded rows."""
    rng = np.random.default_rng(7)
    x = unit_rows(24_000, 32, 8).astype(np.float32)
    x[-400:] = x[:400] + rng.normal(0, 0.02, (400, 32))  # 400 near copies of the first rows
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    root = str(tmp_path / "catalog")
    ids = rng.permutation(24_000).astype(np.int64)
    write_shards(root, "embeddings", "embed=a", embeddings_table(ids, x.astype(np.float16), IDENTITY),
                 max_rows=5_000)
    sorted_ids, loaded = load_rows(root)
    priority = np.ones(len(sorted_ids))
    results = []
    for source in (loaded, row_stream(root)):
        index = build_index(source, seed=0, use_gpu=False)
        results.append(copy_dedup(index.rows, sorted_ids, priority, index=index))
    a, b = results
    assert len(a.removed_rows) >= 400
    for name in ("removed_rows", "keeper_of_removed", "removed_similarity", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.n_edges == b.n_edges


def test_an_index_refuses_rows_it_was_not_built_from():
    x = unit_rows(3_000, 16, 9)
    index = build_index(x, use_gpu=False)
    with pytest.raises(ValueError, match="not the embedding matrix"):
        copy_dedup(x[::-1].copy(), np.arange(3_000), np.ones(3_000), index=index)
    assert len(copy_dedup(index.rows, np.arange(3_000), np.ones(3_000), index=index).labels) == 3_000
