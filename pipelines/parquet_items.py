"""A Parquet list (one file, or a glob of ``.parquet`` files) as ingest's items: slices of rows, so that a
list that gained rows, or files, is appended to instead of ingested again (`catalog.ledger_items`).

Each file is cut into slices of whole row groups (`catalog.parquet_rows.row_slices`, so a slice reads
only its own row groups); a slice's key is its file and first row, and its fingerprint says what it
holds:

- a list of URIs: the pool URIs it gives (a URI named again gets a distinct one, `repeated_uri`,
  counted over the whole list in order), so a rewritten file whose earlier rows are unchanged keeps
  those slices, and only new or changed rows are read;
- inline bytes: its rows and the stored sizes of its row groups' column chunks (reading every cell at
  each plan would cost a second pass over the images), as a folder's files are known by size and
  stamp; a file rewritten with its earlier row groups kept (rows appended as new groups) appends.

A retired slice's rows that the list still gives (a re-cut file: other row groups, same rows) are
dropped and ingested again by the slice that now holds them; the others are ``removed`` (`still_listed`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog.config import ConfigError
from catalog.errors import MissingInputError
from catalog.images import parquet_row_uri, repeated_uri, split_uri
from catalog.ledger_items import Item
from catalog.manifest import fingerprint
from catalog.parquet_rows import footer, row_group_starts, row_slices
from catalog.paths import resolve, retry, with_protocol

log = logging.getLogger("curate.pipelines")

BYTES_COLUMNS = ("bytes", "image", "jpg", "png")


def is_parquet_source(source: str) -> bool:
    """A ``.parquet`` file or a glob of them (a folder is a folder of images, whatever its files are)."""
    fs, path = resolve(source)
    return path.endswith(".parquet") and (any(ch in path for ch in "*?[") or not fs.isdir(path))


def parquet_files(source: str) -> list[str]:
    """The files of the list, sorted; a single file is named as the user gave it (its pool URIs keep it)."""
    fs, path = resolve(source)
    if not any(ch in path for ch in "*?["):
        if not retry(lambda: fs.exists(path)):
            raise MissingInputError(f"Parquet source {source} does not exist")
        return [source]
    found = sorted(p for p in retry(lambda: fs.glob(path)) if p.endswith(".parquet"))
    if not found:
        raise MissingInputError(f"no Parquet files match {source}")
    return [with_protocol(fs, p) for p in found]


@dataclass(frozen=True)
class ParquetFile:
    """One file of the list: where its rows are, which column holds them, and (a URI list) its pool URIs."""

    url: str
    metadata: pq.FileMetaData
    inline: str | None  # the bytes column, or None for a ``uri`` column
    uris: pa.Array | None = None  # a URI list's pool URIs, row by row (repeats made distinct)


def _open(url: str) -> tuple[pq.FileMetaData, str | None]:
    fs, path = resolve(url)
    metadata = footer(fs, path)
    names = metadata.schema.to_arrow_schema().names
    inline = next((c for c in BYTES_COLUMNS if c in names), None)
    if inline is None and "uri" not in names:
        raise ConfigError(f"{url}: a Parquet source needs a 'uri' column or a bytes column {BYTES_COLUMNS}")
    return metadata, inline


def list_files(source: str) -> list[ParquetFile]:
    """Every file of the list with its footer; URI lists with their pool URIs (the ``uri`` columns are
    read whole, in order, since a URI named twice anywhere in the list needs a distinct pool URI)."""
    opened = [(url, *_open(url)) for url in parquet_files(source)]
    uri_files = [(url, metadata) for url, metadata, inline in opened if inline is None]
    pool_uris = iter(_pool_uris(uri_files))
    return [ParquetFile(url, metadata, inline, None if inline else next(pool_uris)) for url, metadata, inline in opened]


def _pool_uris(files: list[tuple[str, pq.FileMetaData]]) -> list[pa.Array]:
    """Per file, each row's pool URI: its ``uri`` value, made distinct where an earlier row of the list
    named it (`repeated_uri`), or for an empty cell a URI naming the row itself (its errors row says why)."""
    columns = []
    for url, _ in files:
        fs, path = resolve(url)
        with fs.open(path, "rb") as f:
            columns.append(pq.read_table(f, columns=["uri"]).column("uri").combine_chunks())
    if not columns:
        return []
    occurrence = _occurrences(pa.concat_arrays([c.cast(pa.string()) for c in columns]))
    out, start = [], 0
    for (url, _), column in zip(files, columns):
        rows = []
        for row, value in enumerate(column.to_pylist()):
            n = int(occurrence[start + row])
            if not isinstance(value, str) or not value:
                rows.append(parquet_row_uri(url, row, "uri"))
            else:
                rows.append(repeated_uri(value, n) if n > 1 else value)
        out.append(pa.array(rows, pa.string()))
        start += len(column)
    return out


def _occurrences(values: pa.Array) -> np.ndarray:
    """For each value, how many times it has appeared so far (1 the first time; nulls count as 1)."""
    codes = pc.fill_null(pc.dictionary_encode(values).indices, -1).to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    ranked = codes[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    occurrence = np.empty(len(codes), np.int64)
    occurrence[order] = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)])) + 1
    occurrence[codes < 0] = 1
    return occurrence


def parquet_items(source: str, rows_per_unit: int) -> list[Item]:
    """The list's slices as items (key ``<file>@<first row>``), each with its unit's payload as data."""
    items = []
    for file in list_files(source):
        _warn_big_row_groups(file.url, file.metadata, rows_per_unit)
        for start, stop in row_slices(file.metadata, rows_per_unit):
            payload: dict[str, Any] = {"parquet": file.url, "start": start, "stop": stop, "inline": file.inline}
            if file.uris is None:
                content = _stored_sizes(file.metadata, start, stop)
            else:
                content = file.uris.slice(start, stop - start).to_pylist()
                payload["pool_uris"] = content
            items.append(Item(f"{file.url}@{start}", fingerprint(stop, content), payload))
    return items


def _stored_sizes(metadata: pq.FileMetaData, start: int, stop: int) -> list[Any]:
    """Rows and compressed/uncompressed bytes of every column chunk of the row groups holding a slice, with
    the slice's place in them."""
    starts = row_group_starts(metadata)
    groups = range(int(np.searchsorted(starts, start, side="right")) - 1, int(np.searchsorted(starts, stop)))
    sizes = [[metadata.row_group(g).num_rows,
              [[metadata.row_group(g).column(c).total_compressed_size,
                metadata.row_group(g).column(c).total_uncompressed_size]
               for c in range(metadata.row_group(g).num_columns)]] for g in groups]
    return [start - int(starts[groups.start]), sizes]


def _warn_big_row_groups(source: str, metadata: pq.FileMetaData, rows_per_unit: int) -> None:
    """Units are whole row groups, or slices of one too big for a unit; a slice decodes its row group
    from the start, so a file of few huge row groups costs more per row: say so, with the numbers."""
    biggest = max((metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)), default=0)
    if biggest > 4 * rows_per_unit:
        log.warning("%s: row groups of up to %d rows, %d units each; every unit decodes its row group up to "
                    "its last row (rewrite it with row_group_size <= %d for reads linear in rows)",
                    source, biggest, -(-biggest // rows_per_unit), rows_per_unit)


@functools.lru_cache(maxsize=4)
def _listed(source: str, stamp: str) -> tuple[dict[str, tuple[int, str | None]], pa.Array]:
    files = list_files(source)
    rows = {f.url: (f.metadata.num_rows, f.inline) for f in files}
    uris = [f.uris for f in files if f.uris is not None]
    return rows, pa.concat_arrays(uris) if uris else pa.array([], pa.string())


def still_listed(source: str, pool_uris: pa.Array) -> np.ndarray:
    """Which of these pool URIs the list gives now: an inline row whose file still has that row in that
    column, or a URI the list still names. The listing is read once per version of the list's files."""
    fs = resolve(source)[0]
    stamp = fingerprint([[url, retry(lambda u=url: fs.info(resolve(u)[1]))] for url in parquet_files(source)])
    rows, uris = _listed(source, stamp)
    listed = pc.is_in(pool_uris, value_set=uris).to_numpy(zero_copy_only=False)
    for i, uri in enumerate(pool_uris.to_pylist()):
        base, params = split_uri(uri)
        if not listed[i] and params and "row" in params and base in rows:
            n, inline = rows[base]
            listed[i] = int(params["row"]) < n and inline is not None and params.get("column") == quote(inline, safe="")
    return listed
