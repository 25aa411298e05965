"""``curate pack``: a curated part as WebDataset shards beside the catalog.

Training reads one image at a time from wherever the pool lives; at scale that is millions of small
object reads. Packing writes the part's images into large tar shards under ``packed/<part>/shards/``
and an index table ``packed/<part>/index`` mapping each image to its byte range (a URI relative to the
catalog root, so a copied or uploaded catalog still reads), which the training dataset uses instead
of the pool URIs when the run is complete. The two live in sibling folders, so ``pyarrow.dataset``
over the index and ``webdataset`` over the shards each see only their own files.

Each sample is two members, ``<key>.<field>`` and ``<key>.json`` (image_id, uri, part and the cluster
ids l1…lN of the curated table), where the key is the image_id as 16 hex digits of its unsigned 64-bit
value. Every sample of a pack has the same image field, because WebDataset clients infer the fields
from the first samples: ``jpg`` when every image of the part is named as a JPEG (the originals, byte
for byte: the usual web-crawled pool, and no size growth), else ``png``: 8-bit PNG originals without alpha kept,
every other image re-encoded losslessly from the RGB pixels ``catalog.decode`` gives the trainer, so a
client's plain PIL decode sees the trainer's pixels. One unit per
tar shard: the tar is committed before its index rows, so a resumed run never indexes a missing shard.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from catalog import schemas
from catalog.config import at_least
from catalog.decode import CORRUPT, DecodeError, decode_rgb, plain_png
from catalog.images import UnreadableItem, byte_range_uri, read_item, uri_extension
from catalog.manifest import fingerprint
from catalog.names import check_name
from catalog.schemas import ERRORS, ERRORS_TABLE, curated_table, packed_shards_dir, packed_table
from catalog.shards import read_table
from pipelines.stage import Output, Stage, StageContext, Totals, Unit

_JPEG_MAGIC = b"\xff\xd8\xff"
_SIDECAR_COLUMNS = ("image_id", "uri", "part")


@dataclass(frozen=True)
class PackConfig:
    part: str = "lvd"
    images_per_shard: int = 1000

    def __post_init__(self) -> None:
        at_least(self, 1, "images_per_shard")
        check_name(self.part, "pack --part")


def sample_key(image_id: int) -> str:
    """A sample's WebDataset key: the signed 64-bit image_id as 16 hex digits of its unsigned value."""
    return f"{image_id & 0xFFFFFFFFFFFFFFFF:016x}"


def image_id_of_key(key: str) -> int:
    """The inverse of ``sample_key``: back to the catalog's signed int64 image_id."""
    value = int(key, 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def image_field(uris: list[str | None]) -> str:
    """The one image field of a pack: ``jpg`` when every image is named as a JPEG, else ``png``."""
    return "jpg" if uris and all(u and uri_extension(u) in (".jpg", ".jpeg") for u in uris) else "png"


def stored_bytes(data: bytes, field: str) -> bytes:
    """The bytes stored under ``field``: a JPEG original as it is; under ``png`` the original when any
    PIL client decodes it to the trainer's pixels (`plain_png`), else a lossless 8-bit RGB PNG of those
    pixels (16-bit grey or alpha would otherwise read as white or uncomposited). Raises ``DecodeError``."""
    if field == "jpg":
        if data.startswith(_JPEG_MAGIC):
            return data
        raise DecodeError(CORRUPT, "named as a JPEG, but the bytes are another format")
    if plain_png(data):
        return data
    out = io.BytesIO()
    decode_rgb(data).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; returns the offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    offset = tar.offset + tarfile.BLOCKSIZE  # USTAR: one header block (names are short), then the data
    tar.addfile(info, io.BytesIO(data))
    return offset


def _tar_shard(samples: list[dict[str, Any]], field: str) -> tuple[bytes, list[tuple[int, int, int]], list[dict]]:
    """Tar bytes, (image_id, data offset, size) per packed image, and an error row per unusable image."""
    buf = io.BytesIO()
    members, failed = [], []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            image_id, uri = sample["image_id"], sample["uri"]
            try:
                data = stored_bytes(read_item(uri), field)
            except (UnreadableItem, DecodeError) as e:
                failed.append({"image_id": image_id, "uri": uri or "", "stage": "pack", "reason": e.reason,
                               "message": f"could not pack the image: {e}"})
                continue
            key = sample_key(image_id)
            offset = _add(tar, f"{key}.{field}", data)
            _add(tar, f"{key}.json", json.dumps(sample, sort_keys=True).encode())
            members.append((image_id, offset, len(data)))
    return buf.getvalue(), members, failed


class PackStage(Stage):
    name = "pack"
    config_class = PackConfig
    distributable = True
    empty_schemas = {ERRORS_TABLE: schemas.stamp(ERRORS, ERRORS_TABLE)}

    def run_name(self, config: PackConfig) -> str:
        return f"pack-{config.part}"

    def tables_read(self, config: PackConfig) -> tuple[str, ...]:
        return (curated_table(config.part),)

    def tables_written(self, config: PackConfig) -> tuple[str, ...]:
        return (packed_table(config.part), ERRORS_TABLE)

    def plan(self, ctx: StageContext) -> list[Unit]:
        config: PackConfig = ctx.config
        curated = read_table(ctx.root, curated_table(config.part)).sort_by("image_id")
        levels = [c for c in curated.column_names if c[1:].isdigit() and c.startswith("l")]
        curated = curated.select([*_SIDECAR_COLUMNS, *levels])
        rows, n = curated.to_pylist(), config.images_per_shard
        field = image_field([r["uri"] for r in rows])
        return [Unit(f"shard-{i // n:06d}", {"field": field, "samples": rows[i : i + n]}, len(rows[i : i + n]),
                     fingerprint(field, rows[i : i + n])) for i in range(0, len(rows), n)]

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        part = ctx.config.part
        path = f"{packed_shards_dir(part)}/{unit.name}.tar"  # catalog-relative: what the index records
        data, members, failed = _tar_shard(unit.payload["samples"], unit.payload["field"])
        index = pa.table({"image_id": pa.array([m[0] for m in members], pa.int64()),
                          "uri": [byte_range_uri(path, m[1], m[2]) for m in members]})
        index = index.replace_schema_metadata(
            schemas.stamp(index.schema, packed_table(part), {"image_field": unit.payload["field"]}).metadata)
        return Output({packed_table(part): index,
                       ERRORS_TABLE: pa.Table.from_pylist(failed, schema=schemas.stamp(ERRORS, ERRORS_TABLE))},
                      files={path: data})

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        packed, unreadable = totals.rows(packed_table(ctx.config.part)), totals.rows(ERRORS_TABLE)
        return {"in": totals.items, "out": packed, "errored": unreadable, "packed": packed, "unreadable": unreadable}


STAGE = PackStage()
