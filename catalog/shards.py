"""Sharded Parquet tables: write bounded, atomically committed shards; read them back.

A table is a folder of ``*.parquet`` shards. Shards are named after the input unit that produced
them, so redoing a unit overwrites its own shards instead of adding rows: with the stage ledger this
is what makes every stage safe to kill and rerun.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import MissingInputError
from catalog.paths import join, ls, resolve, retry, write_bytes_atomic
from catalog.schemas import check_version

DEFAULT_MAX_ROWS = 250_000
_SAFE_UNIT = re.compile(r"^[A-Za-z0-9._=-]+$")


@dataclass(frozen=True)
class WrittenShard:
    """A committed shard: where, how many bytes, and the sha256 of those bytes (the content fingerprint)."""

    url: str
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)


def table_dir(root: str, table: str) -> str:
    return join(root, table)


def write_shards(
    root: str,
    table: str,
    unit: str,
    data: pa.Table,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> list[WrittenShard]:
    """Write ``data`` as ``<table>/<unit>-<i>.parquet`` shards of at most ``max_rows`` rows.

    Each shard is serialised in memory and committed with one atomic write, zstd-compressed, with the
    table's schema (and its version metadata) embedded; its sha256 is taken from the same bytes.
    """
    if not _SAFE_UNIT.match(unit):
        raise ValueError(f"unit name {unit!r} must match {_SAFE_UNIT.pattern}")
    written = []
    n_shards = max(1, -(-data.num_rows // max_rows))
    for i in range(n_shards):
        piece = data.slice(i * max_rows, max_rows)
        sink = pa.BufferOutputStream()
        pq.write_table(piece, sink, compression="zstd")
        url = join(table_dir(root, table), f"{unit}-{i:05d}.parquet")
        data_bytes = sink.getvalue().to_pybytes()
        write_bytes_atomic(url, data_bytes)
        written.append(WrittenShard(url, len(data_bytes), hashlib.sha256(data_bytes).hexdigest()))
    return written


def shard_urls(root: str, table: str) -> list[str]:
    """All committed shards of a table, sorted by name (deterministic read order), listed fresh."""
    return [url for url in ls(table_dir(root, table)) if url.endswith(".parquet")]


def shard_sizes(root: str, table: str) -> dict[str, int]:
    """``{shard file name: bytes}`` of every committed shard of a table, listed fresh."""
    fs, path = resolve(table_dir(root, table), fresh=True)
    try:
        infos = retry(lambda: fs.ls(path, detail=True))
    except FileNotFoundError:
        return {}
    return {posixpath.basename(i["name"]): int(i["size"]) for i in infos if i["name"].endswith(".parquet")}


def table_exists(root: str, table: str) -> bool:
    return bool(shard_urls(root, table))


def read_schema(url: str) -> pa.Schema:
    fs, path = resolve(url)

    def read() -> pa.Schema:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)

    return retry(read)


def read_shard(url: str, columns: list[str] | None = None) -> pa.Table:
    """One shard, after checking its schema version; the whole read is retried on transient errors."""
    fs, path = resolve(url)

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            check_version(pf.schema_arrow, url)
            return pf.read(columns=columns)

    return retry(read)


def read_table(root: str, table: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole table, checking every shard's schema version first."""
    urls = shard_urls(root, table)
    if not urls:
        raise MissingInputError(f"catalog {root} has no table {table!r}")
    return pa.concat_tables([read_shard(url, columns) for url in urls])


def iter_shards(root: str, table: str, columns: list[str] | None = None):
    """Yield ``(url, pa.Table)`` shard by shard, for stages that stream a large table."""
    for url in shard_urls(root, table):
        yield url, read_shard(url, columns)


def iter_batches(root: str, table: str, columns: list[str] | None = None, batch_rows: int = 65_536):
    """Yield the rows of a table as record batches of at most ``batch_rows`` rows, in `read_table`'s
    order, reading one batch at a time (memory bounded by the batch, whatever the table's size)."""
    urls = shard_urls(root, table)
    if not urls:
        raise MissingInputError(f"catalog {root} has no table {table!r}")
    for url in urls:
        fs, path = resolve(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            check_version(pf.schema_arrow, url)
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


def delete_shards(root: str, table: str, prefix: str) -> None:
    """Delete the shards of ``table`` whose file names start with ``prefix`` (one run's rows)."""
    fs, _ = resolve(root)
    for url in shard_urls(root, table):
        if posixpath.basename(url).startswith(prefix):
            _, path = resolve(url)
            retry(lambda p=path: fs.rm(p))
    fs.invalidate_cache(resolve(table_dir(root, table))[1])
