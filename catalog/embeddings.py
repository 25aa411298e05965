"""Embedding tables ⇄ one contiguous array: the fast path from Parquet to k-means and retrieval.

An embeddings table stores a fixed-size list per row, so each shard's values are one flat buffer
that reshapes to ``[rows, dim]`` without copying row by row.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.shards import iter_shards, read_schema, shard_urls, write_shards

EMBEDDINGS = "embeddings"


def table_dim_and_dtype(schema: pa.Schema) -> tuple[int, np.dtype]:
    field = schema.field("embedding").type
    return field.list_size, np.dtype(field.value_type.to_pandas_dtype())


def embedding_metadata(root: str, table: str = EMBEDDINGS) -> dict[str, str]:
    """The model id, weights hash and preprocessing recorded in the table's files."""
    urls = shard_urls(root, table)
    if not urls:
        return {}
    return schemas.metadata_of(read_schema(urls[0]))


def to_numpy(column: pa.ChunkedArray | pa.FixedSizeListArray, dim: int) -> np.ndarray:
    """A fixed-size-list column as a [rows, dim] array (zero-copy per chunk where possible)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for c in chunks]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def load_embeddings(root: str, table: str = EMBEDDINGS, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """All embeddings in memory as ``(image_ids [N], x [N, dim])``, in shard order."""
    ids, xs = [], []
    for _, shard in iter_shards(root, table):
        dim, _ = table_dim_and_dtype(shard.schema)
        ids.append(shard.column("image_id").to_numpy())
        xs.append(to_numpy(shard.column("embedding"), dim).astype(dtype, copy=False))
    if not ids:
        raise FileNotFoundError(f"catalog {root} has no {table} table: run `curate embed` first")
    return np.concatenate(ids), np.concatenate(xs)


def export_npy(root: str, out_dir: str, table: str = EMBEDDINGS, dtype: str = "float32") -> tuple[str, str]:
    """Write ``embeddings.npy`` (memory-mappable) and ``image_ids.npy`` shard by shard.

    Memory stays at one shard however large the table is.
    """
    urls = shard_urls(root, table)
    if not urls:
        raise FileNotFoundError(f"catalog {root} has no {table} table")
    dim, _ = table_dim_and_dtype(read_schema(urls[0]))
    from catalog.tables import describe

    n = describe(root, table).rows
    os.makedirs(out_dir, exist_ok=True)
    x_path, id_path = os.path.join(out_dir, "embeddings.npy"), os.path.join(out_dir, "image_ids.npy")
    x = np.lib.format.open_memmap(x_path, mode="w+", dtype=dtype, shape=(n, dim))
    ids = np.lib.format.open_memmap(id_path, mode="w+", dtype=np.int64, shape=(n,))
    at = 0
    for _, shard in iter_shards(root, table):
        rows = shard.num_rows
        x[at : at + rows] = to_numpy(shard.column("embedding"), dim)
        ids[at : at + rows] = shard.column("image_id").to_numpy()
        at += rows
    x.flush()
    ids.flush()
    return x_path, id_path


def embeddings_table(ids: np.ndarray, x: np.ndarray, metadata: dict[str, str], table: str = EMBEDDINGS) -> pa.Table:
    """Build an embeddings Arrow table from arrays (float16 or float32 storage follows ``x``)."""
    value_type = pa.float16() if x.dtype == np.float16 else pa.float32()
    schema = schemas.stamp(schemas.embeddings(x.shape[1], value_type), table, metadata)
    values = pa.array(np.ascontiguousarray(x).reshape(-1), type=value_type)
    column = pa.FixedSizeListArray.from_arrays(values, x.shape[1])
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), column], schema=schema)


def import_npy(x_path: str, id_path: str, root: str, metadata: dict[str, str], table: str = EMBEDDINGS,
               rows_per_shard: int = 250_000) -> int:
    """Bring precomputed embeddings (``.npy`` + ids) into a catalog table; returns rows written."""
    x = np.load(x_path, mmap_mode="r")
    ids = np.load(id_path, mmap_mode="r")
    if len(ids) != len(x):
        raise ValueError(f"{id_path} has {len(ids)} ids but {x_path} has {len(x)} rows")
    for i, start in enumerate(range(0, len(x), rows_per_shard)):
        stop = start + rows_per_shard
        write_shards(root, table, f"import-{i:06d}", embeddings_table(ids[start:stop], x[start:stop], metadata, table),
                     max_rows=rows_per_shard)
    return len(x)
