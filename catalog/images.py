"""Where a pool image's bytes live, as one URI string.

Three forms cover the sources ``curate ingest`` accepts:
- a plain file or object URL (``/data/a.jpg``, ``s3://bucket/a.jpg``);
- a member of a tar shard, in fsspec's chained form ``tar://member.jpg::s3://bucket/shard-0001.tar``;
- a row of a Parquet file that holds the bytes inline: ``<parquet url>#row=<i>&column=<name>``;
- a byte range of a packed tar shard (``curate pack``): ``<tar url>#offset=<o>&size=<n>``, one ranged
  read per image.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import fsspec
import pyarrow.parquet as pq

from catalog.paths import read_bytes, resolve, retry

PARQUET_ROW = "#row="
BYTE_RANGE = "#offset="


def parquet_row_uri(url: str, row: int, column: str) -> str:
    return f"{url}{PARQUET_ROW}{row}&column={column}"


def byte_range_uri(url: str, offset: int, size: int) -> str:
    return f"{url}{BYTE_RANGE}{offset}&size={size}"


def read_image_bytes(uri: str) -> bytes:
    """The raw bytes behind a pool URI, whatever form it has. Raises FileNotFoundError if gone."""
    if BYTE_RANGE in uri:
        url, _, query = uri.partition("#")
        params = parse_qs(query)
        start = int(params["offset"][0])
        fs, path = resolve(url)
        return retry(lambda: fs.cat_file(path, start=start, end=start + int(params["size"][0])))
    if PARQUET_ROW in uri:
        url, _, query = uri.partition("#")
        params = parse_qs(query)
        row, column = int(params["row"][0]), params["column"][0]
        fs, path = resolve(url)

        def read_row() -> bytes:
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).read(columns=[column]).column(column)[row].as_py()

        return retry(read_row)
    if "::" in uri:
        def read_chained() -> bytes:
            with fsspec.open(uri, "rb") as f:
                return f.read()

        return retry(read_chained)
    return read_bytes(uri)
