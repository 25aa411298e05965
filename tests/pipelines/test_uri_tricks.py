"""Names that look like URI syntax stay names: tar members and files named with ``::``, ``#offset=``,
``#row=``; duplicate member names and repeated URIs; and error messages never quote file content.

Every pool URI must read back exactly the bytes that were hashed at ingest (checked against the
tar and the files themselves, read here with ``tarfile`` and ``open``), every ``image_id`` is unique,
and ``curate embed`` runs over the result (twice: a rerun must not crash either).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalog.images import URIError, read_image_bytes
from catalog.sql import query
from pipelines.stage import run_stage
from pipelines.stages.ingest import IngestConfig, image_id
from tests.helpers import run_cli

TINY_EMBED = ["model=vit_test", "random_init=true", "image_size=32", "images_per_unit=8", "batch_size=8"]


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 36), colour).save(out, "PNG")
    return out.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pool(root: str) -> list[dict]:
    return query(root, "SELECT image_id, uri, sha256, status FROM pool ORDER BY uri").to_pylist()


@pytest.fixture(scope="module")
def tricky_tar(tmp_path_factory) -> tuple[Path, Path, list[tuple[str, bytes]]]:
    """A shard whose member names are URI syntax, and another tar one of those names points at."""
    root = tmp_path_factory.mktemp("tricks")
    other = root / "other" / "secret.tar"
    other.parent.mkdir()
    _tar(other, [("z.jpg", _png((250, 0, 0)))])
    members = [
        (f"s.jpg::{other}::z.jpg", _png((0, 250, 0))),
        ("a#offset=0&size=5.png", _png((0, 0, 250))),
        ("b#row=1&column=bytes.png", _png((250, 250, 0))),
        ("dup.png", _png((0, 250, 250))),
        ("dup.png", _png((250, 0, 250))),  # same name, other bytes
        ("plain.png", _png((120, 120, 120))),
        ("plain.json", b'{"caption": "WebDataset metadata, not a pool item"}'),
    ]
    shard = root / "shards" / "shard-000.tar"
    shard.parent.mkdir()
    _tar(shard, members)
    return shard, other, members


def test_tar_members_read_back_their_own_bytes_with_unique_ids(tricky_tar, tmp_path):
    shard, other, members = tricky_tar
    root = str(tmp_path / "cat")
    run_stage("ingest", root, IngestConfig(source=str(shard)))
    rows = _pool(root)
    images = [(name, data) for name, data in members if not name.endswith(".json")]
    assert len(rows) == len(images) and len({r["image_id"] for r in rows}) == len(rows)
    assert all(r["status"] == "ok" and r["image_id"] == image_id(r["uri"]) for r in rows)
    assert sorted(r["sha256"] for r in rows) == sorted(_sha(data) for _, data in images)
    for row in rows:
        assert _sha(read_image_bytes(row["uri"])) == row["sha256"], row["uri"]
    with tarfile.open(other) as tar:
        elsewhere = _sha(tar.extractfile("z.jpg").read())
    assert elsewhere not in {r["sha256"] for r in rows}  # nothing was read from the other tar


def test_embed_over_tricky_names_runs_and_reruns(tricky_tar, tmp_path):
    shard, _, _ = tricky_tar
    root = str(tmp_path / "cat")
    run_stage("ingest", root, IngestConfig(source=str(shard)))
    for _ in range(2):
        done = run_cli(["embed", "--catalog", root, "--set", *TINY_EMBED])
        assert done.returncode == 0, done.stderr[-3000:]
    n = query(root, "SELECT count(DISTINCT image_id) AS n FROM embeddings").column(0)[0].as_py()
    assert n == len(_pool(root))


def test_files_named_like_uri_syntax_read_back(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    names = ["x#offset=0&size=3.png", "y::z.png", "w%41.png", "v#row=0&column=bytes.png", "u#.png", "t#dup=2.png"]
    written = {}
    for i, name in enumerate(names):
        data = _png((i * 40, 255 - i * 40, 7))
        (folder / name).write_bytes(data)
        written[name] = _sha(data)
    root = str(tmp_path / "cat")
    run_stage("ingest", root, IngestConfig(source=str(folder)))
    rows = _pool(root)
    assert len(rows) == len(names) and len({r["image_id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["status"] == "ok"
        assert _sha(read_image_bytes(row["uri"])) == row["sha256"]
    assert sorted(r["sha256"] for r in rows) == sorted(written.values())


def test_repeated_uris_in_a_list_get_distinct_ids_across_units(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_png((1, 2, 3)))
    b.write_bytes(_png((3, 2, 1)))
    listing = [str(a), str(b), str(a), str(a), str(b)]
    source = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": listing}), source)
    root = str(tmp_path / "cat")
    run_stage("ingest", root, IngestConfig(source=str(source), files_per_unit=2))  # the repeats fall in other units
    rows = _pool(root)
    assert len(rows) == len(listing) and len({r["image_id"] for r in rows}) == len(listing)
    uris = sorted(r["uri"] for r in rows)
    assert uris == sorted([str(a), str(b), f"{a}#dup=2", f"{a}#dup=3", f"{b}#dup=2"])
    for row in rows:
        assert read_image_bytes(row["uri"]) == (a if row["uri"].startswith(str(a)) else b).read_bytes()
    # a rerun: the plan (with its repeats) is the same
    run_stage("ingest", root, IngestConfig(source=str(source), files_per_unit=2))
    assert _pool(root) == rows


def test_error_messages_never_quote_file_content(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    (folder / "shadow.jpg").write_text("root:$6$supersecrethash:19000:0:99999:7:::\n")
    (folder / "notes").write_text("api_key=topsecretvalue\n")
    (folder / "page.png").write_text("<html><body>password: hunter2secret</body></html>")
    root = str(tmp_path / "cat")
    run_stage("ingest", root, IngestConfig(source=str(folder)))
    errors = query(root, "SELECT uri, reason, message FROM errors ORDER BY uri").to_pylist()
    assert [e["reason"] for e in errors] == ["text_file", "html_page", "text_file"]
    for secret in ("supersecrethash", "topsecretvalue", "hunter2secret"):
        assert not any(secret in e["message"] for e in errors)
    assert all("bytes" in e["message"] for e in errors)  # still says what the file is


def test_legacy_chained_tar_uris_read_from_the_tar_they_name_last(tricky_tar):
    shard, other, members = tricky_tar
    name, data = members[0]
    assert read_image_bytes(f"tar://{name}::{shard}") == data
    with tarfile.open(other) as tar:
        assert read_image_bytes(f"tar://z.jpg::{other}") == tar.extractfile("z.jpg").read()


@pytest.mark.parametrize("fragment", ["#offset=0&size=zz", "#offset=-1&size=3", "#offset=0", "#row=x&column=bytes",
                                      "#offset=0&size=999999"])
def test_malformed_or_impossible_fragments_are_uri_errors(tricky_tar, fragment):
    shard, _, _ = tricky_tar
    with pytest.raises(URIError, match=str(shard)):
        read_image_bytes(f"{shard}{fragment}")
