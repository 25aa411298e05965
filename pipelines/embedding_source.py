"""Where the vectors to cluster come from: the catalog's table, a ``.npy`` pair, or a Parquet file.

Users often bring their own embeddings; every form ends as ``(image_ids, x)`` in memory.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.embeddings import load_embeddings, to_numpy
from catalog.paths import resolve
from catalog.shards import table_exists
from catalog.sql import query


def load_vectors(root: str, embeddings: str | None = None, ids: str | None = None,
                 column: str = "embedding", id_column: str = "image_id") -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids [N] int64, x [N, d] float32)`` from the chosen source."""
    if embeddings is None:
        return load_embeddings(root)
    if embeddings.endswith(".npy"):
        if ids is None:
            raise ValueError("--embeddings FILE.npy needs --ids FILE.npy (one int64 id per row)")
        x = np.load(embeddings, mmap_mode="r")
        image_ids = np.load(ids)
        if len(image_ids) != len(x):
            raise ValueError(f"{ids} has {len(image_ids)} ids but {embeddings} has {len(x)} rows")
        return image_ids.astype(np.int64), np.asarray(x, dtype=np.float32)
    fs, path = resolve(embeddings)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=[id_column, column])
    col = table.column(column).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        x = to_numpy(col, col.type.list_size).astype(np.float32)
    else:  # variable-length lists: every row must still have the same length
        x = np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32)
    return table.column(id_column).to_numpy().astype(np.int64), x


def removed_ids(root: str) -> np.ndarray:
    """Images the dedup stage removed; clustering and retrieval leave them out."""
    if not table_exists(root, "duplicates"):
        return np.empty(0, np.int64)
    return query(root, "SELECT DISTINCT image_id FROM duplicates").column(0).to_numpy()
