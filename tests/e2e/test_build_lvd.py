import json
import os
import shutil

import numpy as np
import pytest

from catalog.array_store import CatalogArrayStore
from catalog.ledger import Ledger
from catalog.shards import table_exists
from catalog.sql import query
from pipelines.demo.job import DEMO_SETTINGS
from tests.conftest import DEMO_FILTER, DEMO_N, concept_of_uri
from tests.helpers import kill_when, run_cli


def _entropy(concepts: list[int]) -> float:
    counts = np.bincount(concepts)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_curated_concepts_are_flatter_than_pool_and_random(demo_pool, lvd_catalog):
    concept = concept_of_uri(demo_pool)
    pool = [concept[u] for u in query(lvd_catalog, "SELECT p.uri FROM clusters JOIN pool p USING (image_id)").column(0).to_pylist()]
    curated = [concept[u] for u in query(lvd_catalog, "SELECT uri FROM curated_lvd").column(0).to_pylist()]
    assert len(curated) == int(DEMO_N * 0.3) and len(set(query(lvd_catalog, "SELECT image_id FROM curated_lvd").column(0).to_pylist())) == len(curated)
    rng = np.random.default_rng(0)
    random_subsets = [rng.choice(pool, len(curated), replace=False) for _ in range(20)]
    # a same-size random subset is the pool's own distribution seen at that sample size
    assert _entropy(curated) > max(_entropy(r) for r in random_subsets)
    # and the head is cut below what any of them holds (the pool's 12 %: random subsets of its size 10-14 %; curated
    # 0.4-1.8 % over five pool paths, 6 % where k-means gave the biggest concept a top-level branch of its own)
    biggest = np.bincount(pool).argmax()
    assert np.mean(np.asarray(curated) == biggest) < min(np.mean(r == biggest) for r in random_subsets)


def test_broken_and_duplicate_files_are_absent(lvd_catalog):
    bad = "SELECT count(*) FROM {t} JOIN pool p USING (image_id) WHERE p.status <> 'ok'"
    assert query(lvd_catalog, bad.format(t="clusters")).column(0)[0].as_py() == 0
    assert query(lvd_catalog, bad.format(t="curated_lvd")).column(0)[0].as_py() == 0
    dup_in = "SELECT count(*) FROM {t} WHERE image_id IN (SELECT image_id FROM duplicates)"
    assert query(lvd_catalog, dup_in.format(t="clusters")).column(0)[0].as_py() == 0
    assert query(lvd_catalog, dup_in.format(t="curated_lvd")).column(0)[0].as_py() == 0


def test_hierarchy_tables_are_consistent(lvd_catalog):
    levels = query(lvd_catalog, "SELECT level, count(*) AS k, sum(size) AS n FROM centroids GROUP BY 1 ORDER BY 1").to_pylist()
    n = query(lvd_catalog, "SELECT count(*) FROM clusters").column(0)[0].as_py()
    assert [r["level"] for r in levels] == [1, 2, 3, 4, 5] and all(r["n"] == n for r in levels)
    assert all(a["k"] > b["k"] > 1 for a, b in zip(levels, levels[1:]))
    # a level-1 cluster's parent is the l2 label of its members
    mismatched = query(lvd_catalog, "SELECT count(*) FROM clusters c JOIN centroids k ON k.level = 1 AND "
                                    "k.cluster_id = c.l1 WHERE k.parent_id <> c.l2").column(0)[0].as_py()
    assert mismatched == 0
    for name in ("cluster_sizes", "contact_sheet_pool", "contact_sheet_curated"):
        assert os.path.getsize(os.path.join(lvd_catalog, "reports", "lvd", f"{name}.png")) > 1000


def test_the_demo_filter_keeps_every_image_of_the_clean_demo_pool(lvd_catalog):
    ran = query(lvd_catalog, "SELECT count(*) FROM errors WHERE stage = 'filter'").column(0)[0].as_py()
    measured = query(lvd_catalog, "SELECT count(sharpness) AS m, count(*) AS n FROM pool WHERE status = 'ok'")
    assert ran == 0 and measured.column("m")[0].as_py() == measured.column("n")[0].as_py() > 0
    assert os.path.exists(os.path.join(lvd_catalog, "_ledger", "filter", "_complete.json"))
    assert os.path.getsize(os.path.join(lvd_catalog, "reports", "lvd", "quality_signals.png")) > 1000


def test_copy_detection_against_the_sidecar(demo_pool, lvd_catalog):
    import pyarrow.parquet as pq

    truth = pq.read_table(os.path.join(demo_pool, "truth", "pool.parquet")).to_pylist()
    group = {os.path.join(demo_pool, "pool", r["relpath"]): r["dup_group"] for r in truth}
    kind = {os.path.join(demo_pool, "pool", r["relpath"]): r["kind"] for r in truth}
    rows = query(lvd_catalog, "SELECT p.uri, k.uri AS kept_uri, d.reason FROM duplicates d JOIN pool p USING (image_id) "
                              "JOIN pool k ON k.image_id = d.kept_id").to_pylist()
    exact = {r["uri"] for r in rows if r["reason"] == "exact"}
    by_hash: dict[str, list[str]] = {}
    for r in query(lvd_catalog, "SELECT uri, sha256 FROM pool WHERE status = 'ok'").to_pylist():
        by_hash.setdefault(r["sha256"], []).append(r["uri"])
    identical = [uris for uris in by_hash.values() if len(uris) > 1]
    assert sum(k == "exact_duplicate" for k in kind.values()) == sum(len(u) - 1 for u in identical) > 0
    assert all(len(set(uris) - exact) == 1 for uris in identical)  # one kept per identical group
    copies = [r for r in rows if r["reason"] == "copy"]
    correct = sum(group[r["uri"]] >= 0 and group[r["uri"]] == group[r["kept_uri"]] for r in copies)
    sizes = np.bincount([g for u, g in group.items() if g >= 0 and u not in exact])
    expected = int(sum(s - 1 for s in sizes if s > 1))
    assert expected >= 10
    assert correct / len(copies) >= 0.95, (correct, len(copies))
    assert correct / expected >= 0.90, (correct, expected)


def test_rerunning_build_lvd_skips_finished_stages(lvd_catalog):
    before = query(lvd_catalog, "SELECT image_id FROM curated_lvd ORDER BY 1").column(0).to_pylist()
    result = run_cli(["build-lvd", "--catalog", lvd_catalog, "--target-size", str(int(DEMO_N * 0.3)),
                      "--set", *DEMO_SETTINGS, *(f"filter.{s}" for s in DEMO_FILTER)])
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("(already done)") == 5, result.stderr  # filter, embed, dedup, cluster, sample
    assert query(lvd_catalog, "SELECT image_id FROM curated_lvd ORDER BY 1").column(0).to_pylist() == before
    assert query(lvd_catalog, "SELECT count(*) - count(DISTINCT image_id) FROM duplicates").column(0)[0].as_py() == 0


@pytest.mark.slow
def test_sigkill_during_resampling_then_resume_gives_same_clusters(lvd_catalog, tmp_path):
    root = str(tmp_path / "cat")
    shutil.copytree(lvd_catalog, root, ignore=shutil.ignore_patterns("clusters", "centroids", "curated", "reports"))
    shutil.rmtree(os.path.join(root, "_ledger", "cluster"))
    shutil.rmtree(os.path.join(root, "_checkpoints", "cluster"))
    store = CatalogArrayStore(root, "cluster")
    kill_when(["cluster", "--catalog", root], lambda: store.get("level2/step2") is not None)
    # killed inside the hierarchy's resampling (level 2 or a later one: the steps are quick)
    assert not Ledger(root, "cluster").is_complete() and not table_exists(root, "clusters")
    result = run_cli(["cluster", "--catalog", root])
    assert result.returncode == 0, result.stderr
    cols = "image_id, l1, l2, l3, l4, l5, distance"
    assert query(root, f"SELECT {cols} FROM clusters ORDER BY 1").to_pylist() == \
        query(lvd_catalog, f"SELECT {cols} FROM clusters ORDER BY 1").to_pylist()
    result = run_cli(["sample", "--catalog", root, "--target-size", str(int(DEMO_N * 0.3))])
    assert result.returncode == 0, result.stderr
    assert query(root, "SELECT image_id FROM curated_lvd ORDER BY 1").to_pylist() == \
        query(lvd_catalog, "SELECT image_id FROM curated_lvd ORDER BY 1").to_pylist()


def test_cluster_and_sample_on_your_own_embeddings(tmp_path):
    from curation.synthetic import concept_embeddings

    x, concept, _ = concept_embeddings(n=3000, d=32, n_concepts=40, n_super=8, seed=1)
    ids = np.arange(3000, dtype=np.int64) * 7 + 5
    np.save(tmp_path / "x.npy", x.astype(np.float16))
    np.save(tmp_path / "ids.npy", ids)
    root = str(tmp_path / "cat")
    result = run_cli(["cluster", "--catalog", root, "--embeddings", str(tmp_path / "x.npy"), "--ids",
                      str(tmp_path / "ids.npy"), "--levels", "2", "--set", "resampling_steps=2"])
    assert result.returncode == 0, result.stderr
    result = run_cli(["sample", "--catalog", root, "--target-size", "600"])
    assert result.returncode == 0, result.stderr
    picked = query(root, "SELECT image_id FROM curated_lvd").column(0).to_numpy()
    assert len(picked) == 600 and set(picked.tolist()) <= set(ids.tolist())
    chosen = concept[np.searchsorted(ids, np.sort(picked))]
    assert _entropy(chosen.tolist()) > _entropy(concept.tolist())
    json.dumps(query(root, "SELECT * FROM centroids LIMIT 1").to_pylist(), default=str)
