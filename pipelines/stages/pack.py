"""``curate pack``: a curated part as WebDataset-style tar shards beside the catalog.

Training reads one image at a time from wherever the pool lives; at scale that is millions of small
object reads. Packing writes the part's image bytes into large tar shards (members ``<image_id>.<ext>``)
under ``packed/<part>/`` plus an index table mapping each image to its byte range, which the training
dataset uses instead of the pool URIs when it is complete. One ledger unit per shard: resumable.
"""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa

from catalog import schemas
from catalog.images import byte_range_uri, read_image_bytes, uri_extension
from catalog.ledger import Ledger
from catalog.manifest import RunManifest
from catalog.names import check_name
from catalog.paths import join, write_bytes_atomic
from catalog.progress import progress
from catalog.shards import read_table, write_shards


def packed_table(part: str) -> str:
    return f"packed/{part}"


def _tar_shard(ids: list[int], uris: list[str]) -> tuple[bytes, list[tuple[int, int, int]], int]:
    """Tar bytes, (image_id, data offset, size) per packed member, and how many images were unreadable."""
    buf = io.BytesIO()
    members, missing = [], 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for image_id, uri in zip(ids, uris):
            try:
                data = read_image_bytes(uri)
            except (FileNotFoundError, OSError):
                missing += 1
                continue
            ext = uri_extension(uri) or ".img"
            info = tarfile.TarInfo(f"{image_id & 0xFFFFFFFFFFFFFFFF:016x}{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            members.append((image_id, len(data)))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue()), mode="r") as tar:  # data offsets, as readers see them
        offsets = [m.offset_data for m in tar.getmembers()]
    return buf.getvalue(), [(i, off, n) for (i, n), off in zip(members, offsets)], missing


def pack(root: str, part: str, images_per_shard: int = 1000) -> dict[str, int]:
    """Pack ``curated/<part>``; returns images packed and images that could not be read."""
    check_name(part, "pack --part")
    table = read_table(root, f"curated/{part}", ["image_id", "uri"]).sort_by("image_id")
    ids, uris = table.column("image_id").to_pylist(), table.column("uri").to_pylist()
    ledger = Ledger(root, f"pack-{part}")
    done = ledger.done()
    totals = {"packed": 0, "unreadable": 0}
    with RunManifest(root, f"pack-{part}", {"part": part, "images_per_shard": images_per_shard}) as manifest, \
            progress(len(ids), f"pack {part}", unit="img") as bar:
        for start in range(0, len(ids), images_per_shard):
            unit = f"shard-{start // images_per_shard:06d}"
            chunk = slice(start, start + images_per_shard)
            if unit not in done:
                url = join(root, packed_table(part), f"{unit}.tar")
                data, members, missing = _tar_shard(ids[chunk], uris[chunk])
                write_bytes_atomic(url, data)
                index = pa.table({"image_id": pa.array([m[0] for m in members], pa.int64()),
                                  "uri": [byte_range_uri(url, m[1], m[2]) for m in members]})
                index = index.replace_schema_metadata(schemas.stamp(index.schema, packed_table(part)).metadata)
                write_shards(root, packed_table(part), unit, index)
                ledger.mark(unit, {"packed": len(members), "unreadable": missing})
                done[unit] = {"packed": len(members), "unreadable": missing}
            totals["packed"] += done[unit]["packed"]
            totals["unreadable"] += done[unit]["unreadable"]
            bar.update(len(ids[chunk]))
        manifest.rows = {"in": len(ids), "out": totals["packed"], "errored": totals["unreadable"]}
    ledger.mark_complete(totals)
    return totals
