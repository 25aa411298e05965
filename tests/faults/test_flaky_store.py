"""An object store that throttles (503 ``SlowDown``), drops connections and stalls past the client's
read timeout: every request is retried (botocore's adaptive retries, then ours), so ``curate ingest``
into an S3 catalog behind a flaky proxy ends with exactly the tables of a run against a healthy disk."""

from __future__ import annotations

import os

import pytest

from catalog.sql import query
from tests.faults.conftest import demo_subset
from tests.faults.flaky_proxy import flaky_proxy
from tests.helpers import run_cli, s3_server

POOL_COLUMNS = "image_id, uri, bytes, width, height, format, sha256, status"


@pytest.fixture(scope="module")
def source(demo_pool, tmp_path_factory) -> str:
    return demo_subset(demo_pool, str(tmp_path_factory.mktemp("flaky_pool")), 40)


@pytest.mark.slow
def test_ingest_through_a_throttling_store_equals_a_healthy_run(source, tmp_path, monkeypatch):
    import fsspec
    import s3fs

    args = ["ingest", source, "--set", "files_per_unit=20", "--executor", "local"]
    reference = str(tmp_path / "reference")
    assert run_cli([*args, "--catalog", reference]).returncode == 0
    with s3_server("flaky") as _, flaky_proxy(os.environ["AWS_ENDPOINT_URL"], seed=3, throttle=0.15, drop=0.05,
                                              stall=0.03, stall_s=3.0) as (url, counts):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        # a stalled request is given up after 1 s and retried (botocore's default read timeout is 60 s);
        # users set the same through fsspec's config, e.g. FSSPEC_S3='{"config_kwargs": {"read_timeout": 5}}'
        monkeypatch.setitem(fsspec.config.conf["s3"]["config_kwargs"], "read_timeout", 1)
        s3fs.S3FileSystem.clear_instance_cache()
        root = "s3://flaky/cat"
        result = run_cli([*args, "--catalog", root])
        assert result.returncode == 0, result.stderr
        assert counts.throttled > 0 and counts.dropped > 0 and counts.stalled > 0 and counts.passed > 0
        for sql in (f"SELECT {POOL_COLUMNS} FROM pool ORDER BY image_id",
                    "SELECT image_id, uri, reason FROM errors ORDER BY image_id"):
            assert query(root, sql).to_pylist() == query(reference, sql).to_pylist()
        s3fs.S3FileSystem.clear_instance_cache()
