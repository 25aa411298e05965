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
import pyarrow.parquet as pq

from catalog.embeddings import embeddings_table
from catalog.images import parquet_row_uri, read_image_bytes
from catalog.ledger import Ledger
from catalog.manifest import RunManifest, fingerprint
from catalog.paths import resolve, with_protocol
from catalog.schemas import ERRORS, POOL, stamp
from catalog.shards import write_shards
from catalog.sql import query
from curation.copy_descriptor import DIM, NAME, SIDE, copy_descriptor
from catalog.decode import MISSING, DecodeError, decode_rgb, probe_image
from pipelines.units import Unit, run_units

STAGE = "ingest"
COPY_DESCRIPTORS = "copy_descriptors"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
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
    files = sorted(
        with_protocol(fs, p)
        for p in fs.find(path)
        if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(f"no image files (by extension) under {source}")
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
    return [
        Unit(
            f"rows-{i // rows_per_unit:06d}",
            {"parquet": source, "start": i, "stop": min(n, i + rows_per_unit), "inline": inline},
            min(n, i + rows_per_unit) - i,
        )
        for i in range(0, n, rows_per_unit)
    ]


def _items(payload: dict[str, Any]):
    """Yield ``(uri, bytes | None, error reason | None, message)`` for every item of a unit."""
    if "uris" in payload:
        for uri in payload["uris"]:
            yield (uri, *_read(uri))
    elif "tar" in payload:
        fs, path = resolve(payload["tar"])
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and posixpath.splitext(member.name)[1].lower() in IMAGE_EXTENSIONS:
                    data = tar.extractfile(member).read()
                    yield f"tar://{member.name}::{payload['tar']}", data, None, None
    else:
        fs, path = resolve(payload["parquet"])
        inline = payload["inline"]
        columns = [inline] if inline else ["uri"]
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns).slice(payload["start"], payload["stop"] - payload["start"])
        for offset, value in enumerate(table.column(0).to_pylist()):
            if inline:
                yield parquet_row_uri(payload["parquet"], payload["start"] + offset, inline), value, None, None
            else:
                yield (value, *_read(value))


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
                 embeddings_table(np.asarray(desc_ids, np.int64), x, {"descriptor": NAME}, COPY_DESCRIPTORS),
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
