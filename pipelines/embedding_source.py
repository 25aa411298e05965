"""Where the vectors to cluster come from: the catalog's table, a ``.npy`` pair, or a Parquet file.

Users often bring their own embeddings; every form ends as ``(image_ids, x)``: ids sorted, x in its
storage dtype, one copy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.embeddings import kept_mask, load_npy_pair, load_rows, to_numpy
from catalog.errors import UserError
from catalog.paths import resolve
from catalog.schemas import DUPLICATES_TABLE, ERRORS_TABLE, FILTER_STAGE
from catalog.shards import table_exists
from catalog.sql import query


def load_vectors(root: str, embeddings: str | None = None, ids: str | None = None,
                 column: str = "embedding", id_column: str = "image_id",
                 exclude_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids [N] int64 sorted, x [N, d])`` from the chosen source, without ``exclude_ids``.

    ``x`` stays in its storage dtype (float16 from ``curate embed``): stages convert one chunk at a time.
    An unfiltered, sorted ``.npy`` stays memory-mapped.
    """
    if embeddings is None:
        return load_rows(root, exclude_ids=exclude_ids)
    if embeddings.endswith(".npy"):
        if ids is None:
            raise UserError("--embeddings FILE.npy needs --ids FILE.npy (one int64 id per row)")
        image_ids, x = load_npy_pair(embeddings, ids)
    else:
        image_ids, x = _parquet_vectors(embeddings, column, id_column)
    return _kept_in_id_order(image_ids, x, exclude_ids)


def _parquet_vectors(url: str, column: str, id_column: str) -> tuple[np.ndarray, np.ndarray]:
    fs, path = resolve(url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=[id_column, column])
    image_ids = table.column(id_column).to_numpy().astype(np.int64)
    col = table.column(column).combine_chunks()
    del table
    if pa.types.is_fixed_size_list(col.type):
        return image_ids, to_numpy(col, col.type.list_size)
    return image_ids, np.stack(col.to_numpy(zero_copy_only=False))  # variable-length lists of one length


def _kept_in_id_order(image_ids: np.ndarray, x: np.ndarray,
                      exclude_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The rows not excluded, sorted by id, as one gather (none at all when nothing moves)."""
    keep = kept_mask(image_ids, exclude_ids)
    rows = np.flatnonzero(keep)[np.argsort(image_ids[keep], kind="stable")]
    if len(rows) == len(image_ids) and np.array_equal(rows, np.arange(len(rows))):
        return image_ids, x
    return image_ids[rows], x[rows]


def removed_ids(root: str) -> np.ndarray:
    """Images the dedup stage removed; clustering and retrieval leave them out."""
    if not table_exists(root, DUPLICATES_TABLE):
        return np.empty(0, np.int64)
    return query(root, "SELECT DISTINCT image_id FROM duplicates").column(0).to_numpy()


def filtered_ids(root: str) -> np.ndarray:
    """Images the filter stage removed (its ``errors`` rows); clustering leaves them out."""
    if not table_exists(root, ERRORS_TABLE):
        return np.empty(0, np.int64)
    return query(root, "SELECT DISTINCT image_id FROM errors WHERE stage = ?", [FILTER_STAGE]).column(0).to_numpy()
