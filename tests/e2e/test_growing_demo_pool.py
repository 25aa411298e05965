"""A demo pool folder that gains 10 % new files: `build-lvd`'s update keeps the curated set it had and is
at least as balanced in the demo's ground-truth concepts as a build from scratch on the final folder."""

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog.config import load_config
from catalog.sql import query
from curation.synthetic import normalised_entropy
from pipelines.build_lvd import BuildLVDConfig, build_lvd
from pipelines.demo.job import DEMO_SETTINGS

FILES = 600


def _copy(pool: str, src: str, rels: list[str]) -> None:
    for rel in rels:
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        shutil.copy2(os.path.join(pool, rel), os.path.join(src, rel), follow_symlinks=False)


def _curated(root: str, src: str) -> list[str]:
    """The curated images by their path under the source folder."""
    return [os.path.relpath(u, src) for u in query(root, "SELECT uri FROM curated_lvd").column(0).to_pylist()]


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
    before = set(_curated(updated, src))
    _copy(pool, src, [rels[i] for i in sorted(new)])
    results = build_lvd(updated, config, source=src)
    assert "drift" in results["cluster"].summary  # assigned down the hierarchy, not clustered again
    after = _curated(updated, src)
    build_lvd(scratch, config, source=src)
    fresh = _curated(scratch, src)
    assert len(before & set(after)) / len(before) >= 0.9

    def balance(curated: list[str]) -> float:
        labels = np.array([concept[r] for r in curated if concept[r] >= 0])
        return normalised_entropy(labels, int(max(concept.values())) + 1)

    # no less balanced than from scratch (measured: 0.818 updated, 0.815 from scratch on these 600 files;
    # on the first 1,000, 0.865 and 0.848: the update can come out more balanced, by more than 0.01)
    assert balance(after) >= balance(fresh) - 0.01, (balance(after), balance(fresh))
