"""DuckDB over a catalog: every table is a view under its own name; only reads, only of the catalog.

Curated parts live in ``curated/<part>/`` and appear as ``curated_<part>`` plus one ``curated`` view
over all parts; ``duplicate_pairs`` is ``duplicates`` with the URIs of both images (``uri``, ``kept_uri``).
Object-store catalogs are read through the same fsspec filesystem as everything else.

Two fences, because ``curate sql`` runs whatever a user (or a script fed by others) types:

- the statement: anything but a query is refused before DuckDB sees it, and so is ``EXPLAIN ANALYZE``
  (it executes the statement it explains);
- the connection: once the views exist, DuckDB may read only below the catalog root
  (``enable_external_access = false`` with ``allowed_directories``), installs and loads no extension,
  scans no Python variables, and the configuration is locked. So ``read_text('/etc/passwd')``,
  ``glob('/**')``, ``http://``/``s3://`` URLs elsewhere and ``INSTALL`` all fail inside DuckDB.

A table with a bad shard (unreadable, or another table's: ``catalog.shards.check_shards``) gets no
view: queries of the other tables work, and a query that names it is refused with the bad file named.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence

import duckdb
import pyarrow as pa

from catalog.errors import UserError
from catalog.images import ABSOLUTE_URI, catalog_root_prefix
from catalog.paths import is_local, resolve
from catalog.schemas import DUPLICATES_TABLE, POOL_TABLE
from catalog.shards import CorruptShardError, check_shards
from catalog.tables import list_tables

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
# Parquet, JSON and ICU are linked into DuckDB's Python wheel: nothing needs loading.
_CONNECTION_CONFIG = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "python_enable_replacements": False,
}
Params = Sequence[object] | Mapping[str, object] | None
# Each duplicates row with the URIs of the removed image and the one kept (eval-set overlaps: kept_uri NULL).
PAIRS_VIEW = "duplicate_pairs"


class ReadOnlyError(UserError, PermissionError):
    """A statement other than a query was sent to a catalog."""


class SQLError(UserError, RuntimeError):
    """DuckDB rejected the query; carries DuckDB's own message."""


def view_name(table: str) -> str:
    return table.replace("/", "_")


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _allowed_prefixes(root: str) -> list[str]:
    """The catalog root as DuckDB spells the paths it opens (an fsspec store's in both URL forms)."""
    fs, path = resolve(root)
    if is_local(root):
        return [os.path.abspath(path).rstrip("/") + "/"]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    bare = path.strip("/")
    return [f"{protocol}://{bare}/", f"{protocol}:///{bare}/"]


def _create_views(con: duckdb.DuckDBPyConnection, root: str) -> dict[str, CorruptShardError]:
    """One view per table with good shards; returns the refusal of each table (view name) left out."""
    curated, broken = [], {}
    tables = list_tables(root)
    for table in tables:
        try:
            shards = check_shards(root, table)
        except CorruptShardError as e:
            broken[view_name(table)] = e
            continue
        files = [os.path.abspath(f) if is_local(f) else f for f in shards]
        listed = ", ".join(quote_literal(f) for f in files)
        view = quote_identifier(view_name(table))
        columns = "*"
        if any("uri" in schema.names for schema in shards.values()):  # catalog-relative URIs shown resolved
            prefix = quote_literal(catalog_root_prefix(root))
            columns = (f"* REPLACE (CASE WHEN regexp_matches(uri, {quote_literal(ABSOLUTE_URI)}) THEN uri "
                       f"ELSE {prefix} || uri END AS uri)")
        con.execute(f"CREATE VIEW {view} AS SELECT {columns} FROM read_parquet([{listed}], union_by_name=true)")
        if table.startswith("curated/"):
            curated.append(view)
    if any(name.startswith("curated_") for name in broken):
        broken["curated"] = next(e for name, e in broken.items() if name.startswith("curated_"))
    elif curated:
        union = " UNION ALL BY NAME ".join(f"SELECT * FROM {v}" for v in curated)
        con.execute(f"CREATE VIEW curated AS {union}")
    if {DUPLICATES_TABLE, POOL_TABLE} <= set(tables) - set(broken) and PAIRS_VIEW not in tables:
        con.execute(f"CREATE VIEW {PAIRS_VIEW} AS SELECT d.*, p.uri AS uri, k.uri AS kept_uri "
                    f"FROM {DUPLICATES_TABLE} d LEFT JOIN {POOL_TABLE} p ON p.image_id = d.image_id "
                    f"LEFT JOIN {POOL_TABLE} k ON k.image_id = d.kept_id")
    return broken


def connect(root: str, spill_dir: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per catalog table, confined to the catalog; refused
    (naming the file) if a table has a bad shard.

    ``spill_dir``: an empty private folder for DuckDB's temporary files (the one place outside the
    catalog it may still touch; its default would be ``./.tmp`` of whoever runs the query).
    """
    con, broken = _open(root, spill_dir)
    if broken:
        con.close()
        raise next(iter(broken.values()))
    return con


def _open(root: str, spill_dir: str) -> tuple[duckdb.DuckDBPyConnection, dict[str, CorruptShardError]]:
    """``connect``'s connection, and the refusal of each table (by view name) left without a view."""
    con = duckdb.connect(config=_CONNECTION_CONFIG)
    fs, _ = resolve(root)
    if not is_local(root):
        con.register_filesystem(fs)
    broken = _create_views(con, root)
    allowed = ", ".join(quote_literal(p) for p in _allowed_prefixes(root))
    con.execute(f"SET temp_directory = {quote_literal(spill_dir)}")
    con.execute(f"SET allowed_directories = [{allowed}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con, broken


def _keywords(statement: str) -> list[str]:
    """The keyword tokens of one statement, upper-cased (comments and string constants are not keywords)."""
    tokens = duckdb.tokenize(statement)
    ends = [start for start, _ in tokens[1:]] + [len(statement)]
    return [statement[start:end].strip().upper()
            for (start, kind), end in zip(tokens, ends) if kind == duckdb.token_type.keyword]


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
        if st.type == duckdb.StatementType.EXPLAIN and {"ANALYZE", "ANALYSE"} & set(_keywords(st.query)):
            raise ReadOnlyError("curate sql is read-only: EXPLAIN ANALYZE runs the statement it explains; "
                                "use EXPLAIN for the plan")


@contextlib.contextmanager
def connection(root: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A confined connection (``connect``) with a private spill folder, closed and cleaned up after use:
    for callers that run many statements (temporary tables included) over one catalog."""
    with tempfile.TemporaryDirectory(prefix="curate-sql-") as spill:
        con = connect(root, spill)
        try:
            yield con
        finally:
            con.close()


def query(root: str, sql: str, params: Params = None) -> pa.Table:
    """Run one read-only query over the catalog and return its result as Arrow.

    ``params`` fill ``?`` (a sequence) or ``$name`` (a mapping) placeholders: pass values (seed names,
    reasons) this way instead of formatting them into ``sql``.
    """
    check_read_only(sql)
    with tempfile.TemporaryDirectory(prefix="curate-sql-") as spill:
        con, broken = _open(root, spill)
        try:
            _refuse_broken(sql, broken)
            return con.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as e:
            raise SQLError(str(e)) from None
        finally:
            con.close()


def _refuse_broken(sql: str, broken: dict[str, CorruptShardError]) -> None:
    """A query of a table with a bad shard is refused with the shard named; other tables stay queryable."""
    if not broken:
        return
    named = {name.lower() for name in duckdb.get_table_names(sql)}
    for view, error in broken.items():
        if view.lower() in named:
            raise error
