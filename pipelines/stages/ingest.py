"""``curate ingest``: build the ``pool`` table from a folder, tar shards or a Parquet list.

Every listed file gets a ``pool`` row (``status`` ok or error); every file that cannot be used also
gets an ``errors`` row with a reason code. Work is split into units (a slice of the listing, one tar
shard, a slice of Parquet rows) run as Ray Data tasks; the ledger makes a killed run resume.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog.embeddings import embeddings_table
from catalog.images import byte_range_uri, file_uri, parquet_row_uri, read_image_bytes, repeated_uri
from catalog.ledger import Ledger
from catalog.manifest import RunManifest, fingerprint
from catalog.paths import resolve, with_protocol
from catalog.schemas import ERRORS, POOL, stamp
from catalog.shards import write_shards
from catalog.sql import query
from curation.copy_descriptor import DIM, SIDE, copy_descriptor
from catalog.decode import MISSING, DecodeError, decode_rgb, probe_image
from pipelines.units import Unit, run_units

STAGE = "ingest"
COPY_DESCRIPTORS = "copy_descriptors"
# WebDataset shards keep per-sample metadata beside each image; such members are not pool items.
TAR_METADATA_EXTENSIONS = {".json", ".txt", ".cls", ".cls2", ".caption", ".key", ".url", ".meta", ".id", ".idx"}
BYTES_COLUMNS = ("bytes", "image", "jpg", "png")


@dataclass(frozen=True)
class IngestConfig:
    files_per_unit: int = 500
    max_pixels: int = 64_000_000
    rows_per_shard: int = 250_000


def image_id(uri: str) -> int:
    """Stable signed 64-bit id from the URI (blake2b), the key of every catalog table."""
    return int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "little", signed=True)


def plan_units(source: str, files_per_unit: int) -> list[Unit]:
    """Split a source into deterministic units, by kind of source."""
    fs, path = resolve(source)
    if path.endswith(".parquet") and not fs.isdir(path):
        return _parquet_units(source, files_per_unit)
    if path.endswith(".tar") or any(ch in path for ch in "*?["):
        shards = sorted(with_protocol(fs, p) for p in fs.glob(path) if p.endswith(".tar"))
        if not shards:
            raise FileNotFoundError(f"no tar shards match {source}")
        return [Unit(f"tar-{hashlib.sha1(s.encode()).hexdigest()[:16]}", {"tar": s}, 1) for s in shards]
    if not fs.isdir(path):
        raise FileNotFoundError(f"ingest source {source} is not a folder, a .tar glob or a .parquet file")
    # Every file, whatever its extension: the decoder decides (a non-image becomes an errors row).
    files = sorted(file_uri(with_protocol(fs, p)) for p in fs.find(path))
    if not files:
        raise FileNotFoundError(f"no files under {source}")
    return [
        Unit(f"files-{i // files_per_unit:06d}", {"uris": files[i : i + files_per_unit]}, len(files[i : i + files_per_unit]))
        for i in range(0, len(files), files_per_unit)
    ]


def _parquet_units(source: str, rows_per_unit: int) -> list[Unit]:
    fs, path = resolve(source)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        n = pf.metadata.num_rows
    inline = next((c for c in BYTES_COLUMNS if c in names), None)
    if inline is None and "uri" not in names:
        raise ValueError(f"{source}: a Parquet source needs a 'uri' column or a bytes column {BYTES_COLUMNS}")
    repeats = {} if inline else _repeated_rows(source)
    units = []
    for i in range(0, n, rows_per_unit):
        stop = min(n, i + rows_per_unit)
        payload = {"parquet": source, "start": i, "stop": stop, "inline": inline}
        payload["repeats"] = [[r, k] for r, k in repeats.items() if i <= r < stop]
        units.append(Unit(f"rows-{i // rows_per_unit:06d}", payload, stop - i))
    return units


def _repeated_rows(source: str) -> dict[int, int]:
    """Row -> occurrence (2, 3, …) of every row whose URI an earlier row of the list already names.

    Worked out over the whole list at planning, so each unit gives those rows distinct URIs
    (``repeated_uri``) and every pool row keeps a unique ``image_id``.
    """
    fs, path = resolve(source)
    with fs.open(path, "rb") as f:
        uris = pq.read_table(f, columns=["uri"]).column("uri")
    codes = pc.fill_null(pc.dictionary_encode(uris).combine_chunks().indices, -1).to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    ranked = codes[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    occurrence = np.empty(len(codes), np.int64)
    occurrence[order] = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)])) + 1
    repeated = np.flatnonzero((occurrence > 1) & (codes >= 0))
    return {int(r): int(occurrence[r]) for r in repeated}


def _items(payload: dict[str, Any]):
    """Yield ``(uri, bytes | None, error reason | None, message)`` for every item of a unit."""
    if "uris" in payload:
        for uri in payload["uris"]:
            yield (uri, *_read(uri))
    elif "tar" in payload:
        fs, path = resolve(payload["tar"])
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            compressed = getattr(tar.fileobj, "comptype", "tar") != "tar"
            for member in tar:
                if not member.isfile() or posixpath.splitext(member.name)[1].lower() in TAR_METADATA_EXTENSIONS:
                    continue
                # A byte range of the shard: the member's name is recorded, never parsed.
                uri = byte_range_uri(payload["tar"], member.offset_data, member.size, member=member.name)
                if compressed:
                    yield uri, None, "unreadable", "compressed tar shard: byte ranges need an uncompressed .tar"
                else:
                    yield uri, tar.extractfile(member).read(), None, None
    else:
        fs, path = resolve(payload["parquet"])
        inline = payload["inline"]
        columns = [inline] if inline else ["uri"]
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns).slice(payload["start"], payload["stop"] - payload["start"])
        repeats = dict(payload.get("repeats", []))
        for offset, value in enumerate(table.column(0).to_pylist()):
            row = payload["start"] + offset
            if inline:
                yield parquet_row_uri(payload["parquet"], row, inline), value, None, None
            else:
                yield (repeated_uri(value, repeats[row]) if row in repeats else value, *_read(value))


def _read(uri: str) -> tuple[bytes | None, str | None, str | None]:
    try:
        return read_image_bytes(uri), None, None
    except FileNotFoundError:
        return None, MISSING, "file was listed but is gone (or a dangling link) when read"
    except OSError as e:
        return None, "unreadable", f"could not read: {e}"


def process_unit(root: str, config: IngestConfig, name: str, payload: dict[str, Any]) -> dict[str, int]:
    """Probe every image of one unit and commit its ``pool`` and ``errors`` shards."""
    pool_rows: list[dict[str, Any]] = []
    error_rows: list[dict[str, Any]] = []
    desc_ids: list[int] = []
    descriptors: list[np.ndarray] = []
    for uri, data, reason, message in _items(payload):
        iid = image_id(uri)
        row = {"image_id": iid, "uri": uri, "bytes": None if data is None else len(data),
               "width": None, "height": None, "format": None, "sha256": None, "status": "error"}
        if data is not None:
            row["sha256"] = hashlib.sha256(data).hexdigest()
            try:
                info = probe_image(data, max_pixels=config.max_pixels)
                descriptor = copy_descriptor(decode_rgb(data, max_pixels=config.max_pixels, min_side=2 * SIDE))
                row.update(width=info.width, height=info.height, format=info.format, status="ok")
                descriptors.append(descriptor)
                desc_ids.append(iid)
            except DecodeError as e:
                reason, message = e.reason, str(e)
        if row["status"] == "error":
            error_rows.append({"image_id": iid, "uri": uri, "stage": STAGE, "reason": reason, "message": message})
        pool_rows.append(row)
    pool_schema = stamp(POOL, "pool")
    write_shards(root, "pool", name, pa.Table.from_pylist(pool_rows, schema=pool_schema), max_rows=config.rows_per_shard)
    x = np.stack(descriptors) if descriptors else np.zeros((0, DIM), np.float16)
    write_shards(root, COPY_DESCRIPTORS, name,
                 embeddings_table(np.asarray(desc_ids, np.int64), x, {"descriptor": f"pixels{SIDE}"}, COPY_DESCRIPTORS),
                 max_rows=config.rows_per_shard)
    if error_rows:
        errors = pa.Table.from_pylist(error_rows, schema=stamp(ERRORS, "errors"))
        write_shards(root, "errors", f"{STAGE}-{name}", errors, max_rows=config.rows_per_shard)
    counts = {"items": len(pool_rows), "ok": len(pool_rows) - len(error_rows), "errors": len(error_rows)}
    Ledger(root, STAGE).mark(name, counts)
    return counts


def find_id_collisions(root: str) -> int:
    """Distinct URIs that hash to the same image_id (astronomically rare, but checked)."""
    table = query(root, "SELECT count(*) AS n FROM (SELECT image_id FROM pool GROUP BY image_id HAVING count(DISTINCT uri) > 1)")
    return int(table.column("n")[0].as_py())


def ingest(source: str, root: str, config: IngestConfig | None = None, *, address: str | None = None,
           overwrite: bool = False) -> dict[str, Any]:
    """Ingest ``source`` into the catalog at ``root``; resumes a killed run; returns a summary."""
    config = config or IngestConfig()
    ledger = Ledger(root, STAGE)
    if overwrite:
        ledger.reset()
    units = plan_units(source, config.files_per_unit)
    ledger.check_plan(fingerprint(source, [u.name for u in units], [u.size for u in units], config.__dict__))
    with RunManifest(root, STAGE, {"source": source, **config.__dict__}) as manifest:
        manifest.inputs = {"source": source, "units": len(units), "plan": fingerprint([u.payload for u in units])}
        counts = run_units(units, partial(process_unit, root, config), ledger=ledger, desc="ingest", address=address)
        totals = query(root, "SELECT count(*) AS n, count(*) FILTER (WHERE status = 'ok') AS ok FROM pool")
        n, ok = (int(totals.column(c)[0].as_py()) for c in ("n", "ok"))
        collisions = find_id_collisions(root)
        manifest.rows = {"in": n, "out": ok, "errored": n - ok, "this_run": counts.get("items", 0),
                         "id_collisions": collisions}
    ledger.mark_complete(manifest.rows)
    return manifest.rows
