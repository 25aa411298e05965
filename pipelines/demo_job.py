"""The README's main job on the bundled demo pool: generate → ingest → (later stages) → summary."""

from __future__ import annotations

import os
import time

from catalog.paths import join
from catalog.sql import query
from pipelines.ingest import ingest
from pipelines.report_text import inspect_text
from pipelines.sql_output import render

SAMPLE_QUERY = "SELECT status, count(*) AS images FROM pool GROUP BY 1 ORDER BY 1"
ERRORS_QUERY = "SELECT reason, count(*) AS files FROM errors GROUP BY 1 ORDER BY 2 DESC"


def _step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def ensure_demo_pool(out: str, n: int) -> str:
    """Generate the demo pool once; a finished pool is marked by its truth table."""
    from pipelines.demo_pool import generate_demo_pool

    pool_root = join(out, "demo_pool")
    if not os.path.exists(join(pool_root, "truth", "pool.parquet")):
        _step(f"generating the demo pool ({n} images) in {pool_root}")
        summary = generate_demo_pool(pool_root, n=n)
        print(", ".join(f"{k}={v}" for k, v in summary.items()))
    else:
        print(f"demo pool already in {pool_root}")
    return pool_root


def run_demo(out: str, n: int = 10_000) -> str:
    """Run every available stage on the demo pool and print where to look; returns the catalog."""
    start = time.time()
    pool_root = ensure_demo_pool(out, n)
    catalog = join(out, "catalog")
    _step("ingest")
    rows = ingest(join(pool_root, "pool"), catalog)
    print(f"pool: {rows['in']} files, {rows['out']} usable, {rows['errored']} in errors")
    _step("catalog")
    print(inspect_text(catalog))
    _step(f'curate sql "{SAMPLE_QUERY}" --catalog {catalog}')
    render(query(catalog, SAMPLE_QUERY), "table", None)
    _step(f'curate sql "{ERRORS_QUERY}" --catalog {catalog}')
    render(query(catalog, ERRORS_QUERY), "table", None)
    print(f"\ndone in {time.time() - start:.0f}s. Explore with: curate sql \"SELECT * FROM pool LIMIT 5\" "
          f"--catalog {catalog}")
    return catalog
