"""Rows of a Parquet source file read by row group: a slice of rows costs its own row groups, not the file.

A pool that holds its images inline (a ``bytes`` column) is read a slice at a time by ingest and a
cell at a time by every later reader. Reading the whole column for each would make the cost grow with
the square of the rows per file; here a slice reads the footer (parsed once per process and file
version) and only the row groups that overlap it, through a buffered stream, so inside a row group it
stops at the slice's last row. Inside one row group the reader still decodes from the group's start:
files of small row groups (Hugging Face writes 100-row groups for image datasets) read best.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.paths import retry

_BUFFER = 1 << 20  # bytes per read of a column chunk: a slice stops within a MiB of its last row


@functools.lru_cache(maxsize=64)
def _footer(fs: fsspec.AbstractFileSystem, path: str, version: tuple) -> pq.FileMetaData:
    """The parsed footer of one file version (``version``: its size and modification stamp)."""
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


def footer(fs: fsspec.AbstractFileSystem, path: str) -> pq.FileMetaData:
    """The file's Parquet metadata, parsed once per process while the file's size and stamp hold."""
    info = retry(lambda: fs.info(path))
    stamp = next((info[k] for k in ("mtime", "ETag", "LastModified", "updated", "md5Hash") if k in info), None)
    return _footer(fs, path, (info.get("size"), str(stamp)))


def row_group_starts(metadata: pq.FileMetaData) -> np.ndarray:
    """First row of every row group, then the row count: ``starts[g] <= row < starts[g + 1]``."""
    sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


def row_slices(metadata: pq.FileMetaData, rows_per_slice: int) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` covering the file: whole row groups packed up to ``rows_per_slice`` rows,
    and a bigger row group cut every ``rows_per_slice`` rows (a one-group file: 0, n, 2n, …)."""
    starts = row_group_starts(metadata)
    slices: list[tuple[int, int]] = []
    begin = 0
    for g in range(metadata.num_row_groups):
        lo, hi = int(starts[g]), int(starts[g + 1])
        if hi - lo > rows_per_slice:
            if lo > begin:
                slices.append((begin, lo))
            slices += [(s, min(hi, s + rows_per_slice)) for s in range(lo, hi, rows_per_slice)]
            begin = hi
        elif hi - begin > rows_per_slice:
            slices.append((begin, lo))
            begin = lo
    if starts[-1] > begin:
        slices.append((begin, int(starts[-1])))
    return slices


def read_rows(fs: fsspec.AbstractFileSystem, path: str, columns: list[str], start: int, stop: int,
              batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
    """Rows ``[start, stop)`` of ``columns``, as batches, reading only the row groups that hold them."""
    metadata = footer(fs, path)
    starts = row_group_starts(metadata)
    first = int(np.searchsorted(starts, start, side="right")) - 1
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f, metadata=metadata, buffer_size=_BUFFER)
        for g in range(max(first, 0), metadata.num_row_groups):
            pos = int(starts[g])
            if pos >= stop:
                return
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns):
                lo, hi = max(start, pos), min(stop, pos + batch.num_rows)
                if hi > lo:
                    yield batch.slice(lo - pos, hi - lo)
                pos += batch.num_rows
                if pos >= stop:
                    return
