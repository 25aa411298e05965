"""Evaluation sets of the demo pool, derived from its ground truth for ``curate ablate``.

Written once under ``<demo pool>/eval/`` (no curation stage reads them):

- ``concepts/<concept>/<j>.jpg``: fresh instances (never pool files) of concepts from the head and
  from the tail of the pool's concept distribution, for k-NN and the linear probe;
- ``concept_frequency.json``: every concept's number of pool images, which splits those scores into
  head and tail concepts (``training.evals.sets.head_labels``);
- ``instances/<group>/``: the pool's near-duplicate groups (an original and its re-encoded, resized,
  cropped or converted copies; exact byte copies left out, any backbone finds those), and
  ``distractors/``: other pool images, for instance retrieval.

Every file is a pure function of the pool's truth tables and ``seed``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from catalog.paths import write_bytes_atomic
from pipelines.demo.concepts import CONCEPTS, render_concept_image
from pipelines.demo.pool import DENSE_PROBE_FILE
from training.evals.sets import head_labels
from training.evals.suite import EvalSuiteConfig

EVAL_DIR = "eval"
DONE_FILE = "_complete.json"
# Every head concept (the demo has 10) and 80 of its 290 tail concepts, 16 fresh images each: 1,280 tail
# queries. With 20 tail concepts of 12 (240 queries) one query moved the tail k-NN by 0.4 points; with
# 1,280 the evaluation's own (binomial) error is ~1.4 points, under the seeds' spread of ~3.
HEAD_CONCEPTS, TAIL_CONCEPTS = 20, 80
PER_CONCEPT = 16
N_DISTRACTORS = 400
MIN_SIDE, MAX_SIDE = 64, 128


def eval_suite_config(pool_root: str) -> EvalSuiteConfig:
    """The suite over the sets ``write_eval_sets`` puts under ``pool_root`` (with the pool's dense probe set)."""
    base = os.path.join(pool_root, EVAL_DIR)
    return EvalSuiteConfig(labelled=os.path.join(base, "concepts"),
                           frequency=os.path.join(base, "concept_frequency.json"),
                           instances=os.path.join(base, "instances"), distractors=os.path.join(base, "distractors"),
                           dense_probe=os.path.join(pool_root, DENSE_PROBE_FILE))


def evenly_spaced(items: list, n: int) -> list:
    """``n`` items spread over ``items`` from first to last (all of them when there are fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def chosen_concepts(counts: dict[str, int], n_head: int = HEAD_CONCEPTS, n_tail: int = TAIL_CONCEPTS) -> list[str]:
    """Concepts spread evenly over the frequency ranking of the head, and of the tail (present concepts only)."""
    head = head_labels(counts)
    ranked = [name for name, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c > 0]
    return sorted(evenly_spaced([c for c in ranked if c in head], n_head)
                  + evenly_spaced([c for c in ranked if c not in head], n_tail))


def _write_concepts(out: Path, counts: dict[str, int], seed: int) -> int:
    by_name = {c.name: c.id for c in CONCEPTS}
    rng = np.random.default_rng([seed, 3])
    n = 0
    for name in chosen_concepts(counts):
        folder = out / "concepts" / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(PER_CONCEPT):
            size = (int(rng.integers(MIN_SIDE, MAX_SIDE + 1)), int(rng.integers(MIN_SIDE, MAX_SIDE + 1)))
            image, _ = render_concept_image(by_name[name], int(rng.integers(2**63)), size)
            image.save(folder / f"{j:03d}.jpg", quality=90)
            n += 1
    return n


def _write_instances(out: Path, pool_root: Path, truth: list[dict], seed: int) -> tuple[int, int]:
    """Copy the near-duplicate groups (without exact copies) and a seeded sample of ungrouped images."""
    exact = {r["dup_group"] for r in truth if r["kind"] == "exact_duplicate"}
    groups: dict[int, list[str]] = {}
    for r in truth:
        if r["dup_group"] >= 0 and r["dup_group"] not in exact:
            groups.setdefault(r["dup_group"], []).append(r["relpath"])
    for group, members in groups.items():
        folder = out / "instances" / f"{group:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, rel in enumerate(sorted(members)):
            shutil.copyfile(pool_root / "pool" / rel, folder / f"{k}{Path(rel).suffix}")
    loners = sorted(r["relpath"] for r in truth if r["dup_group"] < 0 and r["kind"] == "normal")
    picked = np.random.default_rng([seed, 4]).choice(len(loners), min(N_DISTRACTORS, len(loners)), replace=False)
    (out / "distractors").mkdir(parents=True, exist_ok=True)
    for i in sorted(picked):
        shutil.copyfile(pool_root / "pool" / loners[i], out / "distractors" / loners[i].replace("/", "-"))
    return sum(len(m) for m in groups.values()), len(picked)


def write_eval_sets(pool_root: str, seed: int = 0) -> EvalSuiteConfig:
    """Write the demo pool's evaluation sets once (a finished set is marked); returns the suite over them."""
    root = Path(pool_root)
    out = root / EVAL_DIR
    if not (out / DONE_FILE).exists():
        if not (root / "truth" / "pool.parquet").exists():
            raise FileNotFoundError(f"{pool_root} is not a demo pool (no truth/pool.parquet)")
        shutil.rmtree(out, ignore_errors=True)  # a half-written set from a killed run
        concepts = pq.read_table(root / "truth" / "concepts.parquet").to_pylist()
        counts = {r["name"]: int(r["count"]) for r in concepts}
        write_bytes_atomic(str(out / "concept_frequency.json"), json.dumps(counts, indent=1).encode())
        n_concepts = _write_concepts(out, counts, seed)
        truth = pq.read_table(root / "truth" / "pool.parquet").to_pylist()
        n_instances, n_distractors = _write_instances(out, root, truth, seed)
        summary = {"concept_images": n_concepts, "instance_images": n_instances, "distractors": n_distractors}
        write_bytes_atomic(str(out / DONE_FILE), json.dumps(summary).encode())
    return eval_suite_config(pool_root)
