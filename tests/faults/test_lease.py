"""The writer lease: one writer per run of a catalog. A second identical ``curate embed`` (or one with
``--overwrite`` and another ``image_size``) is refused with the holder named while the first writes, and
the table ends with no duplicates and one preprocessing; a stale lease (its process gone on this host, or
its heartbeat older than the timeout) is taken over; a writer whose lease was taken stops; the same on an
S3 object store (conditional create).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from catalog import lease
from catalog.decode import Preprocess
from catalog.embeddings import EmbeddingIdentity, load_embeddings
from catalog.paths import create_exclusive
from catalog.sql import query
from pipelines.stage import run_stage
from pipelines.stages.ingest import IngestConfig
from tests.faults.conftest import demo_subset
from tests.helpers import cli_env, kill_tree, run_cli, s3_server

TINY = ["model=vit_test", "random_init=true", "image_size=32", "images_per_unit=20", "batch_size=10"]


def _plant_lease(root: str, run: str, *, host: str, pid: int, pid_started: float, heartbeat: float) -> None:
    """A lease object as another writer would have left it (generation 0)."""
    body = {"run": run, "host": host, "pid": pid, "pid_started": pid_started, "started": heartbeat,
            "heartbeat": heartbeat, "timeout_s": lease.TIMEOUT_S, "token": "theirs"}
    assert create_exclusive(f"{root}/{lease.LEASES_DIR}/{run}/{0:010d}.json", json.dumps(body).encode())


def _dead_process() -> psutil.Process:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    info = psutil.Process(proc.pid)
    info.create_time()  # cached while it lives
    proc.wait()
    return info


@pytest.fixture(scope="module")
def small_catalog(demo_pool, tmp_path_factory) -> str:
    """120 demo images ingested: small enough that a whole embed is quick."""
    src = demo_subset(demo_pool, str(tmp_path_factory.mktemp("lease_pool")), 120)
    root = str(tmp_path_factory.mktemp("lease") / "cat")
    run_stage("ingest", root, IngestConfig(source=src))
    return root


@pytest.mark.slow
def test_a_second_embed_is_refused_naming_the_first_and_the_table_has_no_duplicates(small_catalog, tmp_path):
    root = shutil.copytree(small_catalog, str(tmp_path / "cat"))
    first = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "embed", "--catalog", root, "--set", *TINY],
                             env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not glob.glob(os.path.join(root, lease.LEASES_DIR, "embed", "*.json")):
            assert first.poll() is None and time.time() < deadline, "the first embed never took its lease"
            time.sleep(0.05)
        for args in (TINY, [*TINY[:1], "image_size=28", *TINY[2:]]):
            overwrite = ["--overwrite"] if "image_size=28" in args else []
            second = run_cli(["embed", "--catalog", root, *overwrite, "--set", *args])
            assert second.returncode == 2 and f"pid {first.pid} on host {os.uname().nodename}" in second.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    finally:
        kill_tree(first.pid)
    ids, _ = load_embeddings(root)
    ok = query(root, "SELECT image_id FROM pool WHERE status = 'ok'").column(0).to_pylist()
    assert sorted(ids.tolist()) == sorted(ok)  # every image once: no duplicates, none lost
    assert EmbeddingIdentity.of_table(root).preprocess == Preprocess(size=32).fingerprint()  # the first's only
    assert not glob.glob(os.path.join(root, lease.LEASES_DIR, "embed", "*.json"))  # released


def test_a_lease_whose_process_is_gone_is_taken_over_by_the_next_run(small_catalog, tmp_path, caplog):
    root = shutil.copytree(small_catalog, str(tmp_path / "cat"), ignore=shutil.ignore_patterns("_ledger"))
    dead = _dead_process()
    _plant_lease(root, "ingest", host=os.uname().nodename, pid=dead.pid, pid_started=dead.create_time(),
                 heartbeat=time.time())
    source = query(root, "SELECT uri FROM pool LIMIT 1").column(0)[0].as_py().rsplit("/", 1)[0]
    with caplog.at_level(logging.INFO, logger="curate.catalog"):
        result = run_stage("ingest", root, IngestConfig(source=source))
    assert result.summary["in"] == 120
    assert f"took over the lease of pid {dead.pid}" in caplog.text and "is gone" in caplog.text
    assert lease.current(root, "ingest") is None  # released at the end


def test_another_hosts_lease_is_refused_while_fresh_and_taken_over_once_stale(tmp_path):
    root = str(tmp_path / "cat")
    _plant_lease(root, "embed", host="elsewhere", pid=os.getpid(), pid_started=0.0, heartbeat=time.time())
    with pytest.raises(lease.LeaseHeldError, match=f"pid {os.getpid()} on host elsewhere"):
        lease.acquire(root, "embed")
    old = time.time() - lease.TIMEOUT_S - 60
    shutil.rmtree(os.path.join(root, lease.LEASES_DIR))
    _plant_lease(root, "embed", host="elsewhere", pid=1, pid_started=0.0, heartbeat=old)
    taken = lease.acquire(root, "embed")
    assert taken.generation == 1 and lease.current(root, "embed").token == taken.token


def test_a_writer_whose_lease_was_taken_over_stops(tmp_path):
    root = str(tmp_path / "cat")
    mine = lease.acquire(root, "embed", timeout_s=0.0)  # stale at once: anyone may take it
    time.sleep(0.01)
    theirs = lease.acquire(root, "embed")
    with pytest.raises(lease.LeaseLostError, match="taken over"):
        mine.check()
    theirs.check()
    lease.release(theirs)
    assert lease.current(root, "embed") is None


def test_lease_on_an_s3_store(tmp_path):
    with s3_server("leases") as fs:
        root = "s3://leases/cat"
        assert create_exclusive(f"{root}/probe", b"a") and not create_exclusive(f"{root}/probe", b"b")
        assert fs.cat_file("leases/cat/probe") == b"a"  # the conditional put kept the first
        with lease.hold(root, "embed", heartbeat_s=0.05) as held:
            with pytest.raises(lease.LeaseHeldError, match=f"pid {os.getpid()}"):
                lease.acquire(root, "embed")
            time.sleep(0.2)  # a few heartbeats
            assert lease.current(root, "embed").heartbeat > lease.current(root, "embed").started
            held.check()
        assert lease.current(root, "embed") is None
        _plant_lease(root, "cluster", host="elsewhere", pid=1, pid_started=0.0, heartbeat=time.time() - 10**4)
        taken = lease.acquire(root, "cluster")
        assert taken.generation == 1 and lease.current(root, "cluster").token == taken.token
