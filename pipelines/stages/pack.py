"""``curate pack``: a curated part as WebDataset-style tar shards beside the catalog.

Training reads one image at a time from wherever the pool lives; at scale that is millions of small
object reads. Packing writes the part's image bytes into large tar shards (members ``<image_id>.<ext>``)
under ``packed/<part>/`` plus an index table mapping each image to its byte range, which the training
dataset uses instead of the pool URIs when the run is complete. One unit per tar shard: the tar is
committed before its index rows, so a resumed run never indexes a shard that is not there.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from catalog import schemas
from catalog.config import at_least
from catalog.images import UnreadableItem, byte_range_uri, read_item, uri_extension
from catalog.manifest import fingerprint
from catalog.names import check_name
from catalog.paths import join
from catalog.schemas import ERRORS, ERRORS_TABLE, curated_table, packed_table
from catalog.shards import read_table
from pipelines.stage import Output, Stage, StageContext, Totals, Unit


@dataclass(frozen=True)
class PackConfig:
    part: str = "lvd"
    images_per_shard: int = 1000

    def __post_init__(self) -> None:
        at_least(self, 1, "images_per_shard")
        check_name(self.part, "pack --part")


def _tar_shard(ids: list[int], uris: list[str]) -> tuple[bytes, list[tuple[int, int, int]], list[dict[str, Any]]]:
    """Tar bytes, (image_id, data offset, size) per packed member, and an error row per unreadable image."""
    buf = io.BytesIO()
    members, failed = [], []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for image_id, uri in zip(ids, uris):
            try:
                data = read_item(uri)
            except UnreadableItem as e:
                failed.append({"image_id": image_id, "uri": uri or "", "stage": "pack",
                               "reason": e.reason, "message": f"could not read the image to pack it: {e}"})
                continue
            ext = uri_extension(uri) or ".img"
            info = tarfile.TarInfo(f"{image_id & 0xFFFFFFFFFFFFFFFF:016x}{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            members.append((image_id, len(data)))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue()), mode="r") as tar:  # data offsets, as readers see them
        offsets = [m.offset_data for m in tar.getmembers()]
    return buf.getvalue(), [(i, off, n) for (i, n), off in zip(members, offsets)], failed


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
        table = read_table(ctx.root, curated_table(config.part), ["image_id", "uri"]).sort_by("image_id")
        ids, uris = table.column("image_id").to_pylist(), table.column("uri").to_pylist()
        n = config.images_per_shard
        return [Unit(f"shard-{i // n:06d}", {"ids": ids[i : i + n], "uris": uris[i : i + n]}, len(ids[i : i + n]),
                     fingerprint(ids[i : i + n], uris[i : i + n])) for i in range(0, len(ids), n)]

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        part = ctx.config.part
        path = f"{packed_table(part)}/{unit.name}.tar"
        data, members, failed = _tar_shard(unit.payload["ids"], unit.payload["uris"])
        url = join(ctx.root, path)
        index = pa.table({"image_id": pa.array([m[0] for m in members], pa.int64()),
                          "uri": [byte_range_uri(url, m[1], m[2]) for m in members]})
        index = index.replace_schema_metadata(schemas.stamp(index.schema, packed_table(part)).metadata)
        return Output({packed_table(part): index,
                       ERRORS_TABLE: pa.Table.from_pylist(failed, schema=schemas.stamp(ERRORS, ERRORS_TABLE))},
                      files={path: data})

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        packed, unreadable = totals.rows(packed_table(ctx.config.part)), totals.rows(ERRORS_TABLE)
        return {"in": totals.items, "out": packed, "errored": unreadable, "packed": packed, "unreadable": unreadable}


STAGE = PackStage()
