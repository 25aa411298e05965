"""The stage runner on a small pool, in-process: done depends on input content, overwrite leaves no stale
row, a unit committed without its marker is redone without duplicates, settings are checked at load."""

import json
import os
import shutil

import pytest

from catalog.config import ConfigError, load_config
from catalog.embeddings import embedding_metadata
from catalog.ledger import Ledger, LedgerPlanError
from catalog.lineage import table_state
from catalog.sql import query
from pipelines.build_lvd import BuildLVDConfig, build_lvd
from pipelines.demo.job import DEMO_BACKBONE, DEMO_SETTINGS
from pipelines.stage import run_stage
from tests.helpers import run_cli

TARGET = 30
SETTINGS = [*DEMO_SETTINGS, "embed.images_per_unit=32", "cluster.n_levels=3", "cluster.resampling_steps=2",
            f"sample.target_size={TARGET}"]


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> str:
    from pipelines.demo.pool import generate_demo_pool

    out = str(tmp_path_factory.mktemp("small") / "pool_root")
    generate_demo_pool(out, n=120, seed=5, workers=1)
    return out


@pytest.fixture(scope="module")
def small_lvd(small_pool, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("small_lvd") / "cat")
    build_lvd(root, load_config(BuildLVDConfig, None, SETTINGS), source=os.path.join(small_pool, "pool"))
    return root


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_every_stage_of_build_lvd_ran_in_process_and_records_its_fingerprints(small_lvd):
    runs = {m["stage"]: m for m in json.loads(json.dumps(_manifests(small_lvd)))}
    assert {"ingest", "embed", "dedup", "cluster", "sample-lvd"} <= set(runs)
    for name in ("ingest", "embed"):
        assert runs[name]["notes"]["executor"] == "local"  # 120 files: no Ray start-up
    embed = runs["embed"]
    assert len(embed["outputs"]["embeddings"]) == 64 and embed["rows"]["out"] == embed["rows"]["in"] > 0
    # what cluster recorded as its input is the embeddings table as it is now
    assert runs["cluster"]["inputs"]["embeddings"] == table_state(small_lvd, "embeddings").fingerprint
    assert runs["sample-lvd"]["inputs"]["clusters"] == table_state(small_lvd, "clusters").fingerprint
    # the errors table exists even where a stage wrote no error row, so the README's query works
    assert query(small_lvd, "SELECT count(*) FROM errors WHERE stage = 'embed'").column(0)[0].as_py() == 0


def _manifests(root: str) -> list[dict]:
    from catalog.manifest import list_manifests

    return list_manifests(root)


def test_demo_backbone_export_needs_no_image_size(small_lvd):
    meta = embedding_metadata(small_lvd)
    assert meta["model"] == "curate" and "center64" in meta["preprocess"]
    assert json.loads(meta["embed_config"])["image_size"] == 64
    assert meta["model_source"] == f"curate:{DEMO_BACKBONE}"


def test_same_weights_by_a_relative_path_are_the_same_model(small_lvd, tmp_path, monkeypatch):
    root = _copy(small_lvd, str(tmp_path / "cat"))
    monkeypatch.chdir(os.path.dirname(DEMO_BACKBONE))
    relative = [f"model=curate:{os.path.basename(DEMO_BACKBONE)}", "pooling=cls+mean", "images_per_unit=32"]
    result = run_cli(["embed", "--catalog", root, "--set", *relative])
    assert result.returncode == 0, result.stderr
    assert "0 images embedded in this run" in result.stdout


def test_reembedding_reruns_cluster_sample_and_retrieve_and_refreshes_the_report(small_pool, small_lvd, tmp_path):
    root = _copy(small_lvd, str(tmp_path / "cat"))
    seed = os.path.join(small_pool, "seed")
    assert run_cli(["retrieve", "--catalog", root, "--seed", seed, "--mode", "knn"]).returncode == 0
    before = {sql: query(root, sql).to_pylist() for sql in
              ("SELECT * FROM clusters ORDER BY image_id", "SELECT image_id FROM curated_lvd ORDER BY 1",
               "SELECT image_id, rank FROM retrieved ORDER BY 1, 2")}
    report = os.path.join(root, "reports", "lvd", "cluster_sizes.png")
    os.utime(report, (0, 0))
    # another backbone: pooling cls instead of cls+mean
    other = [s.replace("cls+mean", "cls") for s in SETTINGS]
    assert run_cli(["embed", "--catalog", root, "--overwrite",
                    "--set", *(s.split(".", 1)[1] for s in other if s.startswith("embed."))]).returncode == 0
    result = run_cli(["build-lvd", "--catalog", root, "--target-size", str(TARGET), "--set", *other])
    assert result.returncode == 0, result.stderr
    assert "input embeddings, embeddings_model changed since it last ran: rerunning cluster from scratch" \
        in result.stderr
    assert "== build-lvd: cluster (already done)" not in result.stderr
    assert "input clusters changed" in result.stderr  # sample reran on the new clusters
    assert os.path.getmtime(report) > 0
    again = run_cli(["retrieve", "--catalog", root, "--seed", seed, "--mode", "knn"])
    assert again.returncode == 0 and "input embeddings" in again.stderr
    after = {sql: query(root, sql).to_pylist() for sql in before}
    assert after != before
    assert all(len(after[sql]) > 0 for sql in after)
    assert query(root, "SELECT count(*) - count(DISTINCT image_id) FROM clusters").column(0)[0].as_py() == 0


def test_changed_settings_are_refused_until_overwrite(small_lvd, tmp_path):
    root = _copy(small_lvd, str(tmp_path / "cat"))
    with pytest.raises(LedgerPlanError, match=r"target_size: 30 -> 20"):
        run_stage("sample", root, {"target_size": 20})
    result = run_stage("sample", root, {"target_size": 20}, overwrite=True)
    assert result.summary["out"] == 20 and query(root, "SELECT count(*) FROM curated_lvd").column(0)[0].as_py() == 20


def test_a_shrunk_source_marks_the_vanished_files_removed_and_overwrite_drops_them(small_pool, tmp_path):
    src = shutil.copytree(os.path.join(small_pool, "pool"), str(tmp_path / "src"), symlinks=True)
    root = str(tmp_path / "cat")
    run_stage("ingest", root, {"source": src, "files_per_unit": 40})
    n = query(root, "SELECT count(*) FROM pool").column(0)[0].as_py()
    broken = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)[:10]
    for path in broken:
        os.remove(path)
    result = run_stage("ingest", root, {"source": src, "files_per_unit": 40})
    assert result.summary["removed"] == len(broken) and result.items_run == 0
    removed = query(root, "SELECT uri FROM pool WHERE status = 'removed' ORDER BY uri").column(0).to_pylist()
    assert removed == broken and query(root, "SELECT count(*) FROM pool").column(0)[0].as_py() == n
    run_stage("ingest", root, {"source": src, "files_per_unit": 40}, overwrite=True)
    assert query(root, "SELECT count(*) FROM pool").column(0)[0].as_py() == n - len(broken) > 0
    assert not set(query(root, "SELECT uri FROM pool").column(0).to_pylist()) & set(broken)


def test_overwrite_deletes_what_the_earlier_settings_wrote(small_lvd, tmp_path):
    root = _copy(small_lvd, str(tmp_path / "cat"))
    run_stage("mix", root, {"parts": {"pool": {"source": "pool"}, "lvd": {"source": "lvd"}}})
    run_stage("mix", root, {"parts": {"lvd": {"source": "lvd"}}}, overwrite=True)
    parts = query(root, "SELECT DISTINCT part FROM curated").column(0).to_pylist()
    assert parts == ["lvd"]  # curated/pool of the earlier mix is gone


@pytest.mark.parametrize(("run", "table", "args"), [
    ("sample-lvd", "curated_lvd", ["sample", "--target-size", str(TARGET)]),
    ("mix", "curated", ["mix", "--set", "parts={pool: {source: pool}, lvd: {source: lvd}}"]),
    ("pack-lvd", "packed_lvd_index", ["pack", "--part", "lvd", "--images-per-shard", "8"]),
])
def test_unit_committed_without_its_marker_is_redone_without_duplicates(small_lvd, tmp_path, run, table, args):
    """The state a kill between a unit's shards and its ledger marker leaves behind."""
    root = _copy(small_lvd, str(tmp_path / "cat"))
    assert run_cli([args[0], "--catalog", root, *args[1:]]).returncode == 0
    sql = f"SELECT * FROM {table} ORDER BY ALL"
    expected = query(root, sql).to_pylist()
    ledger = Ledger(root, run)
    units = sorted(ledger.done())
    for name in [units[-1], "_complete"]:
        os.remove(os.path.join(ledger.dir, f"{name}.json"))
    result = run_cli([args[0], "--catalog", root, *args[1:]])
    assert result.returncode == 0, result.stderr
    assert query(root, sql).to_pylist() == expected and ledger.is_complete()


@pytest.mark.parametrize("args", [
    ["cluster", "--levels", "-1"], ["cluster", "--levels", "0"], ["cluster", "--set", "n_iter=0"],
    ["embed", "--set", "image_size=0"], ["embed", "--set", "image_size=1"], ["embed", "--set", "batch_size=0"],
    ["ingest", "x", "--set", "max_pixels=0"], ["retrieve", "--seed", "demo", "--k", "0"],
    ["retrieve", "--seed", "demo", "--max-per-seed", "-1"], ["pack", "--part", "lvd", "--images-per-shard", "-1"],
    ["build-lvd", "--source", "x", "--target-size", "-5"],
])
def test_bad_settings_fail_at_load_before_any_work(tmp_path, args):
    root = str(tmp_path / "cat")
    result = run_cli([*args, "--catalog", root])
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not os.path.exists(root)  # nothing was written: the check came first


def test_embed_refuses_a_worker_bigger_than_any_node(small_lvd, tmp_path):
    root = _copy(small_lvd, str(tmp_path / "cat"))
    with pytest.raises(ConfigError, match="actor_cpus=1 |num_cpus=100"):
        run_stage("embed", root, {"model": f"curate:{DEMO_BACKBONE}", "pooling": "cls", "actor_cpus": 100.0},
                  overwrite=True, executor="ray")


def test_a_billion_laughs_value_gives_a_short_error(tmp_path):
    from pipelines.stages.dedup import DedupConfig

    anchors = ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):  # each level nine aliases of the last: 9^9 strings if ever expanded
        anchors.append(f"&{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("k: [" + ", ".join(anchors) + "]\n")
    with pytest.raises(ConfigError, match="k: expected an integer") as e:
        load_config(DedupConfig, str(path))
    assert len(str(e.value)) < 300


def test_a_unit_whose_marker_cannot_be_written_leaves_no_rows(tmp_path):
    """A full disk can refuse the ledger marker after the unit's shards landed: the rows go with it."""
    import pyarrow as pa

    from catalog import schemas
    from pipelines.stage import CatalogSink, Output, Unit

    root = str(tmp_path / "cat")
    rows = pa.Table.from_pylist([{"image_id": i, "uri": f"{i}.png", "bytes": 1, "width": 1, "height": 1,
                                  "format": "PNG", "sha256": "x", "status": "ok"} for i in range(3)],
                                schema=schemas.POOL)
    sink = CatalogSink(root, "ingest", ("pool",))
    sink.write(Unit("u0", {}, 3, "f0"), Output({"pool": rows}), 0.0)
    blocked = os.path.join(Ledger(root, "ingest").dir, "u1.json")
    os.makedirs(os.path.join(blocked, "x"))  # the marker's name is taken: its rename fails
    with pytest.raises(OSError):
        sink.write(Unit("u1", {}, 3, "f1"), Output({"pool": rows}), 0.0)
    shutil.rmtree(blocked)
    assert sorted(Ledger(root, "ingest").done()) == ["u0"]
    assert len(query(root, "SELECT * FROM pool")) == 3
