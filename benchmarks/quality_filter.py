"""Quality signals and the filter on the demo pool with planted low-quality images.

1. Cost: per image, ingest's own work (read, sha256, probe, draft decode, copy descriptor) and then the
   quality signals on the same decoded image, timed back to back so that a loaded machine slows both alike.
2. Accuracy: the pool through ``ingest`` and ``filter`` (the demo thresholds of tests/pipelines/test_quality.py):
   precision and recall of the removals against the planted images, per rule and overall, and the
   range of each signal among the ordinary images next to the planted ones (the margin of each threshold).

    python -m benchmarks.quality_filter --n 1500 --per-kind 6 --out docs/results/quality_filter_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import report

DEMO_FILTER = {"drop_constant": True, "min_side": 24, "max_aspect": 3.0, "min_sharpness": 6.0}
RULE_OF_KIND = {"blurred": "blurry", "constant": "constant", "tiny": "small", "extreme_aspect": "aspect"}


def _cost(files: list[str]) -> dict[str, float]:
    """Mean ms per image of ingest's per-image work and of the signals on its decode."""
    from catalog.decode import DecodeError, decode_rgb, probe_image
    from curation.copy_descriptor import SIDE, copy_descriptor
    from curation.quality import quality_signals

    base, extra, n = 0.0, 0.0, 0
    for path in files:
        t0 = time.perf_counter()
        try:
            with open(path, "rb") as f:
                data = f.read()
            hashlib.sha256(data).hexdigest()
            info = probe_image(data)
            img = decode_rgb(data, min_side=2 * SIDE)
            copy_descriptor(img)
        except (DecodeError, OSError):
            continue
        t1 = time.perf_counter()
        quality_signals(img, info.width, info.height)
        t2 = time.perf_counter()
        base, extra, n = base + t1 - t0, extra + t2 - t1, n + 1
    return {"images": n, "ingest_ms": 1000 * base / n, "signals_ms": 1000 * extra / n,
            "slowdown_pct": 100 * extra / base}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1500, help="demo pool files (planted images come on top)")
    parser.add_argument("--per-kind", type=int, default=6, help="planted images of each low-quality kind")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from catalog.sql import query
    from pipelines.demo.pool import generate_demo_pool
    from pipelines.stage import run_stage
    from pipelines.stages.filter import FilterConfig
    from pipelines.stages.ingest import IngestConfig

    work = tempfile.mkdtemp(prefix="curate-quality-")
    generate_demo_pool(work, n=args.n, seed=0, low_quality_per_kind=args.per_kind)
    pool = os.path.join(work, "pool")
    truth = pq.read_table(os.path.join(work, "truth", "pool.parquet")).to_pylist()
    kind = {os.path.join(pool, r["relpath"]): r["detail"] if r["kind"] == "low_quality" else "" for r in truth}
    cost = _cost(sorted(kind))
    root = os.path.join(work, "catalog")
    run_stage("ingest", root, IngestConfig(source=pool), executor="local")
    run_stage("filter", root, FilterConfig(**DEMO_FILTER))
    removed = {r["uri"]: r["reason"].removeprefix("filtered:")
               for r in query(root, "SELECT uri, reason FROM errors WHERE stage = 'filter'").to_pylist()}
    signals = query(root, "SELECT uri, min_side, aspect, sharpness FROM pool WHERE status = 'ok'").to_pylist()
    rows = []
    for k, rule in RULE_OF_KIND.items():
        planted = {u for u, v in kind.items() if v == k}
        by_rule = {u for u, r in removed.items() if r == rule}
        rows.append({"rule": rule, "planted": len(planted), "removed": len(by_rule),
                     "precision": len(by_rule & planted) / max(len(by_rule), 1),
                     "recall": len(by_rule & planted) / max(len(planted), 1)})
    planted_all = {u for u, v in kind.items() if v}
    hit = len(set(removed) & planted_all)
    rows.append({"rule": "all", "planted": len(planted_all), "removed": len(removed),
                 "precision": hit / max(len(removed), 1), "recall": hit / max(len(planted_all), 1)})
    margins = {}
    for column in ("min_side", "aspect", "sharpness"):
        ordinary = np.array([s[column] for s in signals if not kind[s["uri"]]], float)
        margins[column] = {"ordinary_min": float(ordinary.min()), "ordinary_max": float(ordinary.max()),
                           **{f"{k}_range": [float(min(v)), float(max(v))] for k in RULE_OF_KIND
                              if (v := [s[column] for s in signals if kind[s["uri"]] == k])}}
    report(f"quality signals: ingest cost over {cost['images']} images", [cost], None)
    report(f"filter {DEMO_FILTER} on the demo pool ({args.n} files + {len(planted_all)} planted)", rows, args.out,
           {"cost": cost, "margins": margins, "filter": DEMO_FILTER})
    for column, m in margins.items():
        print(column, {k: (round(v, 2) if isinstance(v, float) else [round(x, 2) for x in v]) for k, v in m.items()})


if __name__ == "__main__":
    main()
