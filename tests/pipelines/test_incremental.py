"""A growing pool: ingest, embed and dedup rerun on a source that gained files (and lost a few, and had one
file rewritten) work on what changed only, and end with the tables of a from-scratch run on the final source.

One module fixture grows a small demo pool in three batches (90 files, +18, +12) through the in-process
runner, counting the images each run decodes, and runs ingest and embed once from scratch on the final
source; the tests compare the two catalogs."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from catalog.embeddings import load_embeddings
from catalog.ledger import Ledger, LedgerPlanError
from catalog.shards import shard_sizes
from catalog.sql import query
from curation.hierarchy import LevelSpec
from pipelines.embed_items import pool_slices
from pipelines.stage import StageContext, StageResult, run_stage
from tests.helpers import kill_when, run_cli

FILES_PER_UNIT = 20
EMBED = {"model": "vit_test", "random_init": True, "image_size": 32, "images_per_unit": 20, "batch_size": 10}
EMBED_ARGS = ["--set", "model=vit_test", "random_init=true", "image_size=32", "images_per_unit=20", "batch_size=10",
              "--executor", "local"]
BATCHES = (90, 18, 12)


@dataclass
class Growth:
    src: str  # the source folder, in its final state
    inc: str  # the catalog updated after each batch
    ref: str  # ingest and embed from scratch on the final source
    first: str  # a copy of ``inc`` after the first batch (for the kill tests)
    vanished: list[str] = field(default_factory=list)  # URIs of files removed from the source
    changed: str = ""  # URI of the file rewritten under its name
    added: list[list[str]] = field(default_factory=list)  # URIs each update added (the changed file included)
    decoded: list[dict[str, int]] = field(default_factory=list)  # per update: images decoded by ingest, embed
    results: list[dict[str, StageResult]] = field(default_factory=list)


def _ingest(root: str, src: str) -> StageResult:
    return run_stage("ingest", root, {"source": src, "files_per_unit": FILES_PER_UNIT}, executor="local")


def _counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Count the calls of one decoder a stage module calls (the real decoder still runs)."""
    calls = [0]
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _update(growth: Growth, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.stages.embed as embed
    import pipelines.stages.ingest as ingest

    probes, crops = _counting(monkeypatch, ingest, "probe_image"), _counting(monkeypatch, embed, "decode_crop")
    growth.results.append({"ingest": _ingest(growth.inc, growth.src),
                           "embed": run_stage("embed", growth.inc, EMBED, executor="local"),
                           "dedup": run_stage("dedup", growth.inc, {}, executor="local")})
    growth.decoded.append({"ingest": probes[0], "embed": crops[0]})
    monkeypatch.undo()


def _uri(src: str, rel: str) -> str:
    return os.path.join(src, rel)


def _count(root: str, where: str, uris: list[str]) -> int:
    return query(root, f"SELECT count(*) FROM pool WHERE {where} AND list_contains($uris, uri)",
                 {"uris": uris}).column(0)[0].as_py()


@pytest.fixture(scope="module")
def growth(tmp_path_factory) -> Growth:
    from pipelines.demo.pool import generate_demo_pool

    base = tmp_path_factory.mktemp("incremental")
    generate_demo_pool(str(base / "gen"), n=sum(BATCHES), seed=11, workers=1)
    pool = str(base / "gen" / "pool")
    files = sorted(os.path.relpath(os.path.join(d, f), pool) for d, _, fs in os.walk(pool) for f in fs)
    order = np.random.default_rng(0).permutation(len(files))
    cuts = np.cumsum(BATCHES)
    batches = [[files[i] for i in order[a:b]] for a, b in zip([0, *cuts[:-1]], cuts)]
    src = str(base / "src")
    growth = Growth(src, str(base / "inc"), str(base / "ref"), str(base / "first"))

    def add(rels: list[str]) -> None:
        for rel in rels:
            os.makedirs(os.path.dirname(_uri(src, rel)), exist_ok=True)
            shutil.copy2(os.path.join(pool, rel), _uri(src, rel), follow_symlinks=False)

    def remove(rels: list[str]) -> None:
        for rel in rels:
            os.remove(_uri(src, rel))
            growth.vanished.append(_uri(src, rel))

    add(batches[0])
    with pytest.MonkeyPatch.context() as mp:
        _update(growth, mp)
    shutil.copytree(growth.inc, growth.first)
    ok = sorted(u for u in query(growth.inc, "SELECT uri FROM pool WHERE status = 'ok' AND uri LIKE '%.jpg'")
                .column(0).to_pylist() if not os.path.islink(u))
    rel = [os.path.relpath(u, src) for u in ok]
    time.sleep(0.01)  # a modification stamp of its own for the rewritten file
    with Image.open(ok[0]) as img:  # rewritten: another image, another size
        img.rotate(90).save(ok[0], quality=70)
    growth.changed = ok[0]
    for step, (batch, gone) in enumerate([(batches[1], rel[1:3]), (batches[2], [rel[3], batches[1][0]])]):
        add(batch)
        remove(gone)
        growth.added.append([_uri(src, r) for r in batch] + ([growth.changed] if step == 0 else []))
        with pytest.MonkeyPatch.context() as mp:
            _update(growth, mp)
    _ingest(growth.ref, src)
    run_stage("embed", growth.ref, EMBED, executor="local")
    run_stage("dedup", growth.ref, {}, executor="local")
    return growth


POOL_SQL = "SELECT * FROM pool {} ORDER BY image_id"


def test_the_updated_pool_is_the_from_scratch_pool_plus_the_removed_rows(growth):
    assert query(growth.inc, POOL_SQL.format("WHERE status <> 'removed'")).to_pylist() == \
        query(growth.ref, POOL_SQL.format("")).to_pylist()
    removed = query(growth.inc, "SELECT uri FROM pool WHERE status = 'removed' ORDER BY uri").column(0).to_pylist()
    assert removed == sorted(growth.vanished) and len(removed) == 4
    assert query(growth.inc, "SELECT count(*) - count(DISTINCT image_id) FROM pool").column(0)[0].as_py() == 0
    sha = "SELECT sha256 FROM pool WHERE uri = ?"
    assert query(growth.inc, sha, [growth.changed]).to_pylist() == query(growth.ref, sha, [growth.changed]).to_pylist()
    for table in ("errors", "copy_descriptors"):
        sql = f"SELECT * FROM {table} ORDER BY ALL"
        assert query(growth.inc, sql).to_pylist() == query(growth.ref, sql).to_pylist(), table
    last = growth.results[-1]["ingest"].summary
    assert last["removed"] == 4 and last["in"] == query(growth.ref, "SELECT count(*) FROM pool").column(0)[0].as_py()


def test_updates_decode_and_embed_only_the_new_images(growth):
    for update, (decoded, added) in enumerate(zip(growth.decoded[1:], growth.added), start=1):
        readable = _count(growth.inc, "bytes IS NOT NULL", added)  # a removed row keeps its bytes count
        usable = _count(growth.inc, "status <> 'error' AND format IS NOT NULL", added)
        assert 0 < usable <= readable < len(added) + 1
        assert decoded["ingest"] == readable, update
        assert decoded["embed"] == usable, update
        assert growth.results[update]["embed"].rows_run["embeddings"] == usable
        assert growth.results[update]["ingest"].items_run == len(added)
    assert growth.decoded[0]["embed"] == growth.results[0]["embed"].summary["out"] > usable


def test_updated_embeddings_are_bit_identical_to_a_from_scratch_run(growth):
    ids, x = load_embeddings(growth.inc)
    ref_ids, ref_x = load_embeddings(growth.ref)
    order, ref_order = np.argsort(ids), np.argsort(ref_ids)
    assert len(set(ids.tolist())) == len(ids)
    assert np.array_equal(ids[order], ref_ids[ref_order])
    assert np.array_equal(x[order].view(np.uint16), ref_x[ref_order].view(np.uint16))


def test_updated_duplicates_are_those_of_a_from_scratch_run(growth):
    sql = "SELECT image_id, kept_id, reason, round(similarity, 4) AS s FROM duplicates ORDER BY ALL"
    assert query(growth.inc, sql).to_pylist() == query(growth.ref, sql).to_pylist()
    assert query(growth.ref, "SELECT count(*) FROM duplicates WHERE reason = 'copy'").column(0)[0].as_py() > 0


def test_the_embed_plan_lists_slices_of_pool_shards_not_images(growth):
    members = Ledger(growth.inc, "embed").plan().members
    keys = {key for pairs in members.values() for key, _ in pairs}
    slices = {item.key for item in pool_slices(growth.inc, EMBED["images_per_unit"])}
    assert keys == slices and all(key.startswith("pool/") for key in keys)
    assert len(keys) < len(load_embeddings(growth.inc)[0]) / 5  # a slice per unit of 20 rows, not one per image


def test_a_rerun_without_change_is_done_and_other_settings_are_still_refused(growth):
    assert _ingest(growth.inc, growth.src).skipped
    assert run_stage("embed", growth.inc, EMBED, executor="local").skipped
    with pytest.raises(LedgerPlanError, match="files_per_unit: 20 -> 30"):
        run_stage("ingest", growth.inc, {"source": growth.src, "files_per_unit": 30})


def _killed_twice_then_resumed(args: list[str], root: str, run: str) -> None:
    """SIGKILL the update once its run reopened (retiring rows, or the first new unit), again one unit
    later in the resume, then run it to the end."""
    ledger = Ledger(root, run)
    before = len(ledger.done())
    kill_when([*args, "--catalog", root], lambda: not ledger.is_complete())
    assert not ledger.is_complete()
    at = len(ledger.done())
    kill_when([*args, "--catalog", root], lambda: len(ledger.done()) > at)
    assert len(ledger.done()) > before  # (the last unit's kill may come after the run finished)
    result = run_cli([*args, "--catalog", root])
    assert result.returncode == 0, result.stderr
    assert ledger.is_complete()


@pytest.mark.slow
def test_updates_killed_twice_resume_to_the_from_scratch_tables(growth, tmp_path):
    root = shutil.copytree(growth.first, str(tmp_path / "cat"))
    _killed_twice_then_resumed(["ingest", growth.src, "--set", f"files_per_unit={FILES_PER_UNIT}", "--executor",
                                "local"], root, "ingest")
    assert query(root, POOL_SQL.format("WHERE status <> 'removed'")).to_pylist() == \
        query(growth.ref, POOL_SQL.format("")).to_pylist()
    vanished_before_first = [u for u in growth.vanished if u not in growth.added[0]]
    assert sorted(query(root, "SELECT uri FROM pool WHERE status = 'removed'").column(0).to_pylist()) == \
        sorted(vanished_before_first)
    _killed_twice_then_resumed(["embed", *EMBED_ARGS], root, "embed")
    ids, x = load_embeddings(root)
    ref_ids, ref_x = load_embeddings(growth.ref)
    order, ref_order = np.argsort(ids), np.argsort(ref_ids)
    assert np.array_equal(ids[order], ref_ids[ref_order])
    assert np.array_equal(x[order].view(np.uint16), ref_x[ref_order].view(np.uint16))


CLUSTER = {"levels": [{"k": 6}, {"k": 2}], "metric": "cosine", "exclude_duplicates": False, "n_iter": 20}


def _blob(rng: np.random.Generator, centre: int, n: int, dim: int = 16) -> np.ndarray:
    x = rng.normal(0, 0.15, (n, dim))
    x[:, centre] += 1.0
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _add_embeddings(root: str, name: str, ids: np.ndarray, x: np.ndarray) -> None:
    from catalog.embeddings import embeddings_table
    from catalog.shards import write_shards

    write_shards(root, "embeddings", name, embeddings_table(ids, x, {}))


def _clusters(root: str) -> dict[int, tuple[int, ...]]:
    rows = query(root, "SELECT * FROM clusters ORDER BY image_id").to_pylist()
    return {r["image_id"]: (r["l1"], r["l2"]) for r in rows}


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> tuple[str, np.random.Generator]:
    """Three concepts of 100 embeddings each, clustered into 6 and then 2 clusters."""
    rng = np.random.default_rng(3)
    root = str(tmp_path_factory.mktemp("cluster_growth") / "cat")
    _add_embeddings(root, "batch0", np.arange(300), np.concatenate([_blob(rng, c, 100) for c in range(3)]))
    assert not run_stage("cluster", root, CLUSTER).skipped
    return root, rng


def test_new_embeddings_are_assigned_down_the_hierarchy_and_a_new_concept_is_flagged(clustered, tmp_path):
    base, rng = clustered
    root = shutil.copytree(base, str(tmp_path / "cat"))
    before = _clusters(root)
    same = np.concatenate([_blob(rng, c, 10) for c in range(3)])
    _add_embeddings(root, "batch1", np.arange(300, 330), same)
    result = run_stage("cluster", root, CLUSTER)
    after = _clusters(root)
    assert {i: after[i] for i in before} == before  # the clustered images keep their clusters
    centroids = query(root, "SELECT level, cluster_id, parent_id, centroid FROM centroids ORDER BY 1, 2").to_pylist()
    c1 = np.asarray([r["centroid"] for r in centroids if r["level"] == 1])
    parent = {r["cluster_id"]: r["parent_id"] for r in centroids if r["level"] == 1}
    nearest = np.argmax(same @ (c1 / np.linalg.norm(c1, axis=1, keepdims=True)).T, axis=1)
    assert [after[i] for i in range(300, 330)] == [(int(n), parent[int(n)]) for n in nearest]
    drift = result.summary["drift"]
    assert drift["new"] == 30 and drift["share"] < 0.2
    assert result.rows_run == {"clusters": 30}  # only the new images were clustered
    # a concept absent before: far from every centroid, flagged per top cluster, not reclustered at max_drift=1
    _add_embeddings(root, "batch2", np.arange(330, 360), _blob(rng, 7, 30))
    flagged = run_stage("cluster", root, {**CLUSTER, "max_drift": 1.0}).summary["drift"]
    assert flagged["new"] == 30 and flagged["far"] >= 27
    assert sum(t["far"] for t in flagged["per_top_cluster"].values()) == flagged["far"]
    report = os.path.join(root, "reports", "cluster", "drift.json")
    assert json.load(open(report))["far"] == flagged["far"]
    # --recluster: the new concept gets clusters of its own
    reclustered = run_cli(["cluster", "--catalog", root, "--recluster", "--set", "levels=[{k: 6}, {k: 2}]",
                           "metric=cosine", "exclude_duplicates=false", "n_iter=20"])
    assert reclustered.returncode == 0, reclustered.stderr
    assert "recluster=true" in reclustered.stderr
    final = _clusters(root)
    new_l1 = {final[i][0] for i in range(330, 360)}
    assert len(final) == 360 and not new_l1 & {final[i][0] for i in range(330)}


def test_a_drift_past_max_drift_reclusters_on_its_own(clustered, tmp_path):
    base, rng = clustered
    root = shutil.copytree(base, str(tmp_path / "cat"))
    _add_embeddings(root, "batch1", np.arange(300, 340), _blob(rng, 9, 40))
    result = run_stage("cluster", root, CLUSTER)
    assert "drift" not in result.summary and result.rows_run == {"clusters": 340, "centroids": 8}
    final = _clusters(root)
    assert not {final[i][0] for i in range(300, 340)} & {final[i][0] for i in range(300)}


def _cut_short(root: str, ledger_reset: bool) -> None:
    """The state a kill inside a recluster's restart leaves: the old clustering kept to start from, the
    run's rows gone, and (``ledger_reset``) its checkpoints and ledger too, before the new plan was written."""
    from catalog.lineage import run_prefix
    from catalog.shards import delete_shards
    from pipelines.stages.cluster import ClusterConfig, ClusterStage

    config = ClusterConfig(**{**CLUSTER, "levels": [LevelSpec(**level) for level in CLUSTER["levels"]]})
    ClusterStage().prepare_restart(StageContext(root, config, "cluster"), warm=True)
    for table in ("clusters", "centroids"):
        delete_shards(root, table, run_prefix("cluster"))
    if ledger_reset:
        ClusterStage().clear(StageContext(root, config, "cluster"))
        Ledger(root, "cluster").reset()


def test_a_recluster_starts_from_the_clustering_it_replaces_and_resumes_to_it_when_cut_short(clustered, tmp_path):
    base, rng = clustered
    before = _clusters(base)
    grown = shutil.copytree(base, str(tmp_path / "grown"))
    _add_embeddings(grown, "batch1", np.arange(300, 340), _blob(rng, 7, 40))
    cut = [shutil.copytree(grown, str(tmp_path / f"cut{k}")) for k in range(2)]
    result = run_stage("cluster", grown, {**CLUSTER, "recluster": True})
    expected = _clusters(grown)
    assert result.summary["warm_start"] == {"levels": [6, 2], "far_share": round(40 / 340, 4)}
    old = range(300)  # the old images keep their partition (a cold start splits each blob anew)
    assert adjusted_rand_score([before[i][0] for i in old], [expected[i][0] for i in old]) >= 0.8
    assert not {expected[i][0] for i in range(300, 340)} & {expected[i][0] for i in old}
    for ledger_reset, root in enumerate(cut):  # without --recluster: the cut-short restart is finished
        _cut_short(root, bool(ledger_reset))
        run_stage("cluster", root, CLUSTER)
        assert _clusters(root) == expected, ledger_reset
    cold = run_stage("cluster", grown, CLUSTER, overwrite=True)
    assert "warm_start" not in cold.summary and not os.path.exists(os.path.join(grown, "_checkpoints", "cluster-warm"))


def _concepts(ids: list[int]) -> np.ndarray:
    """The blob of each id of the `clustered` catalog grown by ten images per blob (ids 300-329)."""
    ids = np.asarray(ids)
    return np.where(ids < 300, ids // 100, (ids - 300) // 10)


def test_a_resampled_part_keeps_what_its_budgets_still_cover_and_writes_the_diff(clustered, tmp_path):
    base, rng = clustered
    root = shutil.copytree(base, str(tmp_path / "cat"))
    sample = {"target_size": 90, "report": False}
    run_stage("sample", root, sample)
    sql = "SELECT DISTINCT image_id FROM curated_lvd ORDER BY 1"
    before = set(query(root, sql).column(0).to_pylist())
    _add_embeddings(root, "batch1", np.arange(300, 330), np.concatenate([_blob(rng, c, 10) for c in range(3)]))
    drift = run_stage("cluster", root, CLUSTER).summary["drift"]
    resampled = run_stage("sample", root, {**sample, "report": True}).summary
    diff = resampled["diff"]
    after = query(root, sql).column(0).to_pylist()
    kept = len(before & set(after))
    assert kept / len(before) >= 0.9 and diff["kept"] == kept and diff["kept_share"] >= 0.9
    assert diff["added"] == len(set(after) - before) and diff["removed"] == len(before - set(after))
    per_top = diff["per_top_cluster"].values()
    assert sum(t["added"] for t in per_top) == diff["added"] and sum(t["removed"] for t in per_top) == diff["removed"]
    assert json.load(open(os.path.join(root, "reports", "lvd", "diff.json"))) == json.loads(json.dumps(diff))
    figure = os.path.join(root, "reports", "lvd", "update.png")  # the report draws the diff beside the drift
    assert figure in resampled["report"] and drift["new"] == 30
    with Image.open(figure) as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 500
    fresh = run_stage("sample", root, {**sample, "keep_previous": False}, overwrite=True)
    scratch = query(root, sql).column(0).to_pylist()
    assert "diff" not in fresh.summary and len(before & set(scratch)) / len(before) < 0.6  # stability is kept's doing
    shares = [np.bincount(_concepts(ids), minlength=3) / len(ids) for ids in (after, scratch)]
    assert np.abs(shares[0] - shares[1]).max() <= 1 / 90  # the same balance, within one image


def test_a_glob_of_tar_shards_appends_new_shards_and_marks_a_vanished_one_removed(growth, tmp_path):
    import tarfile

    jpgs = sorted(u for u in query(growth.ref, "SELECT uri FROM pool WHERE status = 'ok' AND uri LIKE '%.jpg'")
                  .column(0).to_pylist())[:9]
    shards = tmp_path / "shards"
    shards.mkdir()

    def shard(k: int) -> None:
        with tarfile.open(shards / f"s{k}.tar", "w") as tar:
            for j, path in enumerate(jpgs[3 * k : 3 * k + 3]):
                tar.add(path, arcname=f"{k:02d}{j:02d}.jpg")

    shard(0), shard(1)
    source, root = str(shards / "*.tar"), str(tmp_path / "cat")
    run_stage("ingest", root, {"source": source})
    shard(2)
    os.remove(shards / "s0.tar")
    result = run_stage("ingest", root, {"source": source})
    assert result.items_run == 1 and result.summary["removed"] == 3
    status = query(root, "SELECT split_part(uri, '#', 1) AS shard, status, count(*) AS n FROM pool "
                         "GROUP BY ALL ORDER BY ALL").to_pylist()
    assert [(os.path.basename(r["shard"]), r["status"], r["n"]) for r in status] == \
        [("s0.tar", "removed", 3), ("s1.tar", "ok", 3), ("s2.tar", "ok", 3)]
    scratch = str(tmp_path / "scratch")
    run_stage("ingest", scratch, {"source": source})
    assert query(root, POOL_SQL.format("WHERE status <> 'removed'")).to_pylist() == \
        query(scratch, POOL_SQL.format("")).to_pylist()


def test_cluster_and_sample_updates_cut_short_before_their_marker_redo_to_the_same_tables(clustered, tmp_path):
    """The state a kill between an update unit's shards and its ledger marker leaves behind."""
    base, rng = clustered
    root = shutil.copytree(base, str(tmp_path / "cat"))
    sample = {"target_size": 90, "report": False}
    run_stage("sample", root, sample)
    _add_embeddings(root, "batch1", np.arange(300, 330), np.concatenate([_blob(rng, c, 10) for c in range(3)]))
    for run, config, sql in (("cluster", CLUSTER, "SELECT * FROM clusters ORDER BY image_id"),
                             ("sample-lvd", sample, "SELECT * FROM curated_lvd ORDER BY ALL")):
        stage = run.split("-")[0]
        first = run_stage(stage, root, config)
        expected = query(root, sql).to_pylist()
        ledger = Ledger(root, run)
        last = max(ledger.done(), key=lambda name: (name.startswith("g"), name))  # the update's unit
        for name in (last, "_complete"):
            os.remove(os.path.join(ledger.dir, f"{name}.json"))
        again = run_stage(stage, root, config)
        assert query(root, sql).to_pylist() == expected and ledger.is_complete(), run
        assert again.units_run == 1 and again.summary.get("diff") == first.summary.get("diff")


def test_a_cluster_update_plans_by_shard_and_follows_a_rewritten_shard(clustered, tmp_path):
    """The plan lists the embeddings' shards, never their images; a shard rewritten without some images (and
    one image re-embedded into a new shard) drops their rows and assigns the new vector only."""
    base, rng = clustered
    root = shutil.copytree(base, str(tmp_path / "cat"))
    before = _clusters(root)
    _add_embeddings(root, "batch1", np.arange(300, 320), np.concatenate([_blob(rng, c, 5) for c in (0, 1, 2, 0)]))
    _add_embeddings(root, "batch2", np.arange(320, 330), np.concatenate([_blob(rng, c, 5) for c in (1, 2)]))
    run_stage("cluster", root, CLUSTER)
    members = Ledger(root, "cluster").plan().members
    keys = [key for pairs in members.values() for key, _ in pairs]
    assert sorted(keys) == [f"embeddings/{name}" for name in sorted(shard_sizes(root, "embeddings"))]
    assert len(json.dumps(members)) < 2_000  # three shards, whatever their rows
    grown = _clusters(root)
    ids, x = load_embeddings(root)
    first = ids < 300
    keep = first & (ids >= 11)
    _add_embeddings(root, "batch0", ids[keep], x[keep])  # ids 0-10 leave the first shard
    moved = _blob(rng, 7, 1)
    _add_embeddings(root, "batch3", np.array([10]), moved)  # id 10 re-embedded into a new shard
    result = run_stage("cluster", root, {**CLUSTER, "max_drift": 1.0})
    after = _clusters(root)
    assert sorted(after) == list(range(10, 330))
    assert {i: after[i] for i in after if i != 10} == {i: grown[i] for i in grown if i > 10}
    assert {i: grown[i] for i in before} == before
    centroids = query(root, "SELECT cluster_id, parent_id, centroid FROM centroids WHERE level = 1 ORDER BY 1")
    c1 = np.asarray(centroids.column("centroid").to_pylist())
    nearest = int(np.argmax(moved @ (c1 / np.linalg.norm(c1, axis=1, keepdims=True)).T))
    assert after[10] == (nearest, centroids.column("parent_id").to_pylist()[nearest])
    assert result.rows_run["clusters"] == 1 and result.summary["drift"]["new"] == 1
