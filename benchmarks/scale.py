"""The scale ladder: every stage run as a user runs it (a ``curate`` subprocess, default settings) at
growing sizes, with wall time, CPU seconds and peak RSS of the whole process tree, and the growth
exponent of each between rungs.

Rungs (``--rungs``, comma-separated ``KIND:N``; default all):

- ``emb:N`` (N = 1e4, 1e5, 1e6): a catalog of N synthetic long-tailed 384-d embeddings
  (`curation.synthetic.concept_embeddings`, float16, 1 % exact duplicates in ``pool``), then
  ``dedup`` (``descriptor=embeddings``: synthetic rows have no pixels), ``cluster``, ``sample``
  (20 %), ``retrieve`` (a 500-image seed set given as embeddings of the same identity) and ``sql``.
- ``clusters:N`` (N = 1e7): a synthetic 5-level ``clusters`` table (no embeddings), then ``sample``
  and ``sql``: the two stages whose cost is the table, not the vectors.
- ``files:N`` (N = 1e4, 1e5): the demo pool generator's files, then ``ingest``, ``embed`` (the demo
  backbone) and ``pack`` of the whole pool (a ``mix`` part ``all``, not timed).

The memory bound printed beside each embedding-level peak is point 2 of issue 17: the process's
start-up RSS (a ``curate sql "SELECT 1"`` on the same catalog) plus one float16 copy of the
embeddings and 16 bytes per row of other state.

    .venv/bin/python -m benchmarks.scale --rungs emb:1e4,emb:1e5,files:1e4 --out docs/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

from benchmarks.common import report

DIM = 384
ALL_RUNGS = "emb:1e4,emb:1e5,emb:1e6,clusters:1e7,files:1e4,files:1e5"
IDENTITY = {"model": "synthetic-384", "weights_sha256": "0" * 64, "preprocess": "none", "pooling": "none",
            "normalized": "true"}
CURATE = [os.path.join(os.path.dirname(sys.executable), "curate")]  # the console script users run
SQL = "SELECT l1, count(*) AS n, avg(distance) AS d FROM clusters GROUP BY l1 ORDER BY n DESC LIMIT 5"


def run_measured(args: list[str], log: Path) -> dict[str, float]:
    """Run one command; wall s, CPU s (user + system of every process of its tree: the larger of what
    the waited children report and what polling saw) and peak RSS of the tree (summed, polled every 0.1 s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        cpu_seen: dict[int, float] = {}
        peak = 0
        while proc.poll() is None:
            rss = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            for p in tree:
                try:
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu_seen[p.pid] = t.user + t.system
                except psutil.Error:
                    continue
            peak = max(peak, rss)
            time.sleep(0.1)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    waited = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with {proc.returncode}; see {log}")
    cpu_others = sum(v for pid, v in cpu_seen.items() if pid != proc.pid)
    return {"wall_s": wall, "cpu_s": max(waited, cpu_seen.get(proc.pid, 0.0) + cpu_others),
            "peak_rss_mb": peak / 2**20}


def _write(root: str, table: str, data: pa.Table, unit: str) -> None:
    from catalog.shards import write_shards

    write_shards(root, table, unit, data)


def embedding_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, x, sha256, concept)`` of n synthetic long-tailed pool images, 1 % of them an exact duplicate
    (the same sha256) of another."""
    from curation.synthetic import concept_embeddings

    x, concept, _ = concept_embeddings(n=n, d=DIM, n_concepts=max(50, min(5000, n // 200)),
                                       n_super=max(5, min(250, n // 4000)), seed=seed)
    rng = np.random.default_rng(seed)
    ids = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) % np.uint64(1 << 63)).astype(np.int64)
    sha = np.array([f"{i:064x}" for i in range(n)], dtype=object)
    dup = rng.choice(n, size=n // 100, replace=False)
    sha[dup] = sha[(dup + 1) % n]
    return ids, x, sha, concept


def write_embedding_rows(root: str, unit: str, ids: np.ndarray, x: np.ndarray, sha: np.ndarray) -> None:
    """Their ``pool`` rows (the image files are never written) and float16 ``embeddings``, one run each."""
    from catalog.embeddings import embeddings_table
    from catalog.schemas import EMBEDDINGS_TABLE, POOL, POOL_TABLE, stamp

    n = len(ids)
    given = ("image_id", "uri", "sha256", "status")
    nulls = {f.name: pa.nulls(n, f.type) for f in POOL if f.name not in given}  # sizes and quality unknown
    pool = pa.table({"image_id": ids, "uri": [f"{root}-images/{i}.jpg" for i in ids], **nulls, "sha256": sha,
                     "status": pa.array(["ok"] * n)}, schema=stamp(POOL, POOL_TABLE))
    _write(root, POOL_TABLE, pool, f"ingest={unit}")
    del pool
    _write(root, EMBEDDINGS_TABLE, embeddings_table(ids, x.astype(np.float16), IDENTITY), f"embed={unit}")


def make_embedding_catalog(root: str, n: int, seed: int = 0) -> None:
    """`embedding_rows` of n images as a catalog, and a 500-row seed catalog ``<root>-seed`` of the same
    identity, drawn near a few pool concepts."""
    from catalog.embeddings import embeddings_table
    from catalog.schemas import EMBEDDINGS_TABLE

    ids, x, sha, concept = embedding_rows(n, seed)
    write_embedding_rows(root, "bench", ids, x, sha)
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(np.flatnonzero(np.isin(concept, np.unique(concept)[:5])), size=500)
    near = x[picked] + rng.normal(0, 0.02, (500, DIM)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    seed_ids = np.arange(500, dtype=np.int64) + (1 << 50)
    _write(root + "-seed", EMBEDDINGS_TABLE, embeddings_table(seed_ids, near.astype(np.float16), IDENTITY),
           "embed=bench")


def make_clusters_catalog(root: str, n: int, seed: int = 0) -> None:
    """A long-tailed 5-level ``clusters`` table of n rows, written 1M rows at a time."""
    from catalog.schemas import CLUSTERS_TABLE, clusters, stamp

    rng = np.random.default_rng(seed)
    ks = [max(10, int(k)) for k in (n / 400, n / 4000, n / 40000, n / 400000, 25)]
    parents = [rng.integers(0, ks[i + 1], ks[i]) for i in range(4)]
    weights = 1.0 / np.arange(1, ks[0] + 1) ** 0.8
    weights /= weights.sum()
    for start in range(0, n, 10**6):
        rows = min(10**6, n - start)
        cols = {"image_id": np.arange(start, start + rows, dtype=np.int64)}
        level = rng.choice(ks[0], size=rows, p=weights)
        for i in range(5):
            cols[f"l{i + 1}"] = level
            if i < 4:
                level = parents[i][level]
        cols["distance"] = rng.random(rows).astype(np.float32)
        _write(root, CLUSTERS_TABLE, pa.table(cols, schema=stamp(clusters(5), CLUSTERS_TABLE)),
               f"cluster=bench{start // 10**6:04d}")


def embedding_commands(root: str, n: int, work: Path) -> list[tuple[str, str, list[str]]]:
    seeds = work / "seeds.yaml"
    seeds.write_text(json.dumps({"seeds": {"seeds": {"bench": {"embeddings": root + "-seed"}}}}))
    cat = ["--catalog", root]
    return [
        ("dedup", "descriptor=embeddings max_removed_share=0.5",
         [*CURATE, "dedup", *cat, "--set", "descriptor=embeddings", "max_removed_share=0.5"]),
        ("cluster", "", [*CURATE, "cluster", *cat]),
        ("sample", "20 %", [*CURATE, "sample", *cat, "--target-size", str(n // 5), "--set", "report=false"]),
        ("retrieve", "500 seed vectors", [*CURATE, "retrieve", *cat, "--seed", "bench", "--config", str(seeds)]),
        ("sql", "group by l1", [*CURATE, "sql", SQL, *cat]),
    ]


def file_commands(root: str, pool: str) -> list[tuple[str, str, list[str]]]:
    from pipelines.demo.job import DEMO_BACKBONE

    cat = ["--catalog", root]
    return [
        ("ingest", "demo pool files", [*CURATE, "ingest", pool, *cat]),
        ("embed", "demo backbone", [*CURATE, "embed", *cat, "--model", f"curate:{DEMO_BACKBONE}"]),
        ("mix", "untimed: part all = pool", [*CURATE, "mix", *cat, "--set", "parts={all: {source: pool}}",
                                             "homogeneous_part=null"]),
        ("pack", "part all", [*CURATE, "pack", *cat, "--part", "all"]),
    ]


#: The stages a rung can run, and what each needs run before it on the same catalog.
STAGES = frozenset({"dedup", "cluster", "sample", "retrieve", "sql", "ingest", "embed", "pack"})
NEEDS = {"sample": "cluster", "retrieve": "cluster", "sql": "cluster"}  # they read its tables


def run_rung(kind: str, n: int, work: Path, log: Path, stages: set[str] | None = None) -> list[dict]:
    rung = work / f"{kind}-{n}"
    shutil.rmtree(rung, ignore_errors=True)
    rung.mkdir(parents=True)
    root = str(rung / "catalog")
    t0 = time.perf_counter()
    if kind == "emb":
        make_embedding_catalog(root, n)
        commands = embedding_commands(root, n, rung)
    elif kind == "clusters":
        make_clusters_catalog(root, n)
        commands = [("sample", "20 %", [*CURATE, "sample", "--catalog", root, "--target-size", str(n // 5),
                                        "--set", "report=false"]),
                    ("sql", "group by l1", [*CURATE, "sql", SQL, "--catalog", root])]
    else:
        from pipelines.demo.pool import generate_demo_pool

        generate_demo_pool(str(rung / "demo"), n=n)
        commands = file_commands(root, str(rung / "demo" / "pool"))
    print(f"[{kind}:{n:.0e}] data written in {time.perf_counter() - t0:.0f} s", flush=True)
    base = run_measured([*CURATE, "sql", "SELECT 1", "--catalog", root], log)["peak_rss_mb"]
    rows = []
    commands = [c for c in commands if stages is None or c[0] in stages or c[0] == "mix"]
    for stage, note, args in commands:
        try:
            m = run_measured(args, log)
        except RuntimeError as e:  # record it and go on: one broken stage must not cost the ladder
            print(f"[{kind}:{n:.0e}] {stage} FAILED: {e}", flush=True)
            rows.append({"rung": f"{kind}:{n:.0e}", "rows": n, "stage": stage, "note": f"FAILED: {e}"})
            continue
        if stage == "mix":
            continue
        row = {"rung": f"{kind}:{n:.0e}", "rows": n, "stage": stage, "note": note, **m,
               "us_per_row": 1e6 * m["wall_s"] / n, "start_rss_mb": base}
        if kind == "emb" and stage != "sql":
            row["bound_mb"] = base + n * (2 * DIM + 16) / 2**20
        rows.append(row)
        print(f"[{kind}:{n:.0e}] {stage}: {m['wall_s']:.1f} s wall, {m['cpu_s']:.1f} CPU-s, "
              f"{m['peak_rss_mb']:.0f} MB peak", flush=True)
    rows.append({"rung": f"{kind}:{n:.0e}", "rows": n, "stage": "(tables)", "note": table_bytes(root)})
    if not os.environ.get("CURATE_SCALE_KEEP"):
        shutil.rmtree(rung, ignore_errors=True)
    return rows


def table_bytes(root: str) -> str:
    """``table: bytes per row`` of every table the rung's stages left, as stored (zstd Parquet)."""
    from catalog.tables import describe, list_tables

    infos = [describe(root, t) for t in list_tables(root)]
    return ", ".join(f"{i.name} {i.bytes / max(i.rows, 1):.0f} B/row" for i in infos)


def exponents(rows: list[dict]) -> list[dict]:
    """Growth exponent of wall time, CPU time and RSS above start-up, per rung kind and stage, between
    consecutive rungs of that kind."""
    out = []
    for kind, stage in sorted({(r["rung"].split(":")[0], r["stage"]) for r in rows}):
        mine = sorted((r for r in rows if r["stage"] == stage and r["rung"].startswith(kind + ":") and "wall_s" in r),
                      key=lambda r: r["rows"])
        if not mine:
            continue
        for a, b in zip(mine, mine[1:]):
            ratio = math.log(b["rows"] / a["rows"])
            mem_a = max(a["peak_rss_mb"] - a["start_rss_mb"], 1.0)
            mem_b = max(b["peak_rss_mb"] - b["start_rss_mb"], 1.0)
            out.append({"stage": stage, "from": a["rung"], "to": b["rung"],
                        "time_exp": math.log(b["wall_s"] / a["wall_s"]) / ratio,
                        "cpu_exp": math.log(b["cpu_s"] / a["cpu_s"]) / ratio,
                        "mem_exp": math.log(mem_b / mem_a) / ratio})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rungs", default=ALL_RUNGS, help=f"comma-separated KIND:N (default {ALL_RUNGS})")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir; needs ~3 GB at emb:1e6)")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--stages", default=None,
                    help="comma-separated stages to run (default: all); a stage another needs is kept with it")
    args = ap.parse_args()
    stages = None
    if args.stages is not None:
        named = set(args.stages.split(","))
        if named - STAGES:
            raise SystemExit(f"unknown stage(s) {sorted(named - STAGES)} in --stages (known: {sorted(STAGES)})")
        stages = named | {NEEDS[s] for s in named if s in NEEDS}
    work = Path(args.work or tempfile.mkdtemp(prefix="curate-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    rows: list[dict] = []
    for spec in args.rungs.split(","):
        kind, _, size = spec.partition(":")
        if kind not in ("emb", "clusters", "files"):
            raise SystemExit(f"unknown rung kind {kind!r} in {spec!r} (emb, clusters, files)")
        rows += run_rung(kind, int(float(size)), work, log, stages)
    growth = exponents(rows)
    load = os.getloadavg()
    report(f"scale ladder (load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})", rows, None)
    report("growth exponents between rungs (1 = linear)", growth, args.out,
           {"stages": rows, "load_average": load, "commands_log": str(log)})


if __name__ == "__main__":
    main()
