"""A growing pool: ``build-lvd`` updating a catalog after the folder gained ``--grow`` (10 %) new images,
against ``build-lvd`` from scratch on the final folder; per-stage wall time from the run manifests, and how
much of the curated set the update kept.

    python -m benchmarks.incremental --n 1000 --grow 0.1 --out docs/results/incremental.json

Both runs use the demo job's settings (the shipped demo backbone) in this process; the pool is the demo
pool (`pipelines.demo.pool`). The base catalog is built first, untimed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import report


def _copy(pool: str, src: str, rels: list[str]) -> None:
    for rel in rels:
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        shutil.copy2(os.path.join(pool, rel), os.path.join(src, rel), follow_symlinks=False)


def _timed_build(root: str, source: str, settings: list[str]) -> tuple[float, dict[str, float], dict]:
    """Wall time of one build-lvd, each stage's wall time from this run's manifests, and the results."""
    from catalog.config import load_config
    from catalog.manifest import list_manifests
    from pipelines.build_lvd import BuildLVDConfig, build_lvd

    seen = len(list_manifests(root)) if os.path.exists(root) else 0  # oldest first: this run's come after
    start = time.perf_counter()
    results = build_lvd(root, load_config(BuildLVDConfig, None, settings), source=source)
    wall = time.perf_counter() - start
    stages = {m["stage"]: m["wall_seconds"] for m in list_manifests(root)[seen:]}
    return wall, stages, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="files in the final pool")
    parser.add_argument("--grow", type=float, default=0.1, help="share of the final pool the update adds")
    parser.add_argument("--target-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    from catalog.sql import query
    from pipelines.demo.job import DEMO_SETTINGS
    from pipelines.demo.pool import generate_demo_pool

    work = tempfile.mkdtemp(prefix="incremental-")
    generate_demo_pool(os.path.join(work, "gen"), n=args.n, seed=args.seed)
    pool = os.path.join(work, "gen", "pool")
    files = sorted(os.path.relpath(os.path.join(d, f), pool) for d, _, fs in os.walk(pool) for f in fs)
    order = np.random.default_rng(args.seed).permutation(len(files))
    n_new = int(round(len(files) * args.grow))
    src = os.path.join(work, "src")
    settings = [*DEMO_SETTINGS, f"sample.target_size={int(args.n * args.target_fraction)}"]
    _copy(pool, src, [files[i] for i in order[n_new:]])
    updated = os.path.join(work, "updated")
    _timed_build(updated, src, settings)
    before = set(query(updated, "SELECT image_id FROM curated_lvd").column(0).to_pylist())
    _copy(pool, src, [files[i] for i in order[:n_new]])
    update_wall, update_stages, results = _timed_build(updated, src, settings)
    after = set(query(updated, "SELECT image_id FROM curated_lvd").column(0).to_pylist())
    scratch_wall, scratch_stages, _ = _timed_build(os.path.join(work, "scratch"), src, settings)
    stages = list(scratch_stages)
    rows = [{"run": f"update +{n_new} files", "wall_s": update_wall, **{s: update_stages.get(s, 0.0) for s in stages}},
            {"run": f"from scratch, {len(files)} files", "wall_s": scratch_wall, **scratch_stages}]
    drift = results["cluster"].summary.get("drift", {})
    extra = {"n": len(files), "new": n_new, "kept_share": len(before & after) / max(1, len(before)),
             "drift_share": drift.get("share"), "speedup": scratch_wall / update_wall}
    report(f"build-lvd: update after +{args.grow:.0%} vs from scratch (demo pool, {len(files)} files); kept "
           f"{extra['kept_share']:.1%} of the curated set, drift {extra['drift_share']}", rows, args.out, extra)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
