"""What each arm of a demo ablation trains on, by the pool's ground truth: head/tail shares and concept coverage.

The explanation column of the data ablation: if curation does not help the tail concepts, is it
because the arms' data hardly differ in their tail share, or because the model learns the tail as
well as the head whatever the data? Reads ``curate ablate``'s plan and results in a demo catalog and
the demo pool's truth (no training):

    .venv/bin/python -m benchmarks.ablation_composition demo_out --out docs/results/ablation_composition.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import duckdb
import numpy as np

from benchmarks.common import report
from curation.synthetic import normalised_entropy
from pipelines.demo.concepts import N_CONCEPTS
from training.evals.sets import head_labels


def part_concepts(demo: Path, part: str) -> np.ndarray:
    """True concept id of every image of ``curated/<part>`` (-1 for files outside the pool's truth)."""
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT coalesce(t.concept, -1) FROM read_parquet('{demo}/catalog/curated/{part}/*.parquet') c "
        f"LEFT JOIN read_parquet('{demo}/demo_pool/truth/pool.parquet') t ON c.uri LIKE '%/pool/' || t.relpath"
    ).fetchall()
    return np.array([r[0] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="folder of `curate demo OUT` (OUT/catalog, OUT/demo_pool)")
    parser.add_argument("--name", default="default", help="the ablation's name")
    parser.add_argument("--out")
    args = parser.parse_args()

    folder = args.demo / "catalog" / "ablations" / args.name
    plan = json.loads((folder / "plan.json").read_text())
    results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else None
    counts = duckdb.connect().execute(
        f"SELECT concept, name, count FROM read_parquet('{args.demo}/demo_pool/truth/concepts.parquet')").fetchall()
    head = head_labels({name: n for _, name, n in counts})
    is_head = np.zeros(N_CONCEPTS, bool)
    is_head[[cid for cid, name, _ in counts if name in head]] = True
    rows = []
    for arm, spec in plan["ablation"]["arms"].items():
        parts = sorted(spec["parts"])
        concepts = np.concatenate([part_concepts(args.demo, p) for p in parts])
        known = concepts[concepts >= 0]  # the labelled part's seed images are not pool files
        row = {"arm": arm, "parts": "+".join(parts), "images": len(concepts), "pool images": len(known),
               "head share": float(is_head[known].mean()), "tail share": float((~is_head[known]).mean()),
               "concepts": len(np.unique(known)), "concept entropy": normalised_entropy(known, N_CONCEPTS)}
        if results is not None:
            table = results["table"][arm]
            row |= {"knn head": table["knn_head"]["mean"], "knn tail": table["knn_tail"]["mean"],
                    "tail std": table["knn_tail"]["std"]}
        rows.append(row)
    report(f"ablation {args.name}: what each arm trains on ({len(head)} head concepts hold half the pool)",
           rows, args.out, {"head_concepts": sorted(head)})


if __name__ == "__main__":
    main()
