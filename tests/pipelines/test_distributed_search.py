"""Dedup's copy graph and retrieval's k-NN search on two Ray nodes give what one process gives.

The cluster is two ``ray start`` processes on loopback (a head and a node joining it), every port our
own, stopped by PID at the end; the two-worker runs happen in a driver process joined to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pytest

from catalog import schemas
from catalog.embeddings import embeddings_table
from catalog.shards import write_shards
from catalog.sql import query
from pipelines.seeds import SeedsConfig, SeedSpec
from pipelines.stage import run_stage
from pipelines.stages.dedup import DedupConfig
from pipelines.stages.retrieve import RetrieveConfig
from tests.helpers import REPO, cli_env, free_ports, kill_marked

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
IDENTITY = {"model": "m", "weights_sha256": "0" * 64, "preprocess": "p", "pooling": "cls", "normalized": "true"}
N, COPIES, N_SEED, DIM = 1_500, 60, 200, 64
DEDUP = {"descriptor": "embeddings", "query_block": 256}  # 6 blocks: both workers get some
RETRIEVE = {"seed_set": "s", "mode": "knn", "query_block": 64}


def _unit(rng: np.random.Generator, rows: int) -> np.ndarray:
    x = rng.normal(size=(rows, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _near(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    return _unit(rng, len(x)) * np.float16(0.05) + x


def _catalog(root: str) -> None:
    """N random unit vectors and COPIES near copies of the first ones, a pool row each."""
    rng = np.random.default_rng(0)
    base = _unit(rng, N)
    x = np.concatenate([base, _near(rng, base[:COPIES])]).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    ids = rng.permutation(len(x)).astype(np.int64) + 1_000
    n = len(ids)
    pool = {"image_id": ids, "uri": [f"{i}.jpg" for i in ids], "width": pa.array(rng.integers(50, 90, n), pa.int32()),
            "height": pa.array(np.full(n, 64), pa.int32()), "sha256": [f"{i:064x}" for i in ids],
            "status": ["ok"] * n}
    pool |= {f.name: pa.nulls(n, f.type) for f in schemas.POOL if f.name not in pool}
    write_shards(root, "pool", "ingest=t", pa.table(pool, schema=schemas.stamp(schemas.POOL, "pool")))
    write_shards(root, "embeddings", "embed=t", embeddings_table(ids, x, IDENTITY), max_rows=700)


def _seed_catalog(root: str, pool: str) -> None:
    rng = np.random.default_rng(1)
    x = query(pool, "SELECT embedding FROM embeddings ORDER BY image_id LIMIT 200").column(0).to_pylist()
    near = _near(rng, np.asarray(x, np.float16)).astype(np.float32)
    near = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float16)
    write_shards(root, "embeddings", "embed=t", embeddings_table(np.arange(N_SEED, dtype=np.int64), near, IDENTITY))


def _start_node(args: list[str], env: dict[str, str], marks: list[str]) -> None:
    """``ray start ARGS``; a loaded machine can miss Ray's fixed 30 s raylet deadline: then once more."""
    for attempt in range(2):
        done = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=240)
        if done.returncode == 0:
            return
        if "timed out during startup" not in done.stdout + done.stderr or attempt:
            raise AssertionError(f"ray start failed:\n{done.stdout}\n{done.stderr}")
        kill_marked(marks)


@pytest.fixture(scope="module")
def two_nodes():
    """The GCS address of a head (1 CPU) and a second node (1 CPU) joined to it."""
    temp_dir = tempfile.mkdtemp(prefix="curate-ray2-", dir="/tmp")  # Ray's socket paths must fit 107 bytes
    gcs, client, dash, *ports = free_ports(15)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("CURATE_RAY_ADDRESS", None)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", "80000000",
              "--disable-usage-stats", "--temp-dir", temp_dir]

    def node_ports(p: list[int]) -> list[str]:
        names = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
        return [x for name, port in zip(names, p) for x in (name, str(port))]

    marks = [temp_dir, f"127.0.0.1:{gcs}"]
    try:
        _start_node(["--head", "--port", str(gcs), "--ray-client-server-port", str(client), "--include-dashboard",
                     "false", "--dashboard-port", str(dash), *node_ports(ports[:6]), *common], env, marks)
        _start_node(["--address", f"127.0.0.1:{gcs}", *node_ports(ports[6:12]), *common], env, marks)
        yield f"127.0.0.1:{gcs}", env
    finally:
        kill_marked(marks)
        shutil.rmtree(temp_dir, ignore_errors=True)


DRIVER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from pipelines.seeds import SeedSpec, SeedsConfig
from pipelines.stage import run_stage
from pipelines.stages.dedup import DedupConfig
from pipelines.stages.retrieve import RetrieveConfig
root, seed, address = sys.argv[1:]
run_stage("dedup", root, DedupConfig(**{dedup}, workers=2), executor="local", address=address)
run_stage("retrieve", root, RetrieveConfig(**{retrieve}, workers=2, seeds=SeedsConfig({{"s": SeedSpec(embeddings=seed)}})),
          executor="local", address=address)
"""


def _table(root: str, table: str, order: str) -> list[dict]:
    return query(root, f"SELECT * FROM {table} ORDER BY {order}").to_pylist()


@pytest.mark.slow
def test_two_workers_on_two_nodes_equal_one_process(two_nodes, tmp_path):
    address, env = two_nodes
    one, two, seed = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "seed")
    _catalog(one)
    shutil.copytree(one, two)
    _seed_catalog(seed, one)
    seeds = SeedsConfig({"s": SeedSpec(embeddings=seed)})
    run_stage("dedup", one, DedupConfig(**DEDUP), executor="local")
    run_stage("retrieve", one, RetrieveConfig(**RETRIEVE, seeds=seeds), executor="local")

    started = time.monotonic()
    driver = subprocess.run([sys.executable, "-c", DRIVER.format(dedup=DEDUP, retrieve=RETRIEVE), two, seed, address],
                            env={**cli_env(), **env, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    assert driver.stderr.count("Ray workers on 2 node(s)") == 2, driver.stderr[-3000:]  # dedup's and retrieve's

    removed = _table(one, "duplicates", "image_id")
    assert COPIES * 0.9 <= len(removed) <= COPIES * 1.2  # the planted copies (one of each pair) and little else
    assert _table(two, "duplicates", "image_id") == removed
    retrieved = _table(one, "retrieved", "image_id")
    assert len(retrieved) >= N_SEED  # each seed's own near row, and more
    assert _table(two, "retrieved", "image_id") == retrieved
    print(f"two-worker driver: {time.monotonic() - started:.1f} s")
