"""The embed stage's input as items: slices of the pool's shards, so that its plan grows with the shards,
not the images; which images a unit embeds is read from the pool when it is planned (`unit_images`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.images import resolve_uris
from catalog.ledger_items import Item, shard_items, shard_key, written_ids
from catalog.paths import join
from catalog.schemas import EMBEDDINGS_TABLE, ERRORS_TABLE, POOL_TABLE
from catalog.shards import read_shard, shard_rows, table_dir


def pool_slices(root: str, rows_per_slice: int) -> list[Item]:
    """Every pool shard cut into slices of ``rows_per_slice`` rows (key ``pool/<shard>#<k>``), each with its
    shard's fingerprint: a rewritten shard changes all its slices."""
    items = []
    for shard in shard_items(root, POOL_TABLE):
        rows = shard_rows(join(table_dir(root, POOL_TABLE), shard_key(shard.key)[1]), POOL_TABLE)
        items += [Item(f"{shard.key}#{k}", shard.fingerprint) for k in range(-(-rows // rows_per_slice))]
    return items


def _shard_and_slice(key: str) -> tuple[str, int]:
    name, k = shard_key(key)[1].rsplit("#", 1)
    return name, int(k)


def _usable(root: str, name: str) -> pa.Table:
    rows = read_shard(join(table_dir(root, POOL_TABLE), name), ["image_id", "uri", "status"], POOL_TABLE)
    return rows.set_column(1, "uri", resolve_uris(root, rows.column("uri")))


def unit_images(root: str, run: str, keys: list[str], rows_per_slice: int,
                generation: int) -> tuple[list[int], list[str]]:
    """``(ids, uris)`` of the usable pool rows in these slices; an update's unit (``generation`` > 0) leaves
    out the images this run's earlier generations embedded or failed to embed."""
    done = np.empty(0, np.int64)
    if generation:
        done = np.concatenate([written_ids(root, t, run, lambda g: g < generation)
                               for t in (EMBEDDINGS_TABLE, ERRORS_TABLE)])
    tables: dict[str, pa.Table] = {}
    ids: list[int] = []
    uris: list[str] = []
    for key in keys:
        name, k = _shard_and_slice(key)
        if name not in tables:
            tables[name] = _usable(root, name)
        rows = tables[name].slice(k * rows_per_slice, rows_per_slice)
        keep = pc.and_(pc.equal(rows.column("status"), "ok"),
                       pc.invert(pc.is_in(rows.column("image_id"), pa.array(done, pa.int64()))))
        rows = rows.filter(keep)
        ids += rows.column("image_id").to_pylist()
        uris += rows.column("uri").to_pylist()
    return ids, uris


def still_usable(root: str, keys: Iterable[str]) -> pa.Array:
    """The ids of the usable rows of these slices' shards as they are now: what a finished unit keeps when
    its shards were rewritten (a vanished file's row is 'removed'; a changed file's row moved to a new shard)."""
    names = sorted({_shard_and_slice(key)[0] for key in keys})
    parts = [_usable(root, n) for n in names]
    ids = [p.filter(pc.equal(p.column("status"), "ok")).column("image_id") for p in parts]
    return pa.concat_arrays([c.combine_chunks() for c in ids]) if ids else pa.array([], pa.int64())
