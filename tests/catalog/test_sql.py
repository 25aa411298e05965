import hashlib
import os

import pyarrow as pa
import pytest

from catalog import schemas
from catalog.shards import write_shards
from catalog.sql import ReadOnlyError, SQLError, query
from pipelines.cli import main
from tests.sql_helpers import documented_queries, write_doc_catalog


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


# --- confinement: only reads, only of the catalog -------------------------------------------------

@pytest.mark.parametrize("statement", [
    "EXPLAIN ANALYZE COPY pool TO '{root}/pool/extra.parquet' (FORMAT parquet)",
    "EXPLAIN /* plan */ ANALYSE CREATE TABLE t AS SELECT 1",
    "EXPLAIN (ANALYZE, FORMAT json) COPY pool TO '{root}/pool/extra.parquet'",
    "explain\tanalyze SELECT 1",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
])
def test_explain_analyze_and_session_changes_are_refused(small_catalog, statement):
    before = _tree_digest(small_catalog)
    with pytest.raises(ReadOnlyError, match="read-only"):
        query(small_catalog, statement.format(root=small_catalog))
    assert _tree_digest(small_catalog) == before


def test_plain_explain_still_shows_the_plan(small_catalog):
    plan = query(small_catalog, "EXPLAIN SELECT status FROM pool WHERE image_id > 3").to_pylist()
    assert plan and "READ_PARQUET" in str(plan).upper()


def _duckdb_home_files() -> set[str]:
    home = os.path.expanduser("~/.duckdb")
    return {os.path.join(d, f) for d, _, files in os.walk(home) for f in files}


@pytest.mark.parametrize("probe", [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/proc/self/environ')",
    "SELECT * FROM glob('/**')",
    "SELECT * FROM read_text('{outside}')",
    "SELECT * FROM read_text('{root}/../secret.txt')",
    "SELECT * FROM read_csv('{outside}')",
    "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')",
    "SELECT * FROM read_parquet('s3://curate-test/x.parquet')",
    "SELECT * FROM sqlite_scan('{outside}', 't')",
    "SELECT * FROM query('SELECT * FROM read_text(''{outside}'')')",
])
def test_reads_outside_the_catalog_and_extension_loads_are_refused(small_catalog, tmp_path, probe):
    outside = tmp_path / "secret.txt"
    outside.write_text("the-secret-content\n")
    extensions_before = _duckdb_home_files()
    with pytest.raises(SQLError) as err:
        query(small_catalog, probe.format(outside=outside, root=small_catalog))
    assert "the-secret-content" not in str(err.value)
    assert _duckdb_home_files() == extensions_before  # nothing downloaded or installed


def test_the_connection_itself_refuses_installs_and_unlocking(small_catalog, tmp_path):
    """The second fence holds even for a statement the first one would let through."""
    import duckdb

    from catalog.sql import connect

    con = connect(small_catalog, str(tmp_path))
    try:
        for statement in ("INSTALL httpfs", "LOAD httpfs", "SET enable_external_access = true",
                          "SET allowed_directories = ['/']", "SELECT * FROM read_text('/etc/hostname')"):
            with pytest.raises(duckdb.Error):
                con.execute(statement)
        assert con.execute("SELECT count(*) FROM pool").fetchone() == (9,)
    finally:
        con.close()


def test_reads_inside_the_catalog_work(small_catalog):
    listed = query(small_catalog, f"SELECT count(*) FROM glob('{small_catalog}/pool/*.parquet')").column(0)[0]
    assert listed.as_py() == 1


@pytest.mark.parametrize("folder", ['pool" AS SELECT 42 AS injected; CREATE VIEW "x', "it's", 'a"b'])
def test_a_quote_in_a_table_folder_name_is_a_name_not_sql(tmp_path, folder):
    root = str(tmp_path / "cat")
    write_shards(root, "pool", "u", pa.table({"image_id": [1, 2, 3]}))
    write_shards(root, folder, "u", pa.table({"image_id": [7]}))
    quoted = '"' + folder.replace('"', '""') + '"'
    assert query(root, f"SELECT image_id FROM {quoted}").to_pylist() == [{"image_id": 7}]
    assert query(root, "SELECT count(*) AS n FROM pool").to_pylist() == [{"n": 3}]
    views = set(query(root, "SELECT view_name FROM duckdb_views() WHERE NOT internal").column(0).to_pylist())
    assert views == {"pool", folder}


def test_parameters_fill_placeholders_without_formatting(small_catalog):
    hostile = "lvd' OR '1'='1"
    assert query(small_catalog, "SELECT count(*) AS n FROM curated WHERE part = ?", [hostile]).to_pylist() == [{"n": 0}]
    named = query(small_catalog, "SELECT count(*) AS n FROM curated WHERE part = $p", {"p": "lvd"})
    assert named.to_pylist() == [{"n": 2}]


def test_every_documented_query_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = "cat"  # relative, as in the README
    write_doc_catalog(root)
    for sql in documented_queries():
        assert query(root, sql).num_rows > 0, sql
