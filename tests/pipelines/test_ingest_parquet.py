"""Parquet pools with the image bytes inline: ingest and every later cell read cost their own row
groups, not the whole file, so a pool's ingest reads bytes linear in its rows.

Bytes are counted by a local filesystem under its own protocol (``counting://``) that adds up what
every reader takes from the files: the real pyarrow reads, measured where they touch the disk.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import zlib

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from PIL import Image

from catalog.images import read_image_bytes
from catalog.sql import query
from pipelines.parquet_items import parquet_items
from pipelines.stage import run_stage
from pipelines.stages.ingest import IngestConfig, _items


class _CountingOpener(LocalFileOpener):
    def read(self, *args):
        data = super().read(*args)
        CountingFS.bytes_read += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        CountingFS.bytes_read += n or 0
        return n


class CountingFS(LocalFileSystem):
    protocol = ("counting",)
    bytes_read = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("counting://"))

    def _open(self, path, mode="rb", **kwargs):
        return _CountingOpener(self._strip_protocol(path), mode, fs=self, **kwargs)


fsspec.register_implementation("counting", CountingFS, clobber=True)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(i: int, side: int = 2) -> bytes:
    """A distinct ``side``² RGB PNG per ``i``, encoded here (PIL takes ~25 s for 60k of them on 2 cores)."""
    pixel = bytes([i % 256, i // 256 % 256, i // 65536 % 256])
    raw = (b"\x00" + pixel * side) * side
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _pool_file(path, n: int, row_group_size: int, side: int = 2) -> list[bytes]:
    images = [_png(i, side) for i in range(n)]
    pq.write_table(pa.table({"bytes": images}), path, row_group_size=row_group_size)
    return images


def _ingest_read(source: str, rows_per_unit: int = 500) -> tuple[int, list[bytes]]:
    """Bytes read from disk by planning and reading every unit of an ingest, and the image bytes read."""
    CountingFS.bytes_read = 0
    values = [data for item in parquet_items(source, rows_per_unit) for _, data, _, _ in _items(item.data)]
    return CountingFS.bytes_read, values


def test_parquet_ingest_reads_bytes_linear_in_rows(tmp_path):
    read = {}
    for n in (10_000, 50_000):
        path = tmp_path / f"pool{n}.parquet"
        images = _pool_file(path, n, row_group_size=250)
        read[n], values = _ingest_read(f"counting://{path}")
        assert values == images  # every row once, in order
        assert read[n] < 3 * path.stat().st_size  # not the file once per unit
    # rows ×5 → bytes read ×5 (the unit-by-unit whole-file read it replaces was ×25)
    assert read[50_000] / read[10_000] < 5 * 1.4, read


def test_one_cell_reads_its_row_group_not_the_column(tmp_path):
    path = tmp_path / "pool.parquet"
    images = _pool_file(path, 20_000, row_group_size=200)
    size = path.stat().st_size
    CountingFS.bytes_read = 0
    assert read_image_bytes(f"counting://{path}#row=7&column=bytes") == images[7]
    assert CountingFS.bytes_read < size / 4  # the footer (once per process) and one row group
    for row in (0, 12_345, 19_999):
        CountingFS.bytes_read = 0
        assert read_image_bytes(f"counting://{path}#row={row}&column=bytes") == images[row]
        assert CountingFS.bytes_read < size / 20, (row, CountingFS.bytes_read, size)


def test_units_follow_row_groups_and_big_groups_warn(tmp_path, caplog):
    small = tmp_path / "small.parquet"
    _pool_file(small, 1000, row_group_size=300)
    slices = [(i.data["start"], i.data["stop"]) for i in parquet_items(str(small), 500)]
    assert slices == [(0, 300), (300, 600), (600, 1000)]  # whole row groups packed, never a cut one
    one = tmp_path / "one.parquet"
    _pool_file(one, 2100, row_group_size=10_000)
    with caplog.at_level(logging.WARNING, logger="curate.pipelines"):
        slices = [(i.data["start"], i.data["stop"]) for i in parquet_items(str(one), 500)]
    assert slices == [(0, 500), (500, 1000), (1000, 1500), (1500, 2000), (2000, 2100)]
    assert "row groups of up to 2100 rows" in caplog.text


def test_ingest_of_row_grouped_inline_pool_matches_its_bytes(tmp_path):
    path = tmp_path / "pool.parquet"
    images = _pool_file(path, 450, row_group_size=70, side=40)
    root = str(tmp_path / "cat")
    run_stage("ingest", root, IngestConfig(source=str(path), files_per_unit=200))
    rows = query(root, "SELECT uri, sha256, status FROM pool").to_pylist()
    assert len(rows) == 450 and {r["status"] for r in rows} == {"ok"}
    want = {f"{path}#row={i}&column=bytes": hashlib.sha256(b).hexdigest() for i, b in enumerate(images)}
    assert {r["uri"]: r["sha256"] for r in rows} == want
    for r in rows[:20]:
        assert hashlib.sha256(read_image_bytes(r["uri"])).hexdigest() == r["sha256"]
        assert Image.open(io.BytesIO(read_image_bytes(r["uri"]))).size == (40, 40)


def _probes(monkeypatch) -> list[int]:
    """Count the images ingest probes (the real probe still runs)."""
    import pipelines.stages.ingest as ingest

    calls, real = [0], ingest.probe_image

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest, "probe_image", counted)
    return calls


POOL_SQL = "SELECT * FROM pool {} ORDER BY image_id"


def _same_as_from_scratch(root: str, source: str, scratch: str) -> None:
    run_stage("ingest", scratch, {"source": source, "files_per_unit": 10})
    assert query(root, POOL_SQL.format("WHERE status <> 'removed'")).to_pylist() == \
        query(scratch, POOL_SQL.format("")).to_pylist()
    assert query(root, "SELECT count(*) - count(DISTINCT image_id) FROM pool").column(0)[0].as_py() == 0


def test_a_glob_of_uri_lists_appends_new_rows_and_files_and_marks_vanished_rows_removed(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    uris = []
    for i in range(60):
        (images / f"{i:03d}.png").write_bytes(_png(i, side=40))
        uris.append(str(images / f"{i:03d}.png"))
    lists = tmp_path / "lists"
    lists.mkdir()

    def write(name: str, rows: list[str | None]) -> None:
        pq.write_table(pa.table({"uri": pa.array(rows, pa.string())}), lists / name, row_group_size=10)

    first = uris[:30]
    first[5], first[7] = first[2], None  # a URI named twice, and a row without one
    write("a.parquet", first)
    source, root = str(lists / "*.parquet"), str(tmp_path / "cat")
    run_stage("ingest", root, {"source": source, "files_per_unit": 10})
    # a.parquet rewritten with 10 rows more, and a new file that names one of a's URIs again
    write("a.parquet", first + uris[30:40])
    write("b.parquet", uris[40:49] + [uris[0]])
    probes = _probes(monkeypatch)
    grown = run_stage("ingest", root, {"source": source, "files_per_unit": 10})
    assert probes[0] == 20 and grown.items_run == 20  # only the new rows were read
    _same_as_from_scratch(root, source, str(tmp_path / "scratch1"))
    # b.parquet vanishes and a.parquet is cut to 25 rows: 25 rows are gone, rows 20-24 are read again
    os.remove(lists / "b.parquet")
    write("a.parquet", first[:25])
    probes[0] = 0
    shrunk = run_stage("ingest", root, {"source": source, "files_per_unit": 10})
    assert shrunk.summary["removed"] == 25 and probes[0] == 5
    removed = query(root, "SELECT uri FROM pool WHERE status = 'removed' ORDER BY uri").column(0).to_pylist()
    assert removed == sorted(uris[25:40] + uris[40:49] + [f"{uris[0]}#dup=2"])
    _same_as_from_scratch(root, source, str(tmp_path / "scratch2"))


def test_an_inline_pool_rewritten_with_rows_appended_reads_only_the_new_rows(tmp_path, monkeypatch):
    path = tmp_path / "pool.parquet"
    images = [_png(i, side=40) for i in range(50)]
    pq.write_table(pa.table({"bytes": images[:30]}), path, row_group_size=10)
    root = str(tmp_path / "cat")
    run_stage("ingest", root, {"source": str(path), "files_per_unit": 10})
    pq.write_table(pa.table({"bytes": images}), path, row_group_size=10)  # the same first row groups, 2 more
    probes = _probes(monkeypatch)
    assert run_stage("ingest", root, {"source": str(path), "files_per_unit": 10}).items_run == 20
    assert probes[0] == 20
    _same_as_from_scratch(root, str(path), str(tmp_path / "scratch"))
