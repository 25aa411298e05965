import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog import schemas
from catalog.ledger import Ledger, LedgerPlanError, Plan, PlanChange
from catalog.ledger_items import REMOVED, Item, ItemChange
from catalog.manifest import RunManifest, list_manifests
from catalog.shards import read_table, shard_urls, write_shards
from catalog.tables import describe, list_tables


def _pool(n: int, offset: int = 0) -> pa.Table:
    rows = [
        {"image_id": offset + i, "uri": f"f{offset + i}.jpg", "bytes": 10, "width": 4, "height": 3,
         "format": "JPEG", "sha256": "ab", "status": "ok"}
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=schemas.stamp(schemas.POOL, "pool"))


@pytest.mark.parametrize("root_kind", ["local", "memory"])
def test_shards_are_bounded_versioned_and_zstd(tmp_path, root_kind):
    root = str(tmp_path / "cat") if root_kind == "local" else f"memory://cat-{tmp_path.name}"
    urls = [s.url for s in write_shards(root, "pool", "unit-1", _pool(25), max_rows=10)]
    assert len(urls) == 3 and shard_urls(root, "pool") == sorted(urls)
    table = read_table(root, "pool")
    assert table.num_rows == 25 and table.column("image_id").to_pylist() == list(range(25))
    info = describe(root, "pool")
    assert (info.rows, info.shards, info.metadata["schema_version"]) == (25, 3, str(schemas.SCHEMA_VERSION))
    if root_kind == "local":
        meta = pq.ParquetFile(urls[0]).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
        assert not list((tmp_path / "cat" / "pool").glob("*.tmp-*"))  # no temp file left visible


def test_rewriting_a_unit_replaces_rows_instead_of_adding(tmp_path):
    root = str(tmp_path)
    write_shards(root, "pool", "u", _pool(5))
    write_shards(root, "pool", "u", _pool(5))
    write_shards(root, "pool", "v", _pool(2, offset=100))
    assert read_table(root, "pool").num_rows == 7


def test_newer_schema_version_is_refused(tmp_path):
    root = str(tmp_path)
    future = _pool(2).schema.with_metadata({**_pool(2).schema.metadata, schemas.VERSION_KEY: b"99"})
    write_shards(root, "pool", "u", _pool(2).cast(future))
    with pytest.raises(schemas.CatalogVersionError, match="schema version 99"):
        read_table(root, "pool")


def test_ledger_records_units_and_its_plan(tmp_path):
    ledger = Ledger(str(tmp_path), "ingest")
    plan = Plan({"k": 1}, {"pool": "a"}, {"files-000001": "f1"}, ["pool"])
    ledger.write_plan(plan)
    ledger.mark("files-000001", {"items": 3})
    ledger.mark_complete({"rows": 3})
    assert ledger.done() == {"files-000001": {"items": 3}} and ledger.plan() == plan
    assert ledger.is_complete() and ledger.completion() == {"rows": 3}
    with pytest.raises(LedgerPlanError, match="--overwrite"):
        ledger.refuse("other settings")
    ledger.reset()
    assert ledger.done() == {} and not ledger.is_complete() and ledger.plan() is None


def test_plan_change_tells_grown_from_different():
    old = Plan({"k": 1}, {"pool": "a"}, {"u1": "f1", "u2": "f2"})
    assert PlanChange.between(old, old).units_kind == "same"
    grown = PlanChange.between(old, Plan({"k": 1}, {"pool": "a"}, {"u1": "f1", "u2": "f2", "u3": "f3"}))
    assert grown.units_kind == "grown" and grown.added == ["u3"] and "grew by 1" in grown.describe_units()
    changed = PlanChange.between(old, Plan({"k": 2}, {"pool": "b"}, {"u1": "f1", "u2": "other"}))
    assert changed.units_kind == "different" and changed.changed == ["u2"]
    assert changed.settings == ["k"] and changed.inputs == ["pool"]
    vanished = PlanChange.between(old, Plan({"k": 1}, {"pool": "a"}, {"u1": "f1"}))
    assert vanished.units_kind == "different" and vanished.removed == ["u2"]


def test_item_change_appends_new_items_and_retires_vanished_and_changed_ones():
    members = {"u0": [["a", "1"], ["b", "1"], ["c", REMOVED]], "u1": [["d", "1"]], "u2": [["e", "1"], ["f", "1"]]}
    # b vanished, c reappeared, d changed, f vanished from the unfinished u2, g is new
    items = [Item(k, fp) for k, fp in (("a", "1"), ("c", "2"), ("d", "2"), ("e", "1"), ("g", "1"))]
    change = ItemChange.between(members, items, finished={"u0", "u1"})
    assert change.kept == {"u0": [["a", "1"], ["b", REMOVED]], "u1": []}
    assert change.retiring["u0"].vanished == {"b"} and change.retiring["u0"].changed == {"c"}
    assert change.retiring["u1"].vanished == set() and change.retiring["u1"].changed == {"d"}
    assert change.dissolved == ["u2"]  # unfinished and changed: its items are planned again
    assert [i.key for i in change.new] == ["c", "d", "e", "g"]
    assert (change.vanished, change.changed) == (1, 2)
    assert ItemChange.between(change.kept | {"n": [["c", "2"], ["d", "2"], ["e", "1"], ["g", "1"]]}, items,
                              finished={"u0", "u1", "n"}).empty


def test_item_change_in_place_keeps_a_rewritten_shard_in_its_unit_and_plans_it_again():
    members = {"u0": [["s0", "1"], ["s1", "1"]], "u1": [["s2", "1"]]}
    items = [Item("s0", "2"), Item("s2", "1"), Item("s3", "1")]  # s0 rewritten, s1 vanished, s3 new
    change = ItemChange.between(members, items, finished={"u0", "u1"}, in_place=True)
    assert change.kept == {"u0": [["s0", "2"], ["s1", REMOVED]], "u1": [["s2", "1"]]}
    assert change.retiring["u0"].changed == {"s0"} and change.retiring["u0"].vanished == {"s1"}
    assert [i.key for i in change.new] == ["s0", "s3"]


def test_manifest_records_run_facts(tmp_path):
    root = str(tmp_path)
    with RunManifest(root, "ingest", {"files_per_unit": 5}) as m:
        m.rows = {"in": 3, "out": 2, "errored": 1}
    with pytest.raises(RuntimeError):
        with RunManifest(root, "embed", {}):
            raise RuntimeError("boom")
    docs = list_manifests(root)
    assert [d["stage"] for d in docs] == ["ingest", "embed"] or [d["stage"] for d in docs] == ["embed", "ingest"]
    ingest = next(d for d in docs if d["stage"] == "ingest")
    assert ingest["status"] == "ok" and ingest["rows"] == {"in": 3, "out": 2, "errored": 1}
    assert ingest["peak_memory_mb"] > 0 and ingest["wall_seconds"] >= 0 and "git_commit" in ingest["code"]
    failed = next(d for d in docs if d["stage"] == "embed")
    assert failed["status"].startswith("failed: RuntimeError: boom")
    json.dumps(docs)


def test_list_tables_includes_parts_and_skips_internal_folders(tmp_path):
    root = str(tmp_path)
    write_shards(root, "pool", "u", _pool(1))
    cur = pa.table({"image_id": [1], "uri": ["a"], "part": ["lvd"]})
    write_shards(root, "curated/lvd", "u", cur)
    write_shards(root, "_staging/pool", "u", _pool(1))
    assert list_tables(root) == ["curated/lvd", "pool"]
