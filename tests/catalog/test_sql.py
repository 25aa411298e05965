import hashlib
import os

import pyarrow as pa
import pytest

from catalog import schemas
from catalog.shards import write_shards
from catalog.sql import ReadOnlyError, SQLError, query
from pipelines.cli import main


@pytest.fixture()
def small_catalog(tmp_path) -> str:
    root = str(tmp_path / "cat")
    pool = pa.Table.from_pylist(
        [{"image_id": i, "uri": f"{i}.jpg", "bytes": 1, "width": 1, "height": 1, "format": "PNG",
          "sha256": "x", "status": "ok" if i % 3 else "error"} for i in range(9)],
        schema=schemas.stamp(schemas.POOL, "pool"),
    )
    write_shards(root, "pool", "u", pool)
    write_shards(root, "curated/lvd", "u", pa.table({"image_id": [1, 2], "uri": ["1", "2"], "part": ["lvd"] * 2}))
    write_shards(root, "curated/seed_demo", "u", pa.table({"image_id": [4], "uri": ["4"], "part": ["seed_demo"]}))
    return root


def _tree_digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_views_per_table_and_curated_union(small_catalog):
    counts = query(small_catalog, "SELECT status, count(*) AS n FROM pool GROUP BY 1 ORDER BY 1").to_pylist()
    assert counts == [{"status": "error", "n": 3}, {"status": "ok", "n": 6}]
    parts = query(small_catalog, "SELECT part, count(*) AS n FROM curated GROUP BY 1 ORDER BY 1").to_pylist()
    assert parts == [{"part": "lvd", "n": 2}, {"part": "seed_demo", "n": 1}]
    assert query(small_catalog, "SELECT count(*) AS n FROM curated_lvd").to_pylist() == [{"n": 2}]


@pytest.mark.parametrize("statement", [
    "DROP VIEW pool",
    "COPY pool TO '{root}/pool/extra.parquet' (FORMAT parquet)",
    "CREATE TABLE t AS SELECT 1",
    "ATTACH '{root}/x.db'",
    "SELECT 1; DELETE FROM pool",
])
def test_writes_are_refused_and_catalog_unchanged(small_catalog, statement, capsys):
    before = _tree_digest(small_catalog)
    with pytest.raises(ReadOnlyError, match="read-only"):
        query(small_catalog, statement.format(root=small_catalog))
    assert main(["sql", statement.format(root=small_catalog), "--catalog", small_catalog]) == 2
    assert "read-only" in capsys.readouterr().err
    assert _tree_digest(small_catalog) == before


def test_sql_errors_show_duckdb_message_not_traceback(small_catalog, capsys):
    with pytest.raises(SQLError, match="nope"):
        query(small_catalog, "SELECT nope FROM pool")
    assert main(["sql", "SELECT nope FROM pool", "--catalog", small_catalog]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_output_formats(small_catalog, tmp_path, fmt):
    out = str(tmp_path / f"r.{fmt}")
    assert main(["sql", "SELECT image_id FROM pool ORDER BY 1", "--catalog", small_catalog,
                 "--format", fmt, "--out", out]) == 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(out).column("image_id").to_pylist() == list(range(9))
    else:
        text = open(out).read()
        assert text.count("\n") == (10 if fmt == "csv" else 9)


def test_table_format_to_stdout(small_catalog, capsys):
    assert main(["sql", "SELECT status, count(*) FROM pool GROUP BY 1", "--catalog", small_catalog]) == 0
    out = capsys.readouterr().out
    assert "status" in out and "ok" in out and "error" in out
