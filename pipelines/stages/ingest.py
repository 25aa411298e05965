"""``curate ingest``: build the ``pool`` table from a folder, tar shards or a Parquet list.

Every listed file gets a ``pool`` row (``status`` ok or error); every file that cannot be used also
gets an ``errors`` row with a reason code. Work is split into units (a slice of the listing, one tar
shard, a slice of Parquet rows); each unit's fingerprint is its files' names, sizes and change stamps, so a
source that changed under the same name is told apart from the one that was ingested. Every source is
listed as items (`catalog.ledger_items`; a Parquet list by row slices, `pipelines.parquet_items`): a rerun on
a source that gained files or rows ingests only those, in units of its own; a file that vanished keeps its
pool row as ``status = 'removed'``; a file rewritten under the same name is the removal of the old version
(its rows dropped) and a new file.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.config import ConfigError, at_least
from catalog.decode import MISSING, DecodeError, decode_rgb, probe_image
from catalog.embeddings import embeddings_table
from catalog.errors import MissingInputError
from catalog.images import (
    UNREADABLE,
    UnreadableItem,
    byte_range_uri,
    file_uri,
    item_failure,
    parquet_row_uri,
    read_item,
    split_uri,
    uri_extension,
)
from catalog.ledger_items import Item, Members, Retiring
from catalog.parquet_rows import read_rows
from catalog.paths import resolve, retry, with_protocol
from catalog.schemas import (
    COPY_DESCRIPTORS_TABLE,
    ERRORS,
    ERRORS_TABLE,
    POOL,
    POOL_TABLE,
    stamp,
)
from catalog.sql import query
from curation.copy_descriptor import DIM, NAME, SIDE, copy_descriptor
from curation.quality import quality_signals
from pipelines.parquet_items import is_parquet_source, parquet_items, still_listed
from pipelines.stage import Output, Stage, StageContext, Totals, Unit

log = logging.getLogger("curate.pipelines")

# WebDataset shards keep per-sample metadata beside each image; such members are not pool items.
Read = tuple[str, bytes | None, str | None, str | None]  # uri, bytes, error reason, message
TAR_METADATA_EXTENSIONS = {".json", ".txt", ".cls", ".cls2", ".caption", ".key", ".url", ".meta", ".id", ".idx"}


@dataclass(frozen=True)
class IngestConfig:
    """``source``: a folder tree, a glob of ``.tar`` shards, or a Parquet file or glob of them (a ``uri`` or
    bytes column); a Parquet list is cut into slices of whole row groups of up to ``files_per_unit`` rows."""

    source: str = ""
    files_per_unit: int = 500
    max_pixels: int = 64_000_000
    rows_per_shard: int = 250_000

    def __post_init__(self) -> None:
        at_least(self, 1, "files_per_unit", "max_pixels", "rows_per_shard")


def image_id(uri: str) -> int:
    """Stable signed 64-bit id from the URI (blake2b), the key of every catalog table."""
    return int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "little", signed=True)


def is_tar_source(source: str) -> bool:
    path = resolve(source)[1]
    return path.endswith(".tar") or (any(ch in path for ch in "*?[") and not path.endswith(".parquet"))


def source_items(source: str) -> list[Item]:
    """A folder's files (every extension: the decoder decides) or a glob's tar shards, sorted, each with its
    size and modification stamp: a file rewritten under the same name is a new item."""
    fs, path = resolve(source)
    if is_tar_source(source):
        found = {p: info for p, info in retry(lambda: fs.glob(path, detail=True)).items() if p.endswith(".tar")}
        if not found:
            raise MissingInputError(f"no tar shards match {source}")
        return [Item(with_protocol(fs, p), _version(info)) for p, info in sorted(found.items())]
    if not fs.isdir(path):
        raise MissingInputError(f"ingest source {source} is not a folder, a .tar glob or a .parquet file")
    found = retry(lambda: fs.find(path, detail=True))
    if not found:
        raise MissingInputError(f"no files under {source}")
    return sorted((Item(file_uri(with_protocol(fs, p)), _version(info)) for p, info in found.items()),
                  key=lambda item: item.key)


def _version(info: dict[str, Any]) -> str:
    """A listed file's size and the store's change stamp (mtime locally, the ETag on object stores)."""
    stamp = next((info[k] for k in ("mtime", "ETag", "LastModified", "updated", "md5Hash") if k in info), "")
    return f"{info['size']}:{stamp}"


def _items(payload: dict[str, Any]) -> Iterator[Read]:
    """Every item of a unit as ``(uri, bytes | None, error reason | None, message)``: an item that cannot
    be read is yielded with its reason, never raised, so one bad item never stops the unit."""
    if "uris" in payload:
        return ((uri, *_read(uri)) for uri in payload["uris"])
    if "tar" in payload:
        return _tar_items(payload["tar"])
    return _parquet_items(payload)


def _tar_items(shard: str) -> Iterator[Read]:
    """The members of one tar shard; a shard that is no tar, or breaks off, ends in one error item for it."""
    members = 0
    try:
        fs, path = resolve(shard)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            compressed = getattr(tar.fileobj, "comptype", "tar") != "tar"
            for member in tar:
                if not member.isfile() or posixpath.splitext(member.name)[1].lower() in TAR_METADATA_EXTENSIONS:
                    continue
                # A byte range of the shard: the member's name is recorded, never parsed.
                uri = byte_range_uri(shard, member.offset_data, member.size, member=member.name)
                members += 1
                if compressed:
                    yield uri, None, UNREADABLE, "compressed tar shard: byte ranges need an uncompressed .tar"
                else:
                    yield uri, tar.extractfile(member).read(), None, None
    except Exception as e:
        failure = item_failure(e)
        if failure is None:
            raise
        yield file_uri(shard), None, failure[0], f"{failure[1]} (after {members} members of the shard)"


def _parquet_items(payload: dict[str, Any]) -> Iterator[Read]:
    """The rows of a Parquet list: a URI to read per row (its pool URI planned, `pipelines.parquet_items`),
    or the image bytes inline; only the row groups that hold the unit's rows are read
    (`catalog.parquet_rows`)."""
    source, inline = payload["parquet"], payload["inline"]
    fs, path = resolve(source)
    batches = read_rows(fs, path, [inline or "uri"], payload["start"], payload["stop"])
    values = (value for batch in batches for value in batch.column(0).to_pylist())
    for row, value in enumerate(values, start=payload["start"]):
        if inline:
            yield (parquet_row_uri(source, row, inline), *_inline_bytes(value))
        else:  # a row without a URI is named by its own place, so it still has a pool row and an errors row
            yield (payload["pool_uris"][row - payload["start"]], *_read(value))


def _inline_bytes(value: object) -> tuple[bytes | None, str | None, str | None]:
    """An inline cell's bytes; Hugging Face image columns hold ``{bytes, path}`` structs."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return None, MISSING, "the bytes cell is null: the list holds no image for this row"
    if not isinstance(value, bytes):
        return None, UNREADABLE, f"the bytes cell holds a {type(value).__name__}, not bytes"
    return value, None, None


def _read(uri: object) -> tuple[bytes | None, str | None, str | None]:
    try:
        return read_item(uri), None, None
    except UnreadableItem as e:
        return None, e.reason, str(e)


class IngestStage(Stage):
    name = "ingest"
    config_class = IngestConfig
    writes = (POOL_TABLE, COPY_DESCRIPTORS_TABLE, ERRORS_TABLE)
    distributable = True
    in_process_below = 600
    empty_schemas = {ERRORS_TABLE: stamp(ERRORS, ERRORS_TABLE)}

    def items(self, ctx: StageContext) -> list[Item]:
        """A folder's files, a glob's tar shards or a Parquet list's row slices: runs on them append."""
        source = ctx.config.source
        if not source:
            raise ConfigError("ingest needs a source: a folder, a .tar glob or a .parquet file (or glob)")
        return parquet_items(source, ctx.config.files_per_unit) if is_parquet_source(source) else source_items(source)

    def unit_prefix(self, ctx: StageContext) -> str:
        if is_parquet_source(ctx.config.source):
            return "rows"
        return "tar" if is_tar_source(ctx.config.source) else "files"

    def items_per_unit(self, ctx: StageContext) -> int:
        one = is_tar_source(ctx.config.source) or is_parquet_source(ctx.config.source)
        return 1 if one else ctx.config.files_per_unit

    def unit_payload(self, ctx: StageContext, items: list[Item], generation: int) -> dict[str, Any]:
        if isinstance(items[0].data, dict):  # a Parquet slice carries its payload (`parquet_items`)
            return items[0].data
        if is_tar_source(ctx.config.source):
            return {"tar": items[0].key}
        return {"uris": [item.key for item in items]}

    def unit_size(self, payload: dict[str, Any], items: list[Item]) -> int:
        """Files, tar shards, or a Parquet slice's rows."""
        return payload["stop"] - payload["start"] if "parquet" in payload else len(items)

    def retire(self, ctx: StageContext, tables: dict[str, pa.Table], retiring: Retiring,
               members: Members) -> dict[str, pa.Table]:
        """Vanished files keep their pool row as ``status = 'removed'``; a changed file's rows are dropped (its
        new version is a row of a new unit, under the same image_id). Other tables lose both kinds' rows.
        A Parquet slice retires whole: rows the list still gives are dropped (ingested again where they are
        now), the others removed."""
        pool = tables.get(POOL_TABLE)
        if pool is None:
            return tables
        uris = pool.column("uri")
        if is_parquet_source(ctx.config.source):
            listed = pa.array(still_listed(ctx.config.source, uris.combine_chunks()), pa.bool_())
            vanished, changed = pc.invert(listed), listed
        else:
            sources = [split_uri(u)[0] if u not in retiring.keys else u for u in uris.to_pylist()]
            vanished = pa.array([s in retiring.vanished for s in sources], pa.bool_())
            changed = pa.array([s in retiring.changed for s in sources], pa.bool_())
        status = pc.if_else(vanished, pa.scalar("removed"), pool.column("status"))
        pool = pool.set_column(pool.schema.get_field_index("status"), pool.schema.field("status"), status)
        out = {POOL_TABLE: pool.filter(pc.invert(changed))}
        gone = pool.column("image_id").filter(pc.or_(vanished, changed))
        for table, rows in tables.items():
            if table != POOL_TABLE:
                out[table] = rows.filter(pc.invert(pc.is_in(rows.column("image_id"), gone)))
        return out

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        """Probe every image of one unit: its ``pool`` rows (with the quality signals, measured on the decode
        the copy descriptor is made from), ``copy_descriptors`` and ``errors`` rows."""
        config: IngestConfig = ctx.config
        pool_rows: list[dict[str, Any]] = []
        error_rows: list[dict[str, Any]] = []
        desc_ids: list[int] = []
        descriptors: list[np.ndarray] = []
        for uri, data, reason, message in _items(unit.payload):
            iid = image_id(uri)
            row = {"image_id": iid, "uri": uri, "bytes": None if data is None else len(data),
                   "width": None, "height": None, "format": None, "sha256": None, "status": "error"}
            if data is not None:
                row["sha256"] = hashlib.sha256(data).hexdigest()
                try:
                    info = probe_image(data, max_pixels=config.max_pixels)
                    img = decode_rgb(data, max_pixels=config.max_pixels, min_side=2 * SIDE)
                    descriptor = copy_descriptor(img)
                    row.update(width=info.width, height=info.height, format=info.format, status="ok",
                               **quality_signals(img, info.width, info.height)._asdict())
                    descriptors.append(descriptor)
                    desc_ids.append(iid)
                except DecodeError as e:
                    reason, message = e.reason, str(e)
            if row["status"] == "error":
                error_rows.append({"image_id": iid, "uri": uri, "stage": self.name, "reason": reason,
                                   "message": message})
            pool_rows.append(row)
        x = np.stack(descriptors) if descriptors else np.zeros((0, DIM), np.float16)
        return Output({
            POOL_TABLE: pa.Table.from_pylist(pool_rows, schema=stamp(POOL, POOL_TABLE)),
            COPY_DESCRIPTORS_TABLE: embeddings_table(np.asarray(desc_ids, np.int64), x,
                                                     {"descriptor": NAME}, COPY_DESCRIPTORS_TABLE),
            ERRORS_TABLE: pa.Table.from_pylist(error_rows, schema=stamp(ERRORS, ERRORS_TABLE)),
        })

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        errored = totals.rows(ERRORS_TABLE)
        removed = query(ctx.root, "SELECT count(*) FROM pool WHERE status = 'removed'").column(0)[0].as_py()
        n = totals.rows(POOL_TABLE) - removed
        return {"in": n, "out": n - errored, "errored": errored, "removed": removed,
                "id_collisions": find_id_collisions(ctx.root),
                "skipped_by_extension": skipped_by_extension(ctx.root)}


def skipped_by_extension(root: str) -> dict[str, int]:
    """Unusable files of the pool per file extension, most first: what a user checks first (SVGs, text)."""
    uris = query(root, "SELECT uri FROM pool WHERE status = 'error'").column("uri").to_pylist()
    return dict(Counter(uri_extension(u) or "(no extension)" for u in uris).most_common())


def find_id_collisions(root: str) -> int:
    """Distinct URIs that hash to the same image_id (astronomically rare, but checked)."""
    table = query(root, "SELECT count(*) AS n FROM (SELECT image_id FROM pool GROUP BY image_id "
                        "HAVING count(DISTINCT uri) > 1)")
    return int(table.column("n")[0].as_py())


STAGE = IngestStage()
