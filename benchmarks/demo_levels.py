"""Level-size rules on real embeddings: concept entropy of a balanced sample of a built demo catalog.

Reads the embeddings (duplicates removed) of a catalog built by ``curate demo`` and the demo pool's
sidecar concept labels, runs the hierarchy with each rule's k per level over a few seeds, samples
``--target`` rows and reports the normalised entropy of their true concepts:

    curate demo /tmp/demo && .venv/bin/python -m benchmarks.demo_levels /tmp/demo \\
        --out docs/results/demo_levels_cpu.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import duckdb
import numpy as np

from benchmarks.common import report
from curation.hierarchy import LevelSpec, default_levels, hierarchical_kmeans
from curation.sampling import balanced_sample
from curation.synthetic import normalised_entropy
from pipelines.demo.concepts import N_CONCEPTS
from pipelines.embedding_source import load_vectors, removed_ids

# The rule before 2026-11-26: a fixed floor of 10 top clusters (its k for this pool size).
OLD_RULE_10K = [1018, 194, 59, 20, 10]


def concepts_of(demo: Path, image_ids: np.ndarray) -> np.ndarray:
    """True concept of each pool image id (-1: broken or no concept), from the sidecar truth."""
    rows = duckdb.connect().execute(
        f"SELECT p.image_id, t.concept FROM read_parquet('{demo}/catalog/pool/*.parquet') p "
        f"JOIN read_parquet('{demo}/demo_pool/truth/pool.parquet') t ON p.uri LIKE '%/' || t.relpath"
    ).fetchall()
    concept = dict(rows)
    return np.array([concept.get(int(i), -1) for i in image_ids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="folder of `curate demo OUT` (OUT/catalog, OUT/demo_pool)")
    parser.add_argument("--target", type=int, default=3000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out")
    args = parser.parse_args()

    ids, x = load_vectors(str(args.demo / "catalog"))
    keep = ~np.isin(ids, removed_ids(str(args.demo / "catalog")))
    ids, x = ids[keep], x[keep]
    concept = concepts_of(args.demo, ids)
    rules = {"default_levels": [s.clusters for s in default_levels(len(ids))], "old floor-10 rule": OLD_RULE_10K}
    rows = []
    for name, ks in rules.items():
        levels = [LevelSpec(k=ks[0])] + [LevelSpec(k=k, resampling_steps=10) for k in ks[1:]]
        for seed in (int(s) for s in args.seeds.split(",")):
            h = hierarchical_kmeans(x, levels, seed=seed, metric="cosine", n_iter=30)
            picked = concept[balanced_sample(h.point_labels(), args.target, seed=seed)]
            rows.append({"rule": name, "ks": "/".join(map(str, ks)), "seed": seed,
                         "entropy": normalised_entropy(picked[picked >= 0], N_CONCEPTS)})
    pool = concept[concept >= 0]
    random = np.random.default_rng(0).choice(pool, args.target, replace=False)
    report(f"normalised concept entropy of {args.target} sampled rows (pool {normalised_entropy(pool, N_CONCEPTS):.3f}, "
           f"random {normalised_entropy(random, N_CONCEPTS):.3f})", rows, args.out, {"rows_clustered": len(ids)})


if __name__ == "__main__":
    main()
