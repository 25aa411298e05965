"""Ingest rate on the demo pool, and DuckDB GROUP BY over a synthetic 10M-row clusters table.

    python benchmarks/catalog_io.py --n 10000 --rows 10000000 --out bench_out/catalog_io.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import report  # noqa: E402
from catalog import schemas  # noqa: E402
from catalog.shards import write_shards  # noqa: E402
from catalog.sql import query  # noqa: E402


def bench_ingest(work: str, n: int) -> dict:
    from catalog.ray_runtime import ensure_ray
    from pipelines.demo.pool import generate_demo_pool
    from pipelines.stage import run_stage

    pool = os.path.join(work, "pool_root")
    t0 = time.time()
    generate_demo_pool(pool, n=n)
    gen = time.time() - t0
    ensure_ray()  # start Ray outside the timed region: it is paid once per process
    t0 = time.time()
    rows = run_stage("ingest", os.path.join(work, "cat"), {"source": os.path.join(pool, "pool")},
                     executor="ray").summary
    wall = time.time() - t0
    return {"what": "ingest demo pool", "files": rows["in"], "seconds": wall, "files_per_s": rows["in"] / wall,
            "demo_pool_generation_s": gen}


def bench_group_by(work: str, n_rows: int) -> list[dict]:
    root = os.path.join(work, "clusters_cat")
    rng = np.random.default_rng(0)
    per_shard = 1_000_000
    ks = [1_000_000, 100_000, 10_000, 1_000, 100]
    t0 = time.time()
    for s, start in enumerate(range(0, n_rows, per_shard)):
        m = min(per_shard, n_rows - start)
        l1 = rng.integers(0, ks[0], m)
        cols = {"image_id": np.arange(start, start + m, dtype=np.int64)}
        for i, k in enumerate(ks):
            cols[f"l{i + 1}"] = (l1 * k // ks[0]).astype(np.int64)
        cols["distance"] = rng.random(m, dtype=np.float32)
        write_shards(root, "clusters", f"s{s:04d}", pa.table(cols, schema=schemas.stamp(schemas.clusters(5), "clusters")),
                     max_rows=per_shard)
    write_s = time.time() - t0
    rows = []
    for sql in ("SELECT l5, count(*) FROM clusters GROUP BY l5",
                "SELECT l3, count(*), avg(distance) FROM clusters GROUP BY l3",
                "SELECT l1, count(*) FROM clusters GROUP BY l1"):
        query(root, "SELECT count(*) FROM clusters")  # warm the file cache
        t0 = time.time()
        out = query(root, sql)
        wall = time.time() - t0
        rows.append({"what": sql, "rows": n_rows, "groups": out.num_rows, "seconds": wall, "rows_per_s": n_rows / wall})
    rows.append({"what": "write synthetic clusters table", "rows": n_rows, "groups": None, "seconds": write_s,
                 "rows_per_s": n_rows / write_s})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="demo pool images")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the synthetic clusters table")
    p.add_argument("--out")
    args = p.parse_args()
    os.environ.setdefault("CURATE_PROGRESS", "0")
    with tempfile.TemporaryDirectory() as work:
        ingest_row = bench_ingest(work, args.n)
        report("ingest", [ingest_row], None)
        sql_rows = bench_group_by(work, args.rows)
        report("DuckDB over a synthetic clusters table", sql_rows, args.out, {"ingest": ingest_row})


if __name__ == "__main__":
    main()
