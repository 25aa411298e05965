import os

import pyarrow.parquet as pq

from catalog.decode import REASONS
from catalog.shards import read_table
from catalog.sql import query
from pipelines.stages.ingest import image_id
from tests.helpers import run_cli


def _truth(demo_pool: str):
    return pq.read_table(os.path.join(demo_pool, "truth", "pool.parquet")).to_pylist()


def _uri_of(demo_pool: str, relpath: str) -> str:
    return os.path.join(demo_pool, "pool", relpath)


def test_broken_files_land_in_errors_with_distinct_reasons(demo_pool, demo_catalog):
    truth = _truth(demo_pool)
    errors = {r["uri"]: r for r in query(demo_catalog, "SELECT * FROM errors").to_pylist()}
    broken = [t for t in truth if t["kind"] == "broken"]
    assert broken
    reason_by_kind: dict[str, set[str]] = {}
    for t in broken:
        err = errors[_uri_of(demo_pool, t["relpath"])]
        assert err["stage"] == "ingest" and err["reason"] in REASONS and err["message"]
        reason_by_kind.setdefault(t["detail"], set()).add(err["reason"])
    # each broken kind maps to one reason, and the reasons tell the main kinds apart
    assert all(len(r) == 1 for r in reason_by_kind.values()), reason_by_kind
    assert len({next(iter(r)) for r in reason_by_kind.values()}) >= 7


def test_awkward_and_normal_files_are_usable(demo_pool, demo_catalog):
    truth = _truth(demo_pool)
    pool = {r["uri"]: r for r in read_table(demo_catalog, "pool").to_pylist()}
    assert len(pool) == len(truth)
    for t in truth:
        row = pool[_uri_of(demo_pool, t["relpath"])]
        assert row["image_id"] == image_id(row["uri"])
        if t["kind"] == "broken":
            assert row["status"] == "error"
        else:
            assert row["status"] == "ok", (t, row)
            assert row["width"] > 0 and row["height"] > 0 and len(row["sha256"]) == 64
    awkward = {t["detail"] for t in truth if t["kind"] == "awkward"}
    assert {"cmyk_jpeg", "png16", "exif_rotated"} <= awkward or len(awkward) >= 6


def test_rerun_of_finished_ingest_adds_nothing(demo_pool, demo_catalog, tmp_path):
    before = query(demo_catalog, "SELECT count(*) AS n FROM pool").to_pylist()
    result = run_cli(["ingest", os.path.join(demo_pool, "pool"), "--catalog", demo_catalog,
                      "--set", "files_per_unit=100"])
    assert result.returncode == 0, result.stderr
    assert "0 processed in this run" in result.stdout
    assert query(demo_catalog, "SELECT count(*) AS n FROM pool").to_pylist() == before
