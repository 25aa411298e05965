"""``thumbnails``: the sprite sheets of `curate explore`, small JPEGs of every image its pages show.

Its catalog root is the **site folder**, not the catalog: the sheets are part of the site (served and
uploaded with it, deleted with it); a site may be written anywhere (``--out``, a bucket) while the
catalog it shows stays read-only; and two sites of one catalog (other caps, another thumbnail size) each
keep their own ledger instead of contending for one run in the catalog.

In the site folder: ``_shown`` (the input: every image a page shows, once, in page order, written by
`pipelines.explore.site`), ``_thumbs`` (the output: image_id → sheet, cell, status), ``thumbs/<sheet>.jpg``
(each unit's files, committed before its ``_thumbs`` rows), ``_ledger/thumbnails/`` and ``_manifests/``.

Images are decoded as every stage decodes them (``catalog.images.read_image_bytes`` then
``catalog.decode.decode_rgb``: EXIF orientation, alpha on grey, JPEG draft decoding), shrunk into a
square cell and packed ``cols × cols`` to a sheet in page order, so the images of one page share a few
sheets. A unit is ``SHEETS_PER_UNIT`` consecutive sheets; sheets are named after a digest of the whole
list of images and their settings, so a sheet name never comes back with other pixels (no stale sheet in a
browser's or a CDN's cache). A changed list (other caps, a re-curated catalog) is a changed input: the
runner builds the sheets again from scratch, and ``clear`` deletes the old ones.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from catalog import schemas
from catalog.config import ConfigError, at_least
from catalog.decode import MISSING, DecodeError, decode_rgb
from catalog.images import read_image_bytes
from catalog.manifest import fingerprint
from catalog.paths import join, resolve, retry
from catalog.shards import delete_shards, read_table, write_shards
from pipelines.stage import Output, Stage, StageContext, Totals, Unit

SHOWN_TABLE = "_shown"
INDEX_TABLE = "_thumbs"
SHEETS_DIR = "thumbs"
SHEETS_PER_UNIT = 8
UNREADABLE = "unreadable"
_BACKGROUND = (236, 236, 236)

SHOWN_SCHEMA = schemas.stamp(pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
]), SHOWN_TABLE)

INDEX_SCHEMA = schemas.stamp(pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("sheet", pa.string(), nullable=False),
    pa.field("cell", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" or why the image could not be shown
]), INDEX_TABLE)


@dataclass(frozen=True)
class ThumbnailsConfig:
    """Cells of ``thumb_size`` pixels, ``sheet_cols × sheet_cols`` to a sheet (the keys of `curate explore`)."""

    thumb_size: int = 64
    sheet_cols: int = 10
    jpeg_quality: int = 80

    def __post_init__(self) -> None:
        at_least(self, 1, "thumb_size", "sheet_cols")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")

    @property
    def per_sheet(self) -> int:
        return self.sheet_cols * self.sheet_cols


def sheet_path(sheet: str) -> str:
    """A sheet's path inside the site folder."""
    return f"{SHEETS_DIR}/{sheet}.jpg"


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


def write_shown(site: str, image_ids: np.ndarray, uris: list[str]) -> None:
    """The stage's input: the images the site's pages show, in page order (replacing an earlier list)."""
    delete_shards(site, SHOWN_TABLE, "")
    write_shards(site, SHOWN_TABLE, "shown", pa.Table.from_arrays(
        [pa.array(image_ids, pa.int64()), pa.array(uris, pa.string())], schema=SHOWN_SCHEMA))


def _shown(root: str) -> tuple[np.ndarray, list[str], str]:
    """The images to draw, in page order, and a digest of that list."""
    table = read_table(root, SHOWN_TABLE)
    ids = table.column("image_id").to_numpy()
    uris = table.column("uri").to_pylist()
    digest = hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes())
    digest.update("\n".join(uris).encode())
    return ids, uris, digest.hexdigest()


def sheets(unit_name: str, uris: list[str], config: ThumbnailsConfig) -> tuple[dict[str, bytes], list[tuple]]:
    """A unit's sheets (path → JPEG bytes) and per image its (sheet, cell, status); reads, writes nothing."""
    files: dict[str, bytes] = {}
    cells = []
    size, cols = config.thumb_size, config.sheet_cols
    for first in range(0, len(uris), config.per_sheet):
        name = f"{unit_name}-{first // config.per_sheet:02d}"
        sheet = Image.new("RGB", (cols * size, cols * size), _BACKGROUND)
        for cell, uri in enumerate(uris[first:first + config.per_sheet]):
            img, status = _status(uri, size)
            if img is not None:
                x, y = (cell % cols) * size, (cell // cols) * size
                sheet.paste(img, (x + (size - img.width) // 2, y + (size - img.height) // 2))
            cells.append((name, cell, status))
        buf = io.BytesIO()
        sheet.save(buf, format="JPEG", quality=config.jpeg_quality, optimize=True)
        files[sheet_path(name)] = buf.getvalue()
    return files, cells


class ThumbnailsStage(Stage):
    name = "thumbnails"
    config_class = ThumbnailsConfig
    writes = (INDEX_TABLE,)
    distributable = True
    # a thumbnail costs ~0.4 ms of CPU (docs/benchmarks.md) and a Ray start 10-20 s, so below ~50k images
    # (the 10k demo shows ~9k) one process draws them sooner than Ray starts
    in_process_below = 50_000
    empty_schemas = {INDEX_TABLE: INDEX_SCHEMA}

    def extra_inputs(self, ctx: StageContext) -> dict[str, str]:
        return {SHOWN_TABLE: _shown(ctx.root)[2]}

    def plan(self, ctx: StageContext) -> list[Unit]:
        ids, uris, digest = _shown(ctx.root)
        config: ThumbnailsConfig = ctx.config
        generation = hashlib.sha256(f"{digest}/{config}".encode()).hexdigest()[:10]
        step = config.per_sheet * SHEETS_PER_UNIT
        units = []
        for i in range(0, len(ids), step):
            unit_ids, unit_uris = ids[i:i + step].tolist(), uris[i:i + step]
            units.append(Unit(f"{generation}-{i // step:06d}", {"ids": unit_ids, "uris": unit_uris}, len(unit_ids),
                              fingerprint(unit_ids, unit_uris)))
        return units

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        files, cells = sheets(unit.name, unit.payload["uris"], ctx.config)
        names, positions, statuses = zip(*cells)  # a unit holds at least one image
        index = pa.Table.from_arrays([pa.array(unit.payload["ids"], pa.int64()), pa.array(names, pa.string()),
                                      pa.array(positions, pa.int32()), pa.array(statuses, pa.string())],
                                     schema=INDEX_SCHEMA)
        return Output({INDEX_TABLE: index}, files=files)

    def clear(self, ctx: StageContext) -> None:
        """The sheets of the run being forgotten (its ``_thumbs`` rows are deleted by the runner)."""
        fs, path = resolve(join(ctx.root, SHEETS_DIR))
        if retry(lambda: fs.exists(path)):
            retry(lambda: fs.rm(path, recursive=True))

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        status = read_table(ctx.root, INDEX_TABLE, ["status"]).column("status")
        ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
        return {"in": totals.items, "out": ok, "errored": len(status) - ok}


STAGE = ThumbnailsStage()
