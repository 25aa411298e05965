"""DuckDB over a catalog: every table is a view under its own name; only reads are allowed.

Curated parts live in ``curated/<part>/`` and appear as ``curated_<part>`` plus one ``curated`` view
over all parts. Object-store catalogs are read through the same fsspec filesystem as everything else.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from catalog.errors import UserError
from catalog.paths import resolve
from catalog.shards import shard_urls
from catalog.tables import list_tables

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class ReadOnlyError(UserError, PermissionError):
    """A statement other than a query was sent to a catalog."""


class SQLError(UserError, RuntimeError):
    """DuckDB rejected the query; carries DuckDB's own message."""


def view_name(table: str) -> str:
    return table.replace("/", "_")


def connect(root: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per catalog table."""
    con = duckdb.connect()
    fs, _ = resolve(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local"):
        con.register_filesystem(fs)
    curated = []
    for table in list_tables(root):
        files = shard_urls(root, table)
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(
            f'CREATE VIEW "{view_name(table)}" AS SELECT * FROM read_parquet([{listed}], union_by_name=true)'
        )
        if table.startswith("curated/"):
            curated.append(view_name(table))
    if curated:
        union = " UNION ALL BY NAME ".join(f'SELECT * FROM "{v}"' for v in curated)
        con.execute(f"CREATE VIEW curated AS {union}")
    return con


def check_read_only(sql: str) -> None:
    """Refuse anything but queries, before DuckDB sees it."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise SQLError(str(e)) from None
    if not statements:
        raise SQLError("no SQL statement given")
    for st in statements:
        if st.type not in ALLOWED:
            kind = st.type.name
            raise ReadOnlyError(
                f"curate sql is read-only: a {kind} statement would change the catalog or the "
                "session; only SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN are allowed"
            )


def query(root: str, sql: str) -> pa.Table:
    """Run one read-only query over the catalog and return its result as Arrow."""
    check_read_only(sql)
    con = connect(root)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as e:
        raise SQLError(str(e)) from None
    finally:
        con.close()
