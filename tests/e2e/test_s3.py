"""The whole pipeline against a real S3-compatible server (moto in server mode on loopback).

Pool, catalog, ledger, checkpoints, reports and the retrieval index all live in one bucket; the
``curate`` commands and their Ray workers find the server through the standard ``AWS_ENDPOINT_URL``
variable, exactly as they would find a real object store. Ray workers take their environment from the
Ray that starts them, so this module runs on a Ray of its own, started after the variables are set.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog.array_store import CatalogArrayStore
from catalog.ledger import Ledger
from catalog.paths import S3_RETRIES, resolve
from catalog.shards import shard_urls, write_shards
from catalog.sql import SQLError, query
from catalog.tables import list_tables
from tests.helpers import run_cli, s3_server
from tests.sql_helpers import documented_queries, write_doc_catalog

pytestmark = pytest.mark.slow

BUCKET = "curate-test"
POOL = f"s3://{BUCKET}/pool"
CAT = f"s3://{BUCKET}/cat"
N = 200
TARGET = 50
SETTINGS = ["embed.model=vit_test", "embed.random_init=true", "embed.image_size=32", "cluster.n_levels=2", "cluster.resampling_steps=2"]


def _upload(fs, local: str, remote: str) -> list[str]:
    """Put every regular file under ``local`` to ``remote``; dangling links cannot be uploaded."""
    keys = []
    for dirpath, _, names in os.walk(local):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            if os.path.exists(path):
                key = f"{remote}/{os.path.relpath(path, local)}"
                fs.put_file(path, key)
                keys.append(key)
    return keys


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server for this module only, and a Ray started after its variables are set; yields s3fs."""
    import ray

    ray.shutdown()  # the session's Ray (if any) has workers without these variables
    with s3_server(BUCKET) as fs:
        try:
            yield fs
        finally:
            ray.shutdown()


def test_s3_clients_retry_adaptively(s3):
    fs, _ = resolve(f"s3://{BUCKET}")
    fs.ls(BUCKET)
    assert fs.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 10} == S3_RETRIES


def test_catalog_sees_what_other_processes_wrote(s3):
    """s3fs caches listings per process; shards, markers and checkpoints written by another process
    (a Ray worker, another host: here a second, uncached client) must show up anyway."""
    import s3fs

    root = f"s3://{BUCKET}/fresh"
    rows = pa.table({"image_id": pa.array([1, 2], pa.int64())})
    write_shards(root, "t", "a", rows)
    Ledger(root, "st").mark("u1")
    store = CatalogArrayStore(root, "c")
    assert store.get("k") is None and not Ledger(root, "st").is_complete()
    assert len(shard_urls(root, "t")) == 1 and set(Ledger(root, "st").done()) == {"u1"} and list_tables(root) == ["t"]
    assert query(root, "SELECT count(*) FROM t").column(0)[0].as_py() == 2

    other = s3fs.S3FileSystem(skip_instance_cache=True)
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink)
    for key in ("t/b-00000.parquet", "u/c-00000.parquet"):
        other.pipe_file(f"{BUCKET}/fresh/{key}", sink.getvalue().to_pybytes())
    other.pipe_file(f"{BUCKET}/fresh/_ledger/st/u2.json", b'{"rows": 2}')
    other.pipe_file(f"{BUCKET}/fresh/_ledger/st/_complete.json", b"{}")
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(3))
    other.pipe_file(f"{BUCKET}/fresh/_checkpoints/c/k.npz", buf.getvalue())

    assert [u.rsplit("/", 1)[1] for u in shard_urls(root, "t")] == ["a-00000.parquet", "b-00000.parquet"]
    assert Ledger(root, "st").done() == {"u1": {}, "u2": {"rows": 2}} and Ledger(root, "st").is_complete()
    assert list_tables(root) == ["t", "u"]
    assert query(root, "SELECT count(*) FROM t").column(0)[0].as_py() == 4
    np.testing.assert_array_equal(store.get("k")["a"], np.arange(3))



def test_sql_is_confined_to_a_bucket_catalog(s3):
    """The documented queries work on an S3 catalog; objects beside it, local files and installs do not."""
    root = f"s3://{BUCKET}/doccat"
    write_doc_catalog(root)
    s3.pipe_file(f"{BUCKET}/beside/secret.txt", b"the-secret-content")
    s3.pipe_file(f"{BUCKET}/doccat-twin/x.txt", b"the-secret-content")  # shares the catalog's name prefix
    for sql in documented_queries():
        assert query(root, sql).num_rows > 0, sql
    assert query(root, f"SELECT count(*) FROM glob('{root}/pool/*.parquet')").column(0)[0].as_py() == 1
    for probe in (f"SELECT * FROM read_text('s3://{BUCKET}/beside/secret.txt')",
                  f"SELECT * FROM read_text('s3://{BUCKET}/doccat-twin/x.txt')",
                  f"SELECT * FROM read_text('{root}/../beside/secret.txt')",
                  f"SELECT * FROM glob('s3://{BUCKET}/**')",
                  "SELECT * FROM read_text('/etc/passwd')"):
        with pytest.raises(SQLError) as err:
            query(root, probe)
        assert "the-secret-content" not in str(err.value), probe


@pytest.fixture(scope="module")
def pool(s3, tmp_path_factory) -> dict[str, str]:
    """The demo pool in the bucket; returns the kind (normal, broken…) of every uploaded URI."""
    from pipelines.demo.pool import generate_demo_pool

    local = str(tmp_path_factory.mktemp("s3demo") / "demo")
    generate_demo_pool(local, n=N, seed=0, workers=1)
    _upload(s3, os.path.join(local, "pool"), f"{BUCKET}/pool")
    _upload(s3, os.path.join(local, "seed"), f"{BUCKET}/seed")
    truth = pq.read_table(os.path.join(local, "truth", "pool.parquet")).to_pylist()
    return {f"{POOL}/{r['relpath']}": r["kind"] for r in truth
            if os.path.exists(os.path.join(local, "pool", r["relpath"]))}


def _cli(*args: str):
    result = run_cli(list(args))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _objects(fs, prefix: str) -> dict[str, str]:
    """Key → ETag of every object under a prefix, read fresh from the server."""
    fs.invalidate_cache()
    return {path: info["ETag"] for path, info in fs.find(f"{BUCKET}/{prefix}", detail=True).items()}


@pytest.fixture(scope="module")
def built(s3, pool) -> dict[str, str]:
    """ingest then build-lvd, both through the CLI with every path in the bucket; returns build-lvd's stdout."""
    _cli("ingest", POOL, "--catalog", CAT)
    out = _cli("build-lvd", "--catalog", CAT, "--target-size", str(TARGET), "--set", *SETTINGS)
    return {"build": out.stdout}


def test_ingest_from_bucket_records_every_object(s3, pool, built):
    rows = query(CAT, "SELECT uri, status FROM pool").to_pylist()
    assert {r["uri"] for r in rows} == set(pool)
    errors = set(query(CAT, "SELECT uri FROM errors").column(0).to_pylist())
    broken = {u for u, kind in pool.items() if kind == "broken"}
    assert errors == broken and {r["uri"] for r in rows if r["status"] == "error"} == broken
    assert s3.exists(f"{BUCKET}/cat/_ledger/ingest/_complete.json")


def test_build_lvd_writes_everything_into_the_bucket(s3, pool, built):
    curated = query(CAT, "SELECT image_id, uri FROM curated_lvd").to_pylist()
    assert len(curated) == TARGET and len({r["image_id"] for r in curated}) == TARGET
    assert all(pool[r["uri"]] != "broken" for r in curated)
    for name in ("cluster_sizes", "contact_sheet_pool", "contact_sheet_curated"):
        assert s3.info(f"{BUCKET}/cat/reports/lvd/{name}.png")["size"] > 1000
    checkpoints = _objects(s3, "cat/_checkpoints/cluster")
    assert checkpoints and all(k.endswith(".npz") for k in checkpoints)
    for stage in ("ingest", "embed", "dedup", "cluster"):
        assert s3.exists(f"{BUCKET}/cat/_ledger/{stage}/_complete.json"), stage
    embedded = query(CAT, "SELECT count(*) FROM embeddings").column(0)[0].as_py()
    ok = sum(kind != "broken" for kind in pool.values())
    assert embedded == ok
    assert _objects(s3, "cat/_manifests")


def test_sql_cli_reads_the_catalog_from_the_bucket(pool, built):
    out = _cli("sql", "SELECT status, count(*) AS n FROM pool GROUP BY 1 ORDER BY 1", "--catalog", CAT,
               "--format", "csv").stdout
    broken = sum(kind == "broken" for kind in pool.values())
    lines = out.strip().splitlines()
    assert lines[0].replace('"', "") == "status,n"
    counts = {line.split(",")[0].strip('"'): int(line.split(",")[1]) for line in lines[1:]}
    assert counts == {"error": broken, "ok": len(pool) - broken}


def test_rerun_of_build_lvd_redoes_no_stage(s3, built):
    stable = ("embeddings", "clusters", "centroids", "duplicates", "pool", "errors", "_checkpoints", "curated",
              "reports", "_ledger/ingest", "_ledger/embed", "_ledger/dedup", "_ledger/cluster", "_ledger/sample-lvd")
    before = {p: _objects(s3, f"cat/{p}") for p in stable}
    curated_before = sorted(query(CAT, "SELECT image_id FROM curated_lvd").column(0).to_pylist())
    log = _cli("build-lvd", "--catalog", CAT, "--target-size", str(TARGET), "--set", *SETTINGS).stderr
    assert len(re.findall(r"\(already done\)", log)) == 4, log  # embed, dedup, cluster, sample
    assert {p: _objects(s3, f"cat/{p}") for p in stable} == before
    assert sorted(query(CAT, "SELECT image_id FROM curated_lvd").column(0).to_pylist()) == curated_before


def test_knn_retrieve_saves_its_index_in_the_bucket(s3, built):
    out = _cli("retrieve", "--catalog", CAT, "--seed", f"s3://{BUCKET}/seed", "--mode", "knn", "--k", "2").stdout
    assert "knn mode" in out
    index = _objects(s3, "cat/_index")
    assert len(index) == 1 and re.search(r"/_index/pool-[0-9a-f]{16}\.faiss$", next(iter(index)))
    rows = query(CAT, "SELECT seed, count(*) AS n FROM retrieved GROUP BY 1").to_pylist()
    name = rows[0]["seed"] if rows else ""
    assert name.startswith("seed-") and rows[0]["n"] > 0  # a path seed is named folder-<hash of the path>
    assert s3.info(f"{BUCKET}/cat/reports/retrieve/{name}.png")["size"] > 1000
    # a second run loads the saved index instead of building a new one
    _cli("retrieve", "--catalog", CAT, "--seed", f"s3://{BUCKET}/seed", "--mode", "knn", "--k", "2")
    assert _objects(s3, "cat/_index") == index
