"""What a catalog holds: its tables, their row counts and sizes."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow.parquet as pq

from catalog.manifest import fingerprint
from catalog.paths import join, resolve, retry
from catalog.schemas import metadata_of


@dataclass(frozen=True)
class TableInfo:
    name: str
    shards: int
    rows: int
    bytes: int
    metadata: dict[str, str]


def list_tables(root: str) -> list[str]:
    """Table names (``pool``, ``curated/lvd``…): folders holding Parquet shards, ``_*`` excluded."""
    fs, path = resolve(root, fresh=True)
    if not retry(lambda: fs.exists(path)):
        return []
    names = []
    for p in retry(lambda: fs.find(path)):
        if not p.endswith(".parquet"):
            continue
        rel = posixpath.relpath(posixpath.dirname(p), path.rstrip("/"))
        if rel == "." or any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        names.append(rel)
    return sorted(set(names))


def describe(root: str, table: str) -> TableInfo:
    """Row count from Parquet footers (no data read), bytes from the object sizes."""
    fs, path = resolve(join(root, table), fresh=True)
    files = [d for d in retry(lambda: fs.ls(path, detail=True)) if d["name"].endswith(".parquet")]
    files.sort(key=lambda d: d["name"])
    rows = 0
    meta: dict[str, str] = {}
    for info in files:
        with fs.open(info["name"], "rb") as f:
            pf = pq.ParquetFile(f)
            rows += pf.metadata.num_rows
            if not meta:
                meta = metadata_of(pf.schema_arrow)
    return TableInfo(table, len(files), rows, sum(int(d["size"]) for d in files), meta)


def table_fingerprint(root: str, table: str) -> dict[str, object]:
    """Which shards a reader saw: their count, total bytes and a sha256 over (name, size) of each.

    Shards are immutable once committed (a rerun of a unit rewrites its own shard names), so a
    changed table changes this fingerprint without reading any data.
    """
    fs, path = resolve(join(root, table), fresh=True)
    files = sorted((posixpath.basename(d["name"]), int(d["size"]))
                   for d in retry(lambda: fs.ls(path, detail=True)) if d["name"].endswith(".parquet"))
    return {"table": table, "shards": len(files), "bytes": sum(size for _, size in files),
            "fingerprint": fingerprint(files)}
