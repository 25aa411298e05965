"""A demo pool folder that gains 10 % new files: `build-lvd`'s update keeps the curated set it had and is
at least as balanced in the demo's ground-truth concepts as a build from scratch on the final folder.

One sample of 180 images is too noisy to compare (its balance moves by 0.05 with the sampling seed), so
each catalog is sampled with several seeds, each seed as its own part, and the means are compared. The
clustering stays one per catalog, and image ids come from paths, so the folder's name moves it; the
bounds below sit outside the spread measured over seven folders, and the issue's own bars (90 %
kept, balance within 0.01) are measured by `benchmarks/incremental.py` (both in docs/benchmarks.md,
"A growing pool")."""

import os
import shutil
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog.config import load_config
from catalog.sql import query
from curation.synthetic import normalised_entropy
from pipelines.build_lvd import BuildLVDConfig, build_lvd
from pipelines.demo.job import DEMO_SETTINGS
from pipelines.stage import run_stage

FILES = 600
SEEDS = 6


def _copy(pool: str, src: str, rels: list[str]) -> None:
    for rel in rels:
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        shutil.copy2(os.path.join(pool, rel), os.path.join(src, rel), follow_symlinks=False)


def _curated(root: str, src: str, part: str) -> list[str]:
    """The curated images of one part by their path under the source folder."""
    return [os.path.relpath(u, src) for u in query(root, f"SELECT uri FROM curated_{part}").column(0).to_pylist()]


def _samples(root: str, src: str, config: BuildLVDConfig) -> list[list[str]]:
    """The curated set of `build-lvd`'s part (seed 0) and of one more part per seed 1 … SEEDS-1."""
    for seed in range(1, SEEDS):
        run_stage("sample", root, replace(config.sample, seed=seed, part=f"seed{seed}", report=False))
    return [_curated(root, src, part) for part in ["lvd", *(f"seed{s}" for s in range(1, SEEDS))]]


@pytest.mark.slow
def test_a_ten_percent_update_keeps_the_curated_set_and_the_balance_of_a_build_from_scratch(demo_pool, tmp_path):
    pool = os.path.join(demo_pool, "pool")
    truth = pq.read_table(os.path.join(demo_pool, "truth", "pool.parquet")).to_pylist()
    concept = {r["relpath"]: r["concept"] for r in truth}
    rels = sorted(concept)[:FILES]
    new = set(np.random.default_rng(0).choice(len(rels), FILES // 10, replace=False))
    src = str(tmp_path / "src")
    config = load_config(BuildLVDConfig, None, [*DEMO_SETTINGS, f"sample.target_size={FILES * 3 // 10}"])
    _copy(pool, src, [r for i, r in enumerate(rels) if i not in new])
    updated, scratch = str(tmp_path / "updated"), str(tmp_path / "scratch")
    build_lvd(updated, config, source=src)
    before = _samples(updated, src, config)
    _copy(pool, src, [rels[i] for i in sorted(new)])
    results = build_lvd(updated, config, source=src)
    assert "drift" in results["cluster"].summary  # assigned down the hierarchy, not clustered again
    after = _samples(updated, src, config)  # each part sampled again, keeping what it held
    build_lvd(scratch, config, source=src)
    fresh = _samples(scratch, src, config)
    kept = [len(set(b) & set(a)) / len(b) for b, a in zip(before, after)]
    assert np.mean(kept) >= 0.85, kept  # a fixed target over 10 % more images keeps 1/1.1 = 0.91 if fair

    def balance(curated: list[str]) -> float:
        labels = np.array([concept[r] for r in curated if concept[r] >= 0])
        return normalised_entropy(labels, int(max(concept.values())) + 1)

    # not less balanced than from scratch beyond the spread of one clustering against another (see above)
    updated_balance, scratch_balance = np.mean([balance(a) for a in after]), np.mean([balance(f) for f in fresh])
    assert updated_balance >= scratch_balance - 0.035, (updated_balance, scratch_balance)
