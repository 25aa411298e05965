"""The README's main job: the bundled demo pool through ``curate build-lvd``, and where to look."""

from __future__ import annotations

import os
import time

from catalog.config import load_config
from catalog.paths import join
from catalog.sql import query
from pipelines.build_lvd import BuildLVDConfig, build_lvd
from pipelines.cli.report_text import inspect_text
from pipelines.cli.sql_output import render
from pipelines.demo.backbone import DEMO_BACKBONE, DEMO_SETTINGS

__all__ = ["DEMO_BACKBONE", "DEMO_SETTINGS", "ensure_demo_pool", "run_demo"]  # the backbone's names, kept here too

QUERIES = [
    "SELECT status, count(*) AS images FROM pool GROUP BY 1 ORDER BY 1",
    "SELECT reason, count(*) AS files FROM errors GROUP BY 1 ORDER BY 2 DESC",
    "SELECT reason, count(*) AS removed FROM duplicates GROUP BY 1",
    "SELECT k.l5 AS top_cluster, count(*) AS pool, count(c.image_id) AS curated FROM clusters k "
    "LEFT JOIN curated_lvd c USING (image_id) GROUP BY 1 ORDER BY 2 DESC LIMIT 8",
]


def _step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def ensure_demo_pool(out: str, n: int) -> str:
    """Generate the demo pool once; a finished pool is marked by its truth table."""
    from pipelines.demo.pool import generate_demo_pool

    pool_root = join(out, "demo_pool")
    if not os.path.exists(join(pool_root, "truth", "pool.parquet")):
        _step(f"generating the demo pool ({n} images) in {pool_root}")
        summary = generate_demo_pool(pool_root, n=n)
        print(", ".join(f"{k}={v}" for k, v in summary.items()))
    else:
        print(f"demo pool already in {pool_root}")
    return pool_root


def run_demo(out: str, n: int = 10_000, target_fraction: float = 0.3) -> str:
    """Run build-lvd on the demo pool and print what came out; returns the catalog root."""
    start = time.time()
    pool_root = ensure_demo_pool(out, n)
    catalog = join(out, "catalog")
    config = load_config(BuildLVDConfig, None, [*DEMO_SETTINGS, f"sample.target_size={int(n * target_fraction)}"])
    result = build_lvd(catalog, config, source=join(pool_root, "pool"))
    _step("catalog")
    print(inspect_text(catalog))
    for sql in QUERIES:
        _step(f'curate sql "{sql}" --catalog {catalog}')
        render(query(catalog, sql), "table", None)
    _step("report")
    for url in result["sample"].summary.get("report", []):
        print(url)
    print(f"\ndone in {time.time() - start:.0f}s. Ground truth for checking lives in {pool_root}/truth "
          f"(no stage reads it). Explore: curate sql \"SELECT * FROM curated_lvd LIMIT 5\" --catalog {catalog}")
    return catalog
