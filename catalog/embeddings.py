"""Embedding tables ⇄ one contiguous array: the fast path from Parquet to k-means and retrieval.

An embeddings table stores a fixed-size list per row, so each shard's values are one flat buffer
that reshapes to ``[rows, dim]`` without copying row by row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.errors import MissingInputError, UserError, short_repr
from catalog.paths import is_local, resolve
from catalog.schemas import EMBEDDINGS_TABLE
from catalog.shards import check_shards, iter_batches, iter_shards, read_schema, read_shard, shard_urls, write_shards


class ModelMismatchError(UserError, ValueError):
    """Two sets of embeddings that would be compared or mixed come from another model or preprocessing."""


@dataclass(frozen=True)
class EmbeddingIdentity:
    """What makes two embedding tables comparable, stored in every shard's metadata.

    ``model`` names the architecture (a registry size, or ``curate`` for our own exports, whose config the
    weights hash covers); ``weights_sha256`` the weights, so the same file reached by another path is the
    same model. Where a file lives is recorded beside it (``model_source``), never compared.
    """

    model: str
    weights_sha256: str
    preprocess: str
    pooling: str
    normalized: str

    def metadata(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> EmbeddingIdentity | None:
        names = [f.name for f in fields(cls)]
        return cls(**{n: meta[n] for n in names}) if all(n in meta for n in names) else None

    @classmethod
    def of_table(cls, root: str, table: str = EMBEDDINGS_TABLE) -> EmbeddingIdentity | None:
        """The identity every shard of the table records (None for an empty or unstamped table); a table
        whose shards disagree is refused, naming one shard of each kind."""
        return cls.of_shards(f"{root}/{table}", check_shards(root, table))

    @classmethod
    def of_shards(cls, where: str, shard_schemas: dict[str, pa.Schema]) -> EmbeddingIdentity | None:
        """The one identity of these shards' schemas (``{url: schema}``), refusing a mix."""
        kinds: dict[EmbeddingIdentity | None, str] = {}
        for url, schema in shard_schemas.items():
            kinds.setdefault(cls.from_metadata(schemas.metadata_of(schema)), url)
        if len(kinds) > 1:
            raise _mixed(where, list(kinds.items()))
        return next(iter(kinds), None)

    def check(self, other: EmbeddingIdentity | None, where: str, remedy: str) -> None:
        """Refuse ``other`` (the embeddings found at ``where``) unless it is this identity."""
        if other is None or other == self:
            return
        detail = _differences(other, self, "there", "here")
        raise ModelMismatchError(f"{where} holds embeddings of another model or preprocessing ({detail}); {remedy}")


def _differences(a: EmbeddingIdentity | None, b: EmbeddingIdentity | None, where_a: str, where_b: str) -> str:
    """``field: value where_a vs value where_b`` for every field in which two identities differ."""
    pairs = [(f.name, getattr(a, f.name, None), getattr(b, f.name, None)) for f in fields(EmbeddingIdentity)]
    return "; ".join(f"{name}: {short_repr(x)} {where_a} vs {short_repr(y)} {where_b}"
                     for name, x, y in pairs if x != y)


def _mixed(where: str, kinds: list[tuple[EmbeddingIdentity | None, str]]) -> ModelMismatchError:
    (first, a), (second, b) = kinds[:2]
    detail = _differences(first, second, f"in {a}", f"in {b}")
    return ModelMismatchError(f"{where} mixes embeddings of {len(kinds)} models or preprocessings ({detail}): "
                              "rerun `curate embed --overwrite` to embed it again with one")


def table_dim_and_dtype(schema: pa.Schema) -> tuple[int, np.dtype]:
    field = schema.field("embedding").type
    return field.list_size, np.dtype(field.value_type.to_pandas_dtype())


def embedding_metadata(root: str, table: str = EMBEDDINGS_TABLE) -> dict[str, str]:
    """The model id, weights hash and preprocessing recorded in the table's files."""
    urls = shard_urls(root, table)
    if not urls:
        return {}
    return schemas.metadata_of(read_schema(urls[0]))


def recorded_embed_config(root: str, table: str = EMBEDDINGS_TABLE) -> dict[str, object]:
    """The embed settings a table was made with (to embed a seed set exactly like the pool)."""
    meta = embedding_metadata(root, table)
    if "embed_config" not in meta:
        raise MissingInputError(f"{root}/{table} records no embed settings: embed the pool with `curate embed` first")
    return json.loads(meta["embed_config"])


def to_numpy(column: pa.ChunkedArray | pa.FixedSizeListArray, dim: int) -> np.ndarray:
    """A fixed-size-list column as a [rows, dim] array (zero-copy per chunk where possible)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for c in chunks]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def load_embeddings(root: str, table: str = EMBEDDINGS_TABLE, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """All embeddings in memory as ``(image_ids [N], x [N, dim])``, in shard order; shards of two models
    or preprocessings are never mixed."""
    ids, xs = [], []
    kinds: dict[EmbeddingIdentity | None, str] = {}
    for url, shard in iter_shards(root, table):
        kinds.setdefault(EmbeddingIdentity.from_metadata(schemas.metadata_of(shard.schema)), url)
        if len(kinds) > 1:
            raise _mixed(f"{root}/{table}", list(kinds.items()))
        dim, _ = table_dim_and_dtype(shard.schema)
        ids.append(shard.column("image_id").to_numpy())
        xs.append(to_numpy(shard.column("embedding"), dim).astype(dtype, copy=False))
    if not ids:
        raise MissingInputError(f"catalog {root} has no {table} table: run `curate embed` first")
    return np.concatenate(ids), np.concatenate(xs)


def _table_ids(root: str, table: str) -> tuple[int, np.dtype, np.ndarray]:
    """``(dim, storage dtype, every row's image_id in shard order)`` of a table whose shards are checked
    to hold one model's vectors of one width."""
    shard_schemas = check_shards(root, table)
    if not shard_schemas:
        raise MissingInputError(f"catalog {root} has no {table} table: run `curate embed` first")
    EmbeddingIdentity.of_shards(f"{root}/{table}", shard_schemas)  # refuses shards of two models
    dims = {table_dim_and_dtype(schema) for schema in shard_schemas.values()}
    if len(dims) > 1:
        raise UserError(f"{root}/{table} mixes embedding widths or dtypes: {sorted((d, t.name) for d, t in dims)}")
    ((dim, dtype),) = dims
    ids = np.concatenate([read_shard(url, ["image_id"], table).column("image_id").to_numpy()
                          for url in shard_schemas])
    return dim, dtype, ids


def kept_mask(ids: np.ndarray, exclude_ids: np.ndarray | None) -> np.ndarray:
    """Which of ``ids`` are not among ``exclude_ids`` (all, without a search, when none is excluded)."""
    return np.ones(len(ids), bool) if exclude_ids is None or not len(exclude_ids) else ~np.isin(ids, exclude_ids)


def load_ids(root: str, table: str = EMBEDDINGS_TABLE, exclude_ids: np.ndarray | None = None) -> np.ndarray:
    """The sorted ids `load_rows` returns, without reading a vector: for callers that need only which
    images have embeddings (cluster-mode retrieval), 8 bytes a row instead of a copy of the table."""
    _, _, ids = _table_ids(root, table)
    return np.sort(ids[kept_mask(ids, exclude_ids)])


@dataclass(frozen=True)
class RowStream:
    """The rows `load_rows` returns (row r is the vector of ``ids[r]``), read from the table batch by batch
    each time they are asked for and never held: for a stage that keeps them elsewhere, as dedup's index
    keeps them in its lists, and so needs no copy of its own. 12 bytes a row (the ids, and the row of
    each table row in read order)."""

    root: str
    table: str
    dim: int
    dtype: np.dtype
    ids: np.ndarray  # int64 [N], sorted
    dest: np.ndarray  # int32 (int64 past 2³¹ rows) [table rows], in read order: its row, or -1 where excluded
    batch_rows: int = 16_384

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), self.dim

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, vectors)`` of each record batch's kept rows, in the table's read order."""
        at = 0
        for batch in iter_batches(self.root, self.table, ["embedding"], batch_rows=self.batch_rows):
            rows = self.dest[at : at + batch.num_rows]
            kept = rows >= 0
            yield rows[kept].astype(np.int64), to_numpy(batch.column(0), self.dim)[kept]
            at += batch.num_rows
        if at != len(self.dest):
            raise UserError(f"{self.root}/{self.table} changed while it was read ({len(self.dest)} ids, "
                            f"then {at} vectors)")
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed decode buffers otherwise

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (sorted, unique), in one pass over the table."""
        out = np.empty((len(rows), self.dim), self.dtype)
        for got, vectors in self.batches():
            at = np.minimum(np.searchsorted(rows, got), max(len(rows) - 1, 0))
            hit = (rows[at] == got) if len(rows) else np.zeros(len(got), bool)
            out[at[hit]] = vectors[hit]
        return out

    def load(self) -> np.ndarray:
        """Every row in memory, each record batch written straight to its rows."""
        x = np.empty(self.shape, self.dtype)
        for rows, vectors in self.batches():
            x[rows] = vectors
        return x


def row_stream(root: str, table: str = EMBEDDINGS_TABLE, exclude_ids: np.ndarray | None = None,
               batch_rows: int = 16_384) -> RowStream:
    """The kept rows of ``table`` in id order, as a `RowStream` (only the ids are read here)."""
    dim, dtype, ids = _table_ids(root, table)
    keep = kept_mask(ids, exclude_ids)
    order = np.argsort(ids[keep], kind="stable")
    places = np.int32 if len(ids) < 2**31 else np.int64  # 4 bytes a row below 2 billion rows
    dest = np.full(len(ids), -1, places)
    dest[np.flatnonzero(keep)[order]] = np.arange(len(order), dtype=places)
    return RowStream(root, table, dim, np.dtype(dtype), ids[keep][order], dest, batch_rows)


def load_rows(root: str, table: str = EMBEDDINGS_TABLE, exclude_ids: np.ndarray | None = None,
              batch_rows: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids [N] sorted, x [N, dim])`` in the table's storage dtype (float16 as embed writes it),
    without the rows of ``exclude_ids``: the one in-memory copy dedup, cluster and retrieve work from.

    The ids are read first, so the kept rows' places in id order are known before any vector is; each
    record batch of ``batch_rows`` is then written straight to its rows (`RowStream.load`). Memory is the
    output plus ~20 bytes per row while loading (ids, their places) and one batch: no float32 copy, no
    per-shard list to concatenate, no filtered or sorted second copy. The row order depends on the ids
    only, never on the shard layout.
    """
    stream = row_stream(root, table, exclude_ids, batch_rows)
    return stream.ids, stream.load()


def export_npy(root: str, out_dir: str, table: str = EMBEDDINGS_TABLE, dtype: str = "float32") -> tuple[str, str]:
    """Write ``embeddings.npy`` (memory-mappable) and ``image_ids.npy`` shard by shard.

    Memory stays at one shard however large the table is.
    """
    urls = shard_urls(root, table)
    if not urls:
        raise MissingInputError(f"catalog {root} has no {table} table")
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


def embeddings_table(ids: np.ndarray, x: np.ndarray, metadata: dict[str, str],
                     table: str = EMBEDDINGS_TABLE) -> pa.Table:
    """Build an embeddings Arrow table from arrays (float16 or float32 storage follows ``x``)."""
    value_type = pa.float16() if x.dtype == np.float16 else pa.float32()
    schema = schemas.stamp(schemas.embeddings(x.shape[1], value_type), table, metadata)
    values = pa.array(np.ascontiguousarray(x).reshape(-1), type=value_type)
    column = pa.FixedSizeListArray.from_arrays(values, x.shape[1])
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), column], schema=schema)


def load_npy(url: str) -> np.ndarray:
    """A ``.npy`` file from any fsspec location: memory-mapped when local, read whole otherwise."""
    fs, path = resolve(url)
    if is_local(url):
        if not fs.exists(path):
            raise MissingInputError(f"{url}: no such file")
        return np.load(path, mmap_mode="r")
    with fs.open(path, "rb") as f:
        return np.load(f)


def load_npy_pair(x_path: str, id_path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [N] int64, x [N, d])`` of precomputed embeddings brought as two ``.npy`` files."""
    x, ids = load_npy(x_path), load_npy(id_path)
    if len(ids) != len(x):
        raise UserError(f"{id_path} has {len(ids)} ids but {x_path} has {len(x)} rows")
    return np.asarray(ids, np.int64), x


def import_npy(x_path: str, id_path: str, root: str, metadata: dict[str, str], table: str = EMBEDDINGS_TABLE,
               rows_per_shard: int = 250_000) -> int:
    """Bring precomputed embeddings (``.npy`` + ids) into a catalog table; returns rows written."""
    ids, x = load_npy_pair(x_path, id_path)
    for i, start in enumerate(range(0, len(x), rows_per_shard)):
        stop = start + rows_per_shard
        write_shards(root, table, f"import-{i:06d}", embeddings_table(ids[start:stop], x[start:stop], metadata, table),
                     max_rows=rows_per_shard)
    return len(x)
