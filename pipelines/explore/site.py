"""Build the explore site of a catalog: data per page, thumbnails, static assets, in that order.

The work is linear in the images shown (caps times pages) plus a few DuckDB passes over the pool's
tables; the data behind every page is one small file, so no page grows with the pool.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict

import duckdb
import numpy as np
import pyarrow as pa

from catalog.config import ConfigError
from catalog.errors import MissingInputError
from catalog.paths import join
from catalog.shards import read_table
from catalog.sql import connection, view_name
from catalog.tables import describe, list_tables
from pipelines.executors import Executor
from pipelines.explore import pages, tree
from pipelines.explore.config import ExploreConfig
from pipelines.explore.writer import copy_static, write_data, write_many
from pipelines.stage import StageResult, run_stage
from pipelines.stages.thumbnails import INDEX_TABLE, write_shown

REQUIRED = ("pool", "clusters", "centroids")


def default_out(root: str) -> str:
    return join(root, "reports", "explore")


def _check_tables(root: str, tables: list[str]) -> None:
    missing = [t for t in REQUIRED if t not in tables]
    if missing:
        raise MissingInputError(f"catalog {root} has no {', '.join(missing)} table: run `curate build-lvd` "
                                "(or ingest, embed and cluster) before `curate explore`")


def _ensure_optional_views(con: duckdb.DuckDBPyConnection, tables: list[str]) -> None:
    """Empty stand-ins for the tables a catalog may not have yet, so every query reads the same names."""
    stand_ins = {
        "duplicates": "SELECT 0::BIGINT AS image_id, 0::BIGINT AS kept_id, 0::FLOAT AS similarity, "
                      "''::VARCHAR AS reason WHERE false",
        "retrieved": "SELECT 0::BIGINT AS image_id, ''::VARCHAR AS seed, 0::BIGINT AS seed_image_id, "
                     "0::INTEGER AS rank, 0::FLOAT AS similarity WHERE false",
        "errors": "SELECT 0::BIGINT AS image_id, ''::VARCHAR AS uri, ''::VARCHAR AS stage, ''::VARCHAR AS reason, "
                  "''::VARCHAR AS message WHERE false",
    }
    for name, sql in stand_ins.items():
        if name not in tables:
            con.execute(f"CREATE VIEW {name} AS {sql}")


def shown_images(con: duckdb.DuckDBPyConnection) -> tuple[np.ndarray, list[str]]:
    """Every image any page shows, once, in the order of the first page showing it, with its URI."""
    kinds = "[" + ", ".join(f"'{k}'" for k in tree.KINDS) + "]"
    t = con.sql(f"""
        WITH refs AS (
            SELECT n.page, list_position({kinds}, s.kind) AS kind, s.pos, s.image_id
            FROM shown s JOIN nodes n USING (level, id)
            UNION ALL SELECT page + (SELECT count(*) FROM nodes WHERE page IS NOT NULL), 10 + kind, pos, image_id
            FROM extra_shown),
        ordered AS (SELECT image_id, min(o) AS o FROM
                    (SELECT image_id, row_number() OVER (ORDER BY page, kind, pos) AS o FROM refs) GROUP BY 1)
        SELECT o.image_id, coalesce(p.uri, su.uri) AS uri, o.o FROM ordered o
        LEFT JOIN pool p USING (image_id) LEFT JOIN seed_uris su USING (image_id)
        WHERE coalesce(p.uri, su.uri) IS NOT NULL ORDER BY o.o""").to_arrow_table()
    con.register("shown_arrow", t)
    con.execute("CREATE TEMP TABLE shown_ids AS SELECT image_id, uri FROM shown_arrow")
    con.unregister("shown_arrow")
    return t.column("image_id").to_numpy(), t.column("uri").to_pylist()


def create_imgs(con: duckdb.DuckDBPyConnection) -> None:
    """``imgs``: what a page needs to draw an image: its id (as text: JS numbers hold 53 bits), URI,
    thumbnail sheet and cell (null when it could not be decoded) and the curated parts holding it."""
    con.execute("""CREATE TEMP TABLE imgs AS
                   SELECT s.image_id, {i: s.image_id::VARCHAR, u: s.uri, s: t.sheet, c: t.cell,
                                       p: coalesce(m.parts, [])} AS img
                   FROM shown_ids s LEFT JOIN thumbs t ON t.image_id = s.image_id AND t.status = 'ok'
                   LEFT JOIN m ON m.image_id = s.image_id""")


def _nodes(con: duckdb.DuckDBPyConnection, n_levels: int, config: ExploreConfig) -> Iterator[tuple[str, str]]:
    for level in range(config.deepest_level, n_levels + 1):
        for batch in tree.node_documents(con, level, n_levels, config).to_arrow_reader(2048):
            for node_id, doc in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                yield f"nodes/l{level}/{node_id}", doc


def _level_counts(con: duckdb.DuckDBPyConnection) -> list[dict]:
    rows = con.sql("SELECT level, count(*), sum(pool) FROM nodes GROUP BY 1 ORDER BY 1").fetchall()
    return [{"level": lv, "clusters": n, "images": int(s)} for lv, n, s in rows]


def _part_totals(con: duckdb.DuckDBPyConnection, parts: list[str]) -> list[dict]:
    out = []
    for i, part in enumerate(parts):
        total = tree.scalar(con, f'SELECT count(*) FROM "{view_name("curated/" + part)}"')
        clustered = tree.scalar(con, f"SELECT count(*) FROM m WHERE in_{i}")
        out.append({"name": part, "images": total, "clustered": clustered})
    return out


def build_thumbnails(site: str, ids: np.ndarray, uris: list[str], config: ExploreConfig, *, overwrite: bool = False,
                     executor: Executor = "auto", address: str | None = None) -> tuple[pa.Table, StageResult]:
    """The ``thumbnails`` stage on the site folder for these images (in page order): its index and result."""
    write_shown(site, ids, uris)
    result = run_stage("thumbnails", site, config.thumbnails(), overwrite=overwrite, executor=executor,
                       address=address)
    return read_table(site, INDEX_TABLE), result


def build_site(root: str, out: str | None = None, config: ExploreConfig | None = None, *, overwrite: bool = False,
               executor: Executor = "auto", address: str | None = None) -> dict:
    """Write the site for ``root`` into ``out`` (default ``<root>/reports/explore``); returns what was built.
    ``overwrite``, ``executor`` and ``address`` go to the thumbnails stage (the pages are always rewritten)."""
    config = config or ExploreConfig()
    site = out or default_out(root)
    start = time.time()
    tables = list_tables(root)
    _check_tables(root, tables)
    with connection(root) as con:
        n_levels = tree.level_count(con)
        if config.deepest_level > n_levels:
            raise ConfigError(f"deepest_level={config.deepest_level} but the catalog has {n_levels} levels")
        _ensure_optional_views(con, tables)
        parts = [t.split("/", 1)[1] for t in tables if t.startswith("curated/")]
        tree.prepare_members(con, n_levels, [view_name(f"curated/{p}") for p in parts])
        tree.prepare_nodes(con, n_levels, len(parts))
        if tree.scalar(con, "SELECT count(*) FROM m") == 0:
            raise MissingInputError(f"the clusters table of {root} is empty: nothing to explore")
        node_pages = tree.assign_pages(con, n_levels, config.deepest_level)
        tree.add_strips(con, n_levels, config)
        tree.add_members(con, n_levels, config)
        tree.add_child_thumbs(con, n_levels, config)
        tree.add_node_duplicates(con, n_levels, config)
        tree.add_neighbours(con, n_levels, config)
        pages.create_extra_shown(con)
        dup_pages = pages.prepare_duplicates(con, config, 0)
        seeds = pages.prepare_retrieval(con, root, config, dup_pages)
        ids, uris = shown_images(con)
        planned = time.time()

        index, thumbs = build_thumbnails(site, ids, uris, config, overwrite=overwrite, executor=executor,
                                         address=address)
        con.register("thumbs", index)
        create_imgs(con)
        thumbed = time.time()

        n_nodes, largest = write_many(site, _nodes(con, n_levels, config))
        if n_nodes != node_pages:
            raise RuntimeError(f"wrote {n_nodes} cluster pages but the tree has {node_pages} nodes with a page")
        sizes = [largest]
        for page, doc in pages.duplicate_pages(con, config):
            sizes.append(write_data(site, f"dups/{page}", doc))
        for page, doc in pages.retrieval_pages(con):
            sizes.append(write_data(site, f"retrieval/{page}", doc))
        sizes.append(write_data(site, "errors", pages.errors_document(con, config)))
        sizes.append(write_data(site, "runs", pages.runs_document(root, config)))
        pool_rows = describe(root, "pool").rows
        n_shards = max(1, math.ceil(pool_rows / config.search_rows_per_shard))
        empty = set(range(n_shards))
        for shard, doc in pages.search_shards(con, n_levels, n_shards):
            sizes.append(write_data(site, f"search/{shard}", doc))
            empty.discard(shard)
        for shard in empty:  # app.js loads a shard by id, so every one exists
            sizes.append(write_data(site, f"search/{shard}", "[]"))
        summary = {
            "catalog": root,
            "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "tables": [{"name": t, "rows": describe(root, t).rows} for t in tables],
            "levels": _level_counts(con),
            "n_levels": n_levels,
            "deepest_level": config.deepest_level,
            "parts": _part_totals(con, parts),
            "top": json.loads(tree.top_children(con, n_levels, config)),
            "n_top": tree.scalar(con, f"SELECT count(*) FROM nodes WHERE level = {n_levels}"),
            "duplicates": {"totals": pages.duplicate_totals(con), "pages": dup_pages,
                           "groups": tree.scalar(con, "SELECT count(*) FROM dup_groups")},
            "seeds": seeds,
            "errors": tree.scalar(con, "SELECT count(*) FROM errors"),
            "search": {"shards": n_shards, "columns": pages.SEARCH_COLUMNS, "rows": pool_rows},
            "thumb": {"size": config.thumb_size, "cols": config.sheet_cols},
            "config": asdict(config),
        }
        sizes.append(write_data(site, "summary", json.dumps(summary)))
        copy_static(site)
    return {"site": site, "index": join(site, "index.html"), "node_pages": n_nodes, "images_shown": len(ids),
            "thumbnails": thumbs, "largest_data_file": max(sizes),
            "seconds": {"plan": planned - start, "thumbnails": thumbed - planned, "pages": time.time() - thumbed,
                        "total": time.time() - start}}
