"""Where a pool image's bytes live, as one URI string: ``<base>[#<params>]``.

The base is a plain file or object URL (``/data/a.jpg``, ``s3://bucket/a.jpg``), read as one object:
never parsed as an fsspec chain, so a ``::`` in a file name is just part of the name. The optional
fragment after the *last* ``#`` holds ``&``-joined ``key=value`` pairs of known keys only:

- ``offset=<o>&size=<n>``: a byte range of the base, one ranged read. A member of a tar shard
  (``curate ingest`` of tars, ``curate pack``) is addressed this way, with ``member=<name>``
  (percent-encoded) kept for people; its name is never parsed, so ``s.jpg::/other.tar::z.jpg`` or
  ``a#row=1.jpg`` are names like any other, and two members of the same name are two ranges.
- ``row=<i>&column=<name>``: a cell of a Parquet file that holds the bytes inline.
- ``dup=<k>``: the k-th listing of a URI a Parquet source names more than once; it only makes the
  row's URI (and so its ``image_id``) unique, the bytes are the base's.

A fragment that is empty or of known keys is ours; anything else after a ``#`` belongs to the base
(a web URL's anchor). So a listed file whose name holds ``#`` gets an empty fragment (``a#b.jpg#``).
URIs of the older chained form ``tar://member::<tar url>`` are still read (the tar is the part after
the last ``::``, the one that was hashed at ingest).
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import quote, unquote

import fsspec
import pyarrow as pa

from catalog.parquet_rows import footer, read_rows
from catalog.paths import resolve_object, retry

_KEYS = ("offset", "size", "member", "row", "column", "dup")
_LEGACY_TAR = "tar://"


class URIError(OSError):
    """A URI whose fragment cannot name any bytes (an ``OSError``, so readers treat it as unreadable)."""


def _fragment(params: dict[str, object]) -> str:
    return "#" + "&".join(f"{k}={v}" for k, v in params.items())


def file_uri(url: str) -> str:
    """The URI of a listed file: the URL itself, closed with an empty fragment if its name holds ``#``."""
    return url + "#" if "#" in url else url


def byte_range_uri(url: str, offset: int, size: int, member: str | None = None) -> str:
    params: dict[str, object] = {"offset": offset, "size": size}
    if member is not None:
        params["member"] = quote(member, safe="")
    return url + _fragment(params)


def parquet_row_uri(url: str, row: int, column: str) -> str:
    return url + _fragment({"row": row, "column": quote(column, safe="")})


def repeated_uri(uri: str, occurrence: int) -> str:
    """``uri`` made distinct for its ``occurrence``-th (2, 3, …) listing, still reading the same bytes."""
    base, params = split_uri(uri)
    if params is None:
        return uri + _fragment({"dup": occurrence})
    return base + _fragment({**params, "dup": occurrence})


def split_uri(uri: str) -> tuple[str, dict[str, str] | None]:
    """``(base, params)``; ``params`` None when the URI has no fragment of ours."""
    base, sep, fragment = uri.rpartition("#")
    if not sep:
        return uri, None
    params: dict[str, str] = {}
    for pair in fragment.split("&") if fragment else []:
        key, eq, value = pair.partition("=")
        if not eq or key not in _KEYS or key in params:
            return uri, None
        params[key] = value
    return base, params


def _count(params: dict[str, str], key: str, uri: str) -> int:
    value = params.get(key, "")
    if not re.fullmatch(r"\d{1,19}", value):
        raise URIError(f"{uri}: {key}={value!r} is not a non-negative integer")
    return int(value)


def _read_range(base: str, params: dict[str, str], uri: str) -> bytes:
    start, size = _count(params, "offset", uri), _count(params, "size", uri)
    fs, path = resolve_object(base)
    data = retry(lambda: fs.cat_file(path, start=start, end=start + size))
    if len(data) != size:
        raise URIError(f"{uri}: {size} bytes asked at offset {start}, the object holds only {len(data)} there")
    return data


def _read_parquet_cell(base: str, params: dict[str, str], uri: str) -> bytes:
    """One cell, reading only its row group up to its row (`catalog.parquet_rows`), not the whole column."""
    row, column = _count(params, "row", uri), unquote(params.get("column", ""))
    fs, path = resolve_object(base)

    def read_row() -> bytes:
        try:
            metadata = footer(fs, path)
        except pa.ArrowInvalid as e:
            raise URIError(f"{uri}: the base is not a Parquet file ({e})") from e
        if column not in metadata.schema.to_arrow_schema().names or row >= metadata.num_rows:
            raise URIError(f"{uri}: no column {column!r} or row {row} in that Parquet file")
        batch = next(read_rows(fs, path, [column], row, row + 1))
        return batch.column(0)[0].as_py()

    return retry(read_row)


def _read_legacy_tar_member(base: str) -> bytes:
    """``tar://member::<tar url>``: the tar is what follows the last ``::`` (it has none itself, so
    opening it parses no chain); fsspec keeps one member index per tar URL."""
    member, _, container = base[len(_LEGACY_TAR):].rpartition("::")
    return retry(lambda: fsspec.filesystem("tar", fo=container).cat_file(member))


def read_image_bytes(uri: str) -> bytes:
    """The raw bytes behind a pool URI, whatever form it has. Raises FileNotFoundError if gone,
    ``URIError`` if the URI's fragment is malformed."""
    base, params = split_uri(uri)
    params = params or {}
    if "offset" in params or "size" in params:
        return _read_range(base, params, uri)
    if "row" in params or "column" in params:
        return _read_parquet_cell(base, params, uri)
    if base.startswith(_LEGACY_TAR) and "::" in base:
        return _read_legacy_tar_member(base)
    fs, path = resolve_object(base)
    return retry(lambda: fs.cat_file(path))


def uri_extension(uri: str) -> str:
    """The lower-case file extension of the image a URI names (a tar member's own, not ``.tar``)."""
    base, params = split_uri(uri)
    if params and "member" in params:
        name = unquote(params["member"])
    elif base.startswith(_LEGACY_TAR) and "::" in base:
        name = base[len(_LEGACY_TAR):].rpartition("::")[0]
    else:
        name = base
    return posixpath.splitext(name)[1].lower()
