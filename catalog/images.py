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
A URI without a scheme or leading ``/`` (``packed/lvd/shards/shard-000000.tar#offset=…``) points
inside the catalog and is stored relative to its root, so a catalog copied to another folder or
bucket still reads; ``catalog.shards.read_table`` and the SQL views resolve it against the root the
catalog is read from (``resolve_uris``). URIs of the older chained form ``tar://member::<tar url>``
are still read (the tar is the part after the last ``::``, the one that was hashed at ingest).

Stages read items through ``read_item``: every way one item can fail (a null or non-string URI, a
malformed fragment, a gone file, a store without credentials or without its fsspec package, a base
that is not the Parquet file or tar its URI says) becomes an `UnreadableItem` with a reason code, so
the stage writes an ``errors`` row and goes on. A store that stays unreachable after every retry is
not the item's fault: that error stops the unit, and a rerun resumes it.
"""

from __future__ import annotations

import os
import posixpath
import re
import sys
import tarfile
from urllib.parse import quote, unquote

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from catalog.decode import MISSING
from catalog.parquet_rows import footer, read_rows
from catalog.paths import StoreUnavailableError, is_local, is_transient, resolve, resolve_object, retry

_KEYS = ("offset", "size", "member", "row", "column", "dup")
_LEGACY_TAR = "tar://"
# What starts an absolute URI (a scheme such as s3: or file:, or a local absolute path); RE2 syntax,
# shared by pyarrow and DuckDB so the SQL views resolve exactly as read_table does.
ABSOLUTE_URI = r"^([A-Za-z][A-Za-z0-9+.\-]*:|/)"
_ABSOLUTE = re.compile(ABSOLUTE_URI)

# Why an item could not be read (``errors.reason``; the decoder's reasons say why bytes are no image).
# MISSING (from the decoder's list): listed, but gone when read (or a dangling link, or a null bytes cell)
BAD_URI = "bad_uri"  # the URI names nothing: null, not a string, an unknown protocol, a bad fragment
ACCESS_DENIED = "access_denied"  # the store refused: no credentials, or not allowed
UNREADABLE = "unreadable"  # the store or file cannot deliver it: no fsspec package for it, I/O error, not a tar
READ_REASONS = (MISSING, BAD_URI, ACCESS_DENIED, UNREADABLE)


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


def catalog_relative(uri: str) -> bool:
    """Whether ``uri`` is relative to the catalog root (no ``scheme:`` and no leading ``/``)."""
    return not _ABSOLUTE.match(uri)


def catalog_root_prefix(root: str) -> str:
    """What a catalog-relative URI is appended to: the root, made absolute if local, and a ``/``."""
    return (os.path.abspath(resolve(root)[1]) if is_local(root) else root.rstrip("/")) + "/"


def resolve_uris(root: str, uris: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """``uris`` with every catalog-relative one joined onto ``root`` (the others as they are)."""
    relative = pc.invert(pc.match_substring_regex(uris, ABSOLUTE_URI))
    prefix = catalog_root_prefix(root)
    return pc.if_else(relative, pc.binary_join_element_wise(prefix, uris, ""), uris)


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
        value = next(read_rows(fs, path, [column], row, row + 1)).column(0)[0].as_py()
        if value is None:
            raise FileNotFoundError(f"{uri}: the cell is null: the list holds no bytes for this row")
        return value

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


class UnreadableItem(Exception):
    """One item that cannot be read; ``.reason`` is one of ``READ_REASONS``. The message says why, never
    quoting the item's content."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_item(uri: object) -> bytes:
    """``read_image_bytes`` for one item of a stage: a failure that belongs to this item raises
    `UnreadableItem`; a store that stays unavailable raises `StoreUnavailableError` (the unit stops)."""
    if not isinstance(uri, str) or not uri:
        kind = "null" if uri is None else "empty" if uri == "" else f"a {type(uri).__name__}, not a string"
        raise UnreadableItem(BAD_URI, f"the uri is {kind}")
    try:
        return read_image_bytes(uri)
    except Exception as e:
        failure = item_failure(e)
        if failure is None:
            raise
        raise UnreadableItem(*failure) from e


def item_failure(e: Exception) -> tuple[str, str] | None:
    """(reason, message) for an error that one item's read can cause; None for anything else (a bug)."""
    if isinstance(e, StoreUnavailableError) or isinstance(e, UnreadableItem):
        return None
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None and isinstance(e, (botocore.NoCredentialsError, botocore.PartialCredentialsError)):
        return ACCESS_DENIED, f"the store needs credentials and none were found ({type(e).__name__})"
    if is_transient(e):
        return None
    if isinstance(e, FileNotFoundError):
        return MISSING, str(e) if "null" in str(e) else "gone when read (or a dangling link)"
    if isinstance(e, PermissionError):
        return ACCESS_DENIED, f"access denied ({e})"
    if isinstance(e, URIError):
        return BAD_URI, str(e)
    if isinstance(e, ImportError):
        return UNREADABLE, f"no filesystem installed for this protocol ({e})"
    if isinstance(e, ValueError) and "protocol not known" in str(e).lower():
        return BAD_URI, f"unknown protocol ({e})"
    if isinstance(e, tarfile.TarError):
        return UNREADABLE, f"not a readable tar archive ({type(e).__name__}: {e})"
    if isinstance(e, OSError):
        return UNREADABLE, f"could not read ({type(e).__name__}: {e})"
    return None


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
