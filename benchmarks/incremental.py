"""A growing pool: ``build-lvd`` updating a catalog after the folder gained ``--grow`` (10 %) new images,
against ``build-lvd`` from scratch on the final folder; per-stage wall time from the run manifests, how
much of the curated set the update kept, and the concept balance (the demo truth's normalised concept
entropy) of both curated sets.

    python -m benchmarks.incremental --n 1000 --grow 0.1 --out docs/results/incremental.json

Both runs use the demo job's settings (the shipped demo backbone) in this process; the pool is the demo
pool (`pipelines.demo.pool`). The base catalog is built first, untimed.

With ``--rows N``, the same for the embedding-level stages on N synthetic long-tailed 384-d embeddings
(`benchmarks.scale.embedding_rows`): ``curate dedup`` (``descriptor=embeddings max_removed_share=0.5``, as
the scale ladder runs it: synthetic rows have no pixels), ``curate cluster`` (defaults) and ``curate
sample`` (20 % of N, no report), each a subprocess timed from outside (wall, CPU seconds of the process
tree, peak RSS), after the catalog gained ``--grow`` of N new rows, against the same on the final rows;
then ``curate cluster --recluster`` (warm-started from the updated clustering) and ``curate sample`` on the
updated catalog, with the share of its curated set kept and the concept balance (normalised concept
entropy) of the three curated sets.

    python -m benchmarks.incremental --rows 1000000 --grow 0.1 --out docs/results/incremental_1e6_cpu.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

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


def _embedding_stages(root: str, n: int, log: Path) -> dict[str, dict[str, float]]:
    """dedup, cluster and sample as the CLI runs them on ``root``, each measured from outside."""
    from benchmarks.scale import CURATE, run_measured

    cat = ["--catalog", root]
    commands = {"dedup": [*CURATE, "dedup", *cat, "--set", "descriptor=embeddings", "max_removed_share=0.5"],
                "cluster": [*CURATE, "cluster", *cat], "sample": _sample_command(root, n)}
    return {stage: run_measured(args, log) for stage, args in commands.items()}


def _sample_command(root: str, n: int) -> list[str]:
    from benchmarks.scale import CURATE

    return [*CURATE, "sample", "--catalog", root, "--target-size", str(n // 5), "--set", "report=false"]


def _recluster(root: str, n: int, log: Path) -> dict[str, dict[str, float]]:
    """``curate cluster --recluster`` (warm-started from the clustering it replaces), then sample again."""
    from benchmarks.scale import CURATE, run_measured

    return {"cluster": run_measured([*CURATE, "cluster", "--catalog", root, "--recluster"], log),
            "sample": run_measured(_sample_command(root, n), log)}


def _curated(root: str) -> set[int]:
    from catalog.sql import query

    return set(query(root, "SELECT image_id FROM curated_lvd").column(0).to_pylist())


def _balance(selected: set[int], ids: np.ndarray, concept: np.ndarray) -> float:
    """Normalised concept entropy of a curated set (1: every concept equally often)."""
    from curation.synthetic import normalised_entropy

    picked = np.isin(ids, np.fromiter(selected, np.int64, len(selected)))
    return normalised_entropy(concept[picked], int(concept.max()) + 1)


def _file_balance(root: str, source: str, concept_of: dict[str, int]) -> float:
    """Normalised concept entropy (the demo truth) of the curated set of a catalog built from ``source``."""
    from catalog.sql import query
    from curation.synthetic import normalised_entropy

    uris = query(root, "SELECT p.uri FROM curated_lvd c JOIN pool p USING (image_id)").column(0).to_pylist()
    labels = np.array([concept_of.get(os.path.relpath(u, source), -1) for u in uris])
    return normalised_entropy(labels[labels >= 0], max(concept_of.values()) + 1)


def embeddings_update(args: argparse.Namespace) -> None:
    """The ``--rows`` benchmark: an update of the embedding-level stages against a run from scratch, and a
    warm recluster of the updated catalog against the clustering from scratch."""
    from benchmarks.scale import embedding_rows, write_embedding_rows
    from catalog.ledger import Ledger

    work = Path(tempfile.mkdtemp(prefix="incremental-rows-"))
    log = work / "commands.log"
    ids, x, sha, concept = embedding_rows(args.rows, args.seed)
    new = np.random.default_rng(args.seed).permutation(args.rows)[: int(round(args.rows * args.grow))]
    old = np.setdiff1d(np.arange(args.rows), new)
    updated, scratch = str(work / "updated"), str(work / "scratch")
    write_embedding_rows(updated, "base", ids[old], x[old], sha[old])
    _embedding_stages(updated, args.rows, log)  # the catalog before the update (untimed)
    before = _curated(updated)
    write_embedding_rows(updated, "grown", ids[new], x[new], sha[new])
    update = _embedding_stages(updated, args.rows, log)
    after = _curated(updated)
    drift = (Ledger(updated, "cluster").completion() or {}).get("summary", {}).get("drift", {})
    recluster = _recluster(updated, args.rows, log)
    reclustered = _curated(updated)
    write_embedding_rows(scratch, "all", ids, x, sha)
    fresh = _embedding_stages(scratch, args.rows, log)
    runs = ((f"update +{len(new)} rows", update), ("recluster (warm) after the update", recluster),
            (f"from scratch, {args.rows} rows", fresh))
    rows = [{"run": run, "stage": stage, **m} for run, stages in runs for stage, m in stages.items()]
    walls = [sum(m["wall_s"] for m in stages.values()) for stages in (update, fresh)]
    extra = {"pool_rows": args.rows, "new": len(new), "kept_share": len(before & after) / max(1, len(before)),
             "drift_share": drift.get("share"), "update_wall_s": walls[0], "scratch_wall_s": walls[1],
             "speedup": walls[1] / walls[0],
             "recluster_vs_scratch_cluster": recluster["cluster"]["wall_s"] / fresh["cluster"]["wall_s"],
             "recluster_kept_share": len(after & reclustered) / max(1, len(after)),
             "concept_balance": {"update": _balance(after, ids, concept),
                                 "recluster": _balance(reclustered, ids, concept),
                                 "scratch": _balance(_curated(scratch), ids, concept)}}
    report(f"dedup + cluster + sample: update after +{args.grow:.0%} vs from scratch ({args.rows:,} embeddings); "
           f"{extra['speedup']:.1f}x, kept {extra['kept_share']:.1%} of the curated set, drift "
           f"{extra['drift_share']}; warm recluster {extra['recluster_vs_scratch_cluster']:.2f}x the scratch "
           f"cluster's time, kept {extra['recluster_kept_share']:.1%}", rows, args.out, extra)
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="files in the final pool")
    parser.add_argument("--rows", type=int, help="instead: this many synthetic embeddings (no files)")
    parser.add_argument("--grow", type=float, default=0.1, help="share of the final pool the update adds")
    parser.add_argument("--target-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.rows:
        embeddings_update(args)
        return

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
    truth = pq.read_table(os.path.join(work, "gen", "truth", "pool.parquet"), columns=["relpath", "concept"])
    concept_of = dict(zip(truth.column("relpath").to_pylist(), truth.column("concept").to_pylist()))
    balance = {"update": _file_balance(updated, src, concept_of),
               "scratch": _file_balance(os.path.join(work, "scratch"), src, concept_of)}
    extra = {"n": len(files), "new": n_new, "kept_share": len(before & after) / max(1, len(before)),
             "drift_share": drift.get("share"), "speedup": scratch_wall / update_wall, "concept_balance": balance}
    report(f"build-lvd: update after +{args.grow:.0%} vs from scratch (demo pool, {len(files)} files); kept "
           f"{extra['kept_share']:.1%} of the curated set, drift {extra['drift_share']}, concept balance "
           f"{balance['update']:.3f} (update) vs {balance['scratch']:.3f} (scratch)", rows, args.out, extra)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
