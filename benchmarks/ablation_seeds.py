"""Several ablations of one recipe and the same arms, on other seeds, read as one table.

Three seeds cannot tell a 3-point difference from a per-seed spread of 3-4 points; more seeds can be
run later under another ablation name (``--set seeds=[3,4,5]``), and this pools their runs: the arms'
table and the paired differences against ``raw`` exactly as ``curate ablate`` writes them
(`pipelines.ablate.table`), over every seed, plus the standard error of each paired mean. No training:

    .venv/bin/python -m benchmarks.ablation_seeds demo_out/catalog/ablations/steps600/results.json \\
        demo_out/catalog/ablations/steps600more/results.json --out docs/results/ablation_steps600_6seeds.json
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os

from pipelines.ablate.runs import SCORES_FILE
from pipelines.ablate.table import markdown, summarise


def runs_of(results_json: str) -> list[dict]:
    """Every run's ``scores.json`` beside an ablation's ``results.json`` (what `summarise` read for it)."""
    folder = os.path.dirname(results_json)
    found = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "seed*", SCORES_FILE))):
        with open(path) as f:
            found.append(json.load(f))
    return found


def pooled(results_jsons: list[str]) -> dict:
    """One summary over the runs of every ablation (same arms, metrics and steps; distinct seeds)."""
    documents = []
    for path in results_jsons:
        with open(path) as f:
            documents.append(json.load(f))
    first = documents[0]
    for doc in documents[1:]:
        if (doc["arms"], doc["metrics"], doc["steps"]) != (first["arms"], first["metrics"], first["steps"]):
            raise ValueError("the ablations differ in arms, evaluations or steps: their seeds do not pool")
    runs = [r for path in results_jsons for r in runs_of(path)]
    seeds = [(r["arm"], r["seed"]) for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError("a seed of an arm appears in two ablations")
    summary = summarise(first["name"], runs, first["arms"], first["metrics"])
    return summary | {"part_sizes": first.get("part_sizes", {}), "sources": [d["name"] for d in documents]}


def standard_errors(summary: dict) -> dict[str, dict[str, float]]:
    """std / √seeds of every paired mean: the uncertainty of the difference itself."""
    return {arm: {m: cell["std"] / math.sqrt(len(cell["values"])) for m, cell in row.items()}
            for arm, row in summary["paired"].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json of each ablation")
    p.add_argument("--out", default="")
    a = p.parse_args()
    summary = pooled(a.results)
    errors = standard_errors(summary)
    print(markdown(summary))
    for arm, row in errors.items():
        print(f"standard error of the paired mean, {arm} − {summary['baseline']}: "
              + ", ".join(f"{m} {100 * v:.1f}" for m, v in row.items()))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary | {"paired_standard_error": errors}, f, indent=2)
        print(f"(written to {a.out})")


if __name__ == "__main__":
    main()
