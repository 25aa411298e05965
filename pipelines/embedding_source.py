"""Where the vectors to cluster come from: the catalog's table, a ``.npy`` pair, or a Parquet file.

Users often bring their own embeddings; every form ends as ``(image_ids, x)`` in memory.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.embeddings import load_embeddings, load_npy_pair, to_numpy
from catalog.errors import UserError
from catalog.paths import resolve
from catalog.schemas import DUPLICATES_TABLE
from catalog.shards import table_exists
from catalog.sql import query


def load_vectors(root: str, embeddings: str | None = None, ids: str | None = None,
                 column: str = "embedding", id_column: str = "image_id") -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids [N] int64, x [N, d] float32)`` from the chosen source."""
    if embeddings is None:
        return load_embeddings(root)
    if embeddings.endswith(".npy"):
        if ids is None:
            raise UserError("--embeddings FILE.npy needs --ids FILE.npy (one int64 id per row)")
        image_ids, x = load_npy_pair(embeddings, ids)
        return image_ids, np.asarray(x, dtype=np.float32)
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
    if not table_exists(root, DUPLICATES_TABLE):
        return np.empty(0, np.int64)
    return query(root, "SELECT DISTINCT image_id FROM duplicates").column(0).to_numpy()
