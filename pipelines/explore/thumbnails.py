"""Thumbnail sprite sheets: small JPEGs of the images the site shows, built once and resumable.

Images are decoded as every stage decodes them (``catalog.images.read_image_bytes`` then
``catalog.decode.decode_rgb``: EXIF orientation, alpha on grey, JPEG draft decoding), shrunk into a
square cell and packed ``cols × cols`` to a sheet, in the order the pages show them, so the images of
one page share a few sheets.

The work is split like a stage's: ``plan`` cuts the images still without a thumbnail into units of a
few sheets; ``process`` (no side effects: it only reads images) returns a unit's sheets and index
rows; ``commit`` writes the sheets, then the index shard (``catalog.shards.write_shards``), then the
unit's ledger marker. A killed build leaves at most uncommitted units, whose stray files the next
build deletes before planning again; a later build (more images shown) plans only the new images.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from catalog import schemas
from catalog.decode import MISSING, DecodeError, decode_rgb
from catalog.images import read_image_bytes
from catalog.ledger import Ledger
from catalog.paths import join, ls, resolve, retry, write_bytes_atomic
from catalog.progress import progress
from catalog.shards import delete_shards, read_shard, shard_urls, write_shards

STAGE = "explore-thumbnails"
INDEX_TABLE = "_thumbs"  # inside the site folder, beside the sheets
SHEETS_DIR = "thumbs"
SHEETS_PER_UNIT = 8
UNREADABLE = "unreadable"
_BACKGROUND = (236, 236, 236)

INDEX_SCHEMA = schemas.stamp(pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("sheet", pa.string(), nullable=False),
    pa.field("cell", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" or why the image could not be shown
]), INDEX_TABLE)


@dataclass(frozen=True)
class SheetSpec:
    size: int
    cols: int
    quality: int

    @property
    def per_sheet(self) -> int:
        return self.cols * self.cols


@dataclass(frozen=True)
class SheetUnit:
    """A few consecutive sheets' worth of images: a stable name, ids and where their bytes are."""

    name: str
    image_ids: tuple[int, ...]
    uris: tuple[str, ...]


@dataclass(frozen=True)
class UnitResult:
    sheets: dict[str, bytes]  # sheet name -> JPEG bytes
    index: pa.Table  # INDEX_SCHEMA rows, one per image


def sheet_url(site: str, sheet: str) -> str:
    return join(site, SHEETS_DIR, f"{sheet}.jpg")


def plan(image_ids: np.ndarray, uris: Sequence[str], spec: SheetSpec) -> list[SheetUnit]:
    """Units of ``SHEETS_PER_UNIT`` sheets, named after a digest of everything they hold, so a plan of
    other images never reuses a finished unit's name."""
    digest = hashlib.sha256(np.ascontiguousarray(image_ids, np.int64).tobytes())
    digest.update(f"{spec.size}/{spec.cols}/{spec.quality}".encode())
    generation = digest.hexdigest()[:10]
    step = spec.per_sheet * SHEETS_PER_UNIT
    return [SheetUnit(f"{generation}-{i // step:06d}", tuple(int(x) for x in image_ids[i:i + step]),
                      tuple(uris[i:i + step])) for i in range(0, len(image_ids), step)]


def thumbnail(uri: str, size: int) -> Image.Image:
    """The image shrunk to fit a ``size`` square, decoded through the stages' decode path."""
    img = decode_rgb(read_image_bytes(uri), min_side=size)
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    return img


def _status(uri: str, size: int) -> tuple[Image.Image | None, str]:
    try:
        return thumbnail(uri, size), "ok"
    except DecodeError as e:
        return None, e.reason
    except FileNotFoundError:
        return None, MISSING
    except OSError:
        return None, UNREADABLE


def process(unit: SheetUnit, spec: SheetSpec) -> UnitResult:
    """Decode a unit's images into its sheets; reads images, writes nothing."""
    sheets: dict[str, bytes] = {}
    names, cells, statuses = [], [], []
    for first in range(0, len(unit.image_ids), spec.per_sheet):
        name = f"{unit.name}-{first // spec.per_sheet:02d}"
        sheet = Image.new("RGB", (spec.cols * spec.size, spec.cols * spec.size), _BACKGROUND)
        for cell, uri in enumerate(unit.uris[first:first + spec.per_sheet]):
            img, status = _status(uri, spec.size)
            if img is not None:
                x, y = (cell % spec.cols) * spec.size, (cell // spec.cols) * spec.size
                sheet.paste(img, (x + (spec.size - img.width) // 2, y + (spec.size - img.height) // 2))
            names.append(name)
            cells.append(cell)
            statuses.append(status)
        buf = io.BytesIO()
        sheet.save(buf, format="JPEG", quality=spec.quality, optimize=True)
        sheets[name] = buf.getvalue()
    index = pa.Table.from_arrays([pa.array(unit.image_ids, pa.int64()), pa.array(names, pa.string()),
                                  pa.array(cells, pa.int32()), pa.array(statuses, pa.string())],
                                 schema=INDEX_SCHEMA)
    return UnitResult(sheets, index)


def commit(site: str, unit: SheetUnit, result: UnitResult, ledger: Ledger) -> None:
    """Sheets first, then the index shard that points at them, then the marker."""
    for name, data in result.sheets.items():
        write_bytes_atomic(sheet_url(site, name), data)
    write_shards(site, INDEX_TABLE, unit.name, result.index)
    ok = sum(s == "ok" for s in result.index.column("status").to_pylist())
    ledger.mark(unit.name, {"images": result.index.num_rows, "ok": ok})


def _remove(url: str) -> None:
    fs, path = resolve(url)
    retry(lambda: fs.rm(path))


def _unit_of(url: str) -> str:
    """``<generation>-<unit>`` from a shard (``…-00000.parquet``) or sheet (``…-03.jpg``) name."""
    stem = posixpath.basename(url).rsplit(".", 1)[0]
    return stem.rsplit("-", 1)[0]


def built_index(site: str, ledger: Ledger) -> pa.Table:
    """Index rows of the committed units, after deleting what a killed build left uncommitted."""
    done = ledger.done()
    keep = []
    for url in shard_urls(site, INDEX_TABLE):
        if _unit_of(url) in done:
            keep.append(url)
        else:
            _remove(url)
    for url in ls(join(site, SHEETS_DIR)):
        if url.endswith(".jpg") and _unit_of(url) not in done:
            _remove(url)
    if not keep:
        return INDEX_SCHEMA.empty_table()
    return pa.concat_tables([read_shard(url) for url in keep])


def _exit_with(parent: int) -> None:
    """Worker initializer: end this process when the build that spawned it is gone (killed), instead of
    decoding on for nobody."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run(site: str, units: list[SheetUnit], spec: SheetSpec, ledger: Ledger, workers: int) -> None:
    with progress(sum(len(u.image_ids) for u in units), "explore thumbnails", unit="img") as bar:
        if workers <= 1 or len(units) <= 1:
            for unit in units:
                commit(site, unit, process(unit, spec), ledger)
                bar.update(len(unit.image_ids))
            return
        # spawn: the parent holds DuckDB and Arrow thread pools, which a fork would copy mid-flight
        with ProcessPoolExecutor(min(workers, len(units)), mp_context=get_context("spawn"),
                                 initializer=_exit_with, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(process, unit, spec): unit for unit in units}
            for future in as_completed(futures):
                unit = futures[future]
                commit(site, unit, future.result(), ledger)
                bar.update(len(unit.image_ids))


def build_thumbnails(site: str, image_ids: np.ndarray, uris: Sequence[str], spec: SheetSpec, *,
                     workers: int = 0, overwrite: bool = False) -> tuple[pa.Table, dict[str, int]]:
    """Thumbnails of ``image_ids`` (in display order) that are not built yet; returns the whole index
    and counts (``planned``, ``built`` in this run, ``failed`` among them)."""
    ledger = Ledger(site, STAGE)
    if overwrite:
        ledger.reset()
        delete_shards(site, INDEX_TABLE, "")
    existing = built_index(site, ledger)
    todo = ~np.isin(image_ids, existing.column("image_id").to_numpy())
    todo_ids = np.asarray(image_ids)[todo]
    units = plan(todo_ids, [uris[i] for i in np.flatnonzero(todo)], spec)
    _run(site, units, spec, ledger, workers or len(os.sched_getaffinity(0)))
    index = built_index(site, ledger) if units else existing
    fresh = index.filter(pc.is_in(index.column("image_id"), pa.array(todo_ids, pa.int64())))
    failed = fresh.num_rows - int(pc.sum(pc.equal(fresh.column("status"), "ok")).as_py() or 0)
    return index, {"planned": len(image_ids), "built": len(todo_ids), "failed": failed}
