"""`curate cluster` with no config on a long-tailed pool, then a 20 % `curate sample`: time and balance.

    .venv/bin/python -m benchmarks.cluster_defaults --n 200000 --levels 4 5 --out cluster_defaults.json

Each row runs the cluster stage exactly as ``curate cluster --embeddings X.npy --ids IDS.npy
[--levels L]`` does (the CLI's config loading, a fresh catalog, default levels), then the sample
stage with ``--target-size`` = ``--frac`` × rows, and scores the sample's normalised concept entropy
against the pool generator's truth (`benchmarks.long_tail_pool`). Wall and CPU seconds are the whole
stage; per level, the wall time comes from when each level's last checkpoint was written. "entropy by
cut" is the entropy of a balanced sample of the same size from the same hierarchy cut at level 1, 2, …:
where a level gains or loses balance.
``--set key=value`` changes a knob for every row (the row then names it).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import report
from benchmarks.long_tail_pool import write_pool
from catalog.config import load_config
from catalog.shards import read_table
from curation.sampling import balanced_sample
from curation.synthetic import normalised_entropy
from pipelines.stage import run_stage
from pipelines.stages.cluster import ClusterConfig, level_specs
from pipelines.stages.sample import SampleConfig


def level_walls(root: str, n_levels: int, started: float) -> list[float]:
    """Seconds from the start to each level's last checkpoint write (levels run one after another)."""
    ckpt = os.path.join(root, "_checkpoints", "cluster")
    ends = []
    for level in range(1, n_levels + 1):
        names = [f for f in os.listdir(ckpt) if f.startswith(f"level{level}__step")]
        ends.append(max(os.path.getmtime(os.path.join(ckpt, f)) for f in names) - started)
    return [b - a for a, b in zip([0.0] + ends[:-1], ends)]


def run_row(paths: dict[str, str], n_levels: int, overrides: list[str], frac: float, work: str) -> dict:
    root = os.path.join(work, f"catalog-l{n_levels}")
    shutil.rmtree(root, ignore_errors=True)
    files = [f"embeddings={paths['embeddings']}", f"ids={paths['ids']}"]
    config = load_config(ClusterConfig, None, [*overrides, *files, f"n_levels={n_levels}"])
    concepts = np.load(paths["concepts"])
    n = len(concepts)
    started, wall, cpu = time.time(), time.perf_counter(), time.process_time()
    result = run_stage("cluster", root, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    walls = level_walls(root, n_levels, started)
    run_stage("sample", root, SampleConfig(target_size=round(frac * n)))
    picked = read_table(root, "curated/lvd", columns=["image_id"]).column("image_id").to_numpy()
    return {"levels": n_levels, "knobs": " ".join(overrides) or "defaults",
            "level1": level1_shape(config, n, np.load(paths["embeddings"], mmap_mode="r").shape[1]),
            "k": "/".join(str(k) for k in result.summary["levels"]), "wall_s": wall, "cpu_s": cpu,
            "level_wall_s": "/".join(f"{w:.0f}" for w in walls),
            "entropy": normalised_entropy(concepts[picked], int(concepts.max()) + 1),
            "entropy_by_cut": entropy_by_cut(root, concepts, n_levels, round(frac * n)),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "load_1min": os.getloadavg()[0]}


def entropy_by_cut(root: str, concepts: np.ndarray, n_levels: int, target: int) -> str:
    """Concept entropy of a ``target``-row balanced sample with the hierarchy cut at each level in turn."""
    table = read_table(root, "clusters", columns=["image_id", *(f"l{t}" for t in range(1, n_levels + 1))])
    truth = concepts[table.column("image_id").to_numpy()]
    labels = np.stack([table.column(f"l{t}").to_numpy() for t in range(1, n_levels + 1)], axis=1)
    cuts = [normalised_entropy(truth[balanced_sample(labels[:, :top], target)], int(concepts.max()) + 1)
            for top in range(1, n_levels + 1)]
    return "/".join(f"{e:.3f}" for e in cuts)


def level1_shape(config: ClusterConfig, rows: int, dim: int) -> str:
    """Level 1's shape as the stage derives it (`level_specs`): direct k, or pre-clusters × splits."""
    spec = level_specs(config, rows, dim)[0]
    return f"{spec.k} x {spec.n_splits}" if spec.n_splits > 1 else f"{spec.k} direct"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--levels", type=int, nargs="+", default=[4, 5])
    p.add_argument("--frac", type=float, default=0.2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a ClusterConfig override")
    p.add_argument("--pool-dir", default=os.path.join(tempfile.gettempdir(), "curate_long_tail_pool"))
    p.add_argument("--out", default="")
    a = p.parse_args()
    paths = write_pool(os.path.join(a.pool_dir, f"n{a.n}_d{a.d}"), a.n, a.d)
    concepts = np.load(paths["concepts"])
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for n_levels in a.levels:
            rows.append(run_row(paths, n_levels, a.set, a.frac, work))
            print(rows[-1], flush=True)
    pool = normalised_entropy(concepts, int(concepts.max()) + 1)
    report(f"curate cluster defaults on {a.n:,} x {a.d} (pool entropy {pool:.3f}), {a.frac:.0%} sample", rows,
           a.out, {"args": vars(a), "pool_entropy": pool, "load_avg": os.getloadavg()})


if __name__ == "__main__":
    main()
