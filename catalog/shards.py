"""Sharded Parquet tables: write bounded, atomically committed shards; read them back.

A table is a folder of ``*.parquet`` shards. Shards are named after the input unit that produced
them, so redoing a unit overwrites its own shards instead of adding rows: with the stage ledger this
is what makes every stage safe to kill and rerun.

A shard that is not what it should be (a file planted in a table folder, a truncated copy, flipped
bits, a shard of another table) is refused by name, never read as data: every data page carries a
CRC checked on read, and ``check_shards`` reads every footer (readable, this table's, a known schema
version) before a stage reads the table.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import MissingInputError, UserError
from catalog.images import resolve_uris
from catalog.paths import is_local, is_transient, join, ls, resolve, retry, write_bytes_atomic
from catalog.schemas import TABLE_KEY, CatalogVersionError, check_version

DEFAULT_MAX_ROWS = 250_000
# Row groups are the unit Parquet readers decode whole: 32k rows keep a streamed read of a 384-d float16
# embeddings shard at ~25 MB decoded at a time instead of the whole shard (190 MB at 250k rows).
ROW_GROUP_ROWS = 32_768
_SAFE_UNIT = re.compile(r"^[A-Za-z0-9._=-]+$")
_FOOTER_READERS = 16  # object stores: footers are read in parallel, one small ranged read each


class CorruptShardError(UserError):
    """A file in a table's folder that cannot be read as that table's data."""


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
        with pq.ParquetWriter(sink, piece.schema, compression="zstd", write_page_checksum=True) as writer:
            if piece.num_rows:  # an empty shard has no row group: some readers (HF datasets) fail on empty ones
                writer.write_table(piece, row_group_size=ROW_GROUP_ROWS)
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


def _corrupt(url: str, error: Exception) -> CorruptShardError:
    """The error naming a bad shard, and what to do: rewrite it with the run that wrote it, or remove it."""
    name = posixpath.basename(url)
    run = name.split("=", 1)[0] if "=" in name else None
    remedy = (f"rerun the stage of run {run!r} with --overwrite to write it again" if run else
              "move it out of the table's folder")
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CorruptShardError(f"{url} is not a readable shard of its table ({detail}); {remedy}")


def _check_schema(schema: pa.Schema, url: str, table: str | None) -> None:
    check_version(schema, url)
    written_for = (schema.metadata or {}).get(TABLE_KEY)
    if table is not None and written_for is not None and written_for.decode() != table:
        raise CorruptShardError(f"{url} is a shard of table {written_for.decode()!r}, not of {table!r}: "
                                "move it out of this table's folder")


def _readable(url: str, read):
    """Run ``read`` on a shard, turning what a damaged file raises into `CorruptShardError`; a missing
    file or a store that stays unavailable is not the shard's fault and passes through."""
    try:
        return retry(read)
    except (UserError, FileNotFoundError):
        raise
    except (pa.ArrowException, OSError, ValueError, EOFError) as e:
        if is_transient(e):
            raise
        raise _corrupt(url, e) from e


def shard_rows(url: str, table: str | None = None) -> int:
    """A shard's row count, from its footer, after the same checks as `read_shard` (not its pages)."""
    fs, path = resolve(url)

    def read() -> int:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            _check_schema(pf.schema_arrow, url, table)
            return pf.metadata.num_rows

    return _readable(url, read)


def read_shard(url: str, columns: list[str] | None = None, table: str | None = None) -> pa.Table:
    """One shard, after checking its schema version (and that it belongs to ``table``); every data page's
    CRC is verified. The whole read is retried on transient errors."""
    fs, path = resolve(url)

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            _check_schema(pf.schema_arrow, url, table)
            return pf.read(columns=columns)

    return _readable(url, read)


def check_shards(root: str, table: str) -> dict[str, pa.Schema]:
    """Every shard's schema, from its footer (no data pages are read): refuse the table, naming its bad
    shards, if any is unreadable, of another table or of a newer schema version."""
    urls = shard_urls(root, table)

    def footer(url: str) -> pa.Schema | UserError:
        fs, path = resolve(url)

        def read() -> pa.Schema:
            with fs.open(path, "rb") as f:
                schema = pq.read_schema(f)
            _check_schema(schema, url, table)
            return schema

        try:
            return _readable(url, read)
        except (CorruptShardError, CatalogVersionError) as e:
            return e

    with ThreadPoolExecutor(max_workers=1 if is_local(root) else _FOOTER_READERS) as pool:
        found = dict(zip(urls, pool.map(footer, urls)))
    bad = [e for e in found.values() if isinstance(e, UserError)]
    if bad:
        more = f" (and {len(bad) - 1} more bad shard(s))" if len(bad) > 1 else ""
        raise type(bad[0])(f"table {table!r} of {root}: {bad[0]}{more}")
    return found


def _with_resolved_uris(root: str, data: pa.Table) -> pa.Table:
    """``data`` with its catalog-relative ``uri`` values (a packed image's) joined onto ``root``."""
    if "uri" not in data.column_names:
        return data
    i = data.column_names.index("uri")
    return data.set_column(i, data.schema.field(i), resolve_uris(root, data.column(i)))


def read_table(root: str, table: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole table, checking every shard's schema version first; URIs come back absolute."""
    urls = shard_urls(root, table)
    if not urls:
        raise MissingInputError(f"catalog {root} has no table {table!r}")
    return _with_resolved_uris(root, pa.concat_tables([read_shard(url, columns, table) for url in urls]))


def iter_shards(root: str, table: str, columns: list[str] | None = None):
    """Yield ``(url, pa.Table)`` shard by shard, for stages that stream a large table."""
    for url in shard_urls(root, table):
        yield url, _with_resolved_uris(root, read_shard(url, columns, table))


def iter_batches(root: str, table: str, columns: list[str] | None = None, batch_rows: int = 65_536):
    """Yield the rows of a table as record batches of at most ``batch_rows`` rows, in `read_table`'s
    order, reading one batch at a time (memory bounded by the batch, whatever the table's size), with
    `read_shard`'s checks: schema version and table, page CRCs, absolute URIs."""
    urls = shard_urls(root, table)
    if not urls:
        raise MissingInputError(f"catalog {root} has no table {table!r}")
    for url in urls:
        fs, path = resolve(url)
        with fs.open(path, "rb") as f:
            pf = _readable(url, lambda f=f: pq.ParquetFile(f, page_checksum_verification=True))
            _check_schema(pf.schema_arrow, url, table)
            try:
                for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                    yield _with_resolved_uris(root, pa.Table.from_batches([batch])).to_batches()[0]
            except (pa.ArrowException, OSError) as e:
                if is_transient(e):
                    raise
                raise _corrupt(url, e) from e


def delete_shards(root: str, table: str, prefix: str) -> None:
    """Delete the shards of ``table`` whose file names start with ``prefix`` (one run's rows)."""
    fs, _ = resolve(root)
    for url in shard_urls(root, table):
        if posixpath.basename(url).startswith(prefix):
            _, path = resolve(url)
            retry(lambda p=path: fs.rm(p))
    fs.invalidate_cache(resolve(table_dir(root, table))[1])
