"""The site's pages besides the tree: duplicates, retrieval, errors, runs, the search index, the summary.

Each is built by DuckDB group-bys over the catalog's views (and the temp tables of ``tree``), as JSON
text; images a page shows are registered in ``extra_shown`` (page order, kind, position, image id) so
their thumbnails are built with the tree's, in page order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import duckdb

from catalog.manifest import list_manifests
from catalog.paths import join
from catalog.shards import shard_urls
from pipelines.explore.config import ExploreConfig
from pipelines.explore.tree import json_similarity, scalar

# The search index's rows are arrays (keys would triple its size); app.js reads them by these names.
SEARCH_COLUMNS = ["id", "uri", "status", "clusters", "parts", "kept_id", "dup_reason", "sheet", "cell"]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_extra_shown(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE TEMP TABLE extra_shown (page BIGINT, kind INTEGER, pos BIGINT, image_id BIGINT)")


def prepare_duplicates(con: duckdb.DuckDBPyConnection, config: ExploreConfig, first_page: int) -> int:
    """``dup_groups`` (largest first) and ``dup_shown``; returns the number of duplicate pages."""
    con.execute("""CREATE TEMP TABLE dup_groups AS
                   SELECT reason, kept_id, count(*) AS n,
                          row_number() OVER (ORDER BY count(*) DESC, reason, kept_id) - 1 AS g
                   FROM duplicates GROUP BY reason, kept_id QUALIFY g < ?""", [config.dup_groups])
    con.execute("""CREATE TEMP TABLE dup_shown AS
                   SELECT g.g, d.image_id, d.similarity, row_number() OVER
                          (PARTITION BY g.g ORDER BY d.similarity DESC NULLS LAST, d.image_id) AS pos
                   FROM duplicates d JOIN dup_groups g USING (reason, kept_id) QUALIFY pos <= ?""",
                [config.dup_per_group])
    per_page, stride = config.dup_groups_per_page, config.dup_per_group + 1
    con.execute("""INSERT INTO extra_shown
                   SELECT ? + g // ?, 0, g * ?, kept_id FROM dup_groups WHERE kept_id <> -1 UNION ALL
                   SELECT ? + g // ?, 0, g * ? + pos, image_id FROM dup_shown""",
                [first_page, per_page, stride, first_page, per_page, stride])
    n_groups = scalar(con, "SELECT count(*) FROM dup_groups")
    return math.ceil(n_groups / per_page)


def duplicate_pages(con: duckdb.DuckDBPyConnection, config: ExploreConfig) -> Iterator[tuple[int, str]]:
    """``(page, json)``: each group's kept image, then its removed images with their similarity."""
    rows = con.sql(f"""
        WITH removed AS (
            SELECT s.g, list({{img: i.img, similarity: {json_similarity('s.similarity')}}} ORDER BY s.pos) AS removed
            FROM dup_shown s JOIN imgs i USING (image_id) GROUP BY s.g)
        SELECT g.g // {config.dup_groups_per_page} AS page,
               to_json(list({{idx: g.g, reason: g.reason, n: g.n, kept: k.img, removed: r.removed}}
                            ORDER BY g.g))::VARCHAR
        FROM dup_groups g JOIN removed r USING (g) LEFT JOIN imgs k ON k.image_id = g.kept_id
        GROUP BY page ORDER BY page""").fetchall()
    yield from rows


def duplicate_totals(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Per reason: images removed and the groups they form (every group, not only the listed ones)."""
    t = con.sql("SELECT reason, count(*) AS removed, count(DISTINCT kept_id) AS groups FROM duplicates "
                "GROUP BY reason ORDER BY removed DESC, reason").fetchall()
    return [{"reason": r, "removed": n, "groups": g} for r, n, g in t]


def prepare_retrieval(con: duckdb.DuckDBPyConnection, root: str, config: ExploreConfig, first_page: int
                      ) -> list[dict]:
    """``retr_groups`` and ``retr_shown`` per seed; ``seed_uris`` from the seeds' own small catalogs.

    A kNN seed's rows are grouped by seed image; a cluster-mode seed's (``seed_image_id = -1``: no
    single seed image; real ids are hashes and may be negative) by the pool cluster (level 1) they
    were taken from. Returns the seeds with their totals, in page order.
    """
    seeds = con.sql("SELECT seed, count(*) AS n, count(DISTINCT seed_image_id) FILTER (WHERE seed_image_id <> -1) "
                    "FROM retrieved GROUP BY seed ORDER BY seed").fetchall()
    seed_tables = []
    for seed, _, _ in seeds:
        urls = shard_urls(join(root, "_seeds", seed), "pool")
        if urls:
            listed = ", ".join(_literal(u) for u in urls)
            seed_tables.append(f"SELECT image_id, uri FROM read_parquet([{listed}], union_by_name=true)")
    con.execute("CREATE TEMP TABLE seed_uris AS " + (" UNION ALL ".join(seed_tables) if seed_tables else
                                                       "SELECT 0::BIGINT AS image_id, ''::VARCHAR AS uri WHERE false"))
    con.execute("CREATE TEMP TABLE seed_pages AS SELECT seed, row_number() OVER (ORDER BY seed) - 1 AS s "
                "FROM (SELECT DISTINCT seed FROM retrieved)")
    con.execute("""CREATE TEMP TABLE retr_rows AS
                   SELECT r.seed, p.s, r.image_id, r.rank, r.similarity,
                          CASE WHEN r.seed_image_id <> -1 THEN r.seed_image_id END AS seed_image,
                          CASE WHEN r.seed_image_id = -1 THEN m.l1 END AS cluster
                   FROM retrieved r JOIN seed_pages p USING (seed) LEFT JOIN m USING (image_id)""")
    con.execute("""CREATE TEMP TABLE retr_groups AS
                   SELECT s, seed_image, cluster, count(*) AS n,
                          row_number() OVER (PARTITION BY s ORDER BY count(*) DESC, seed_image, cluster) - 1 AS g
                   FROM retr_rows GROUP BY s, seed_image, cluster QUALIFY g < ?""", [config.retrieval_seed_images])
    con.execute("""CREATE TEMP TABLE retr_shown AS
                   SELECT g.s, g.g, r.image_id, r.rank, r.similarity,
                          row_number() OVER (PARTITION BY g.s, g.g ORDER BY r.rank, r.image_id) AS pos
                   FROM retr_rows r JOIN retr_groups g ON g.s = r.s AND g.seed_image IS NOT DISTINCT FROM r.seed_image
                        AND g.cluster IS NOT DISTINCT FROM r.cluster
                   QUALIFY pos <= ?""", [config.retrieved_per_seed_image])
    stride = config.retrieved_per_seed_image + 1
    con.execute("""INSERT INTO extra_shown
                   SELECT ? + s, 1, g * ?, seed_image FROM retr_groups WHERE seed_image IS NOT NULL UNION ALL
                   SELECT ? + s, 1, g * ? + pos, image_id FROM retr_shown""",
                [first_page, stride, first_page, stride])
    return [{"seed": seed, "page": i, "retrieved": n, "seed_images": k} for i, (seed, n, k) in enumerate(seeds)]


def retrieval_pages(con: duckdb.DuckDBPyConnection) -> Iterator[tuple[int, str]]:
    """``(seed page, json)``: groups (a seed image or a pool cluster), each with what it retrieved."""
    rows = con.sql(f"""
        WITH shown AS (
            SELECT s.s, s.g, list({{img: i.img, rank: s.rank, similarity: {json_similarity('s.similarity')}}}
                                  ORDER BY s.pos) AS retrieved
            FROM retr_shown s JOIN imgs i USING (image_id) GROUP BY ALL)
        SELECT g.s, to_json(list({{seed: k.img, cluster: g.cluster, n: g.n, retrieved: sh.retrieved}}
                                 ORDER BY g.g))::VARCHAR
        FROM retr_groups g JOIN shown sh USING (s, g) LEFT JOIN imgs k ON k.image_id = g.seed_image
        GROUP BY g.s ORDER BY g.s""").fetchall()
    yield from rows


def errors_document(con: duckdb.DuckDBPyConnection, config: ExploreConfig) -> str:
    """Counts per stage and reason, and the first few examples of each reason."""
    return scalar(con, """
        WITH counts AS (SELECT stage, reason, count(*) AS n FROM errors GROUP BY ALL),
        examples AS (SELECT reason, list({id: image_id::VARCHAR, uri: uri, stage: stage, message: message}
                                         ORDER BY image_id) AS examples
                     FROM (SELECT * FROM errors QUALIFY row_number() OVER (PARTITION BY reason ORDER BY image_id) <= ?)
                     GROUP BY reason)
        SELECT to_json({counts: (SELECT coalesce(list({stage: stage, reason: reason, n: n} ORDER BY n DESC, reason),
                                                 []) FROM counts),
                        examples: (SELECT coalesce(list({reason: reason, examples: examples} ORDER BY reason), [])
                                   FROM examples)})::VARCHAR""", [config.error_examples])


def runs_document(root: str, config: ExploreConfig) -> str:
    """The stage runs (manifests), oldest first, with what the timeline shows of each."""
    keys = ("stage", "status", "started", "wall_seconds", "cpu_seconds", "peak_memory_mb", "rows", "host")
    runs = sorted(list_manifests(root), key=lambda d: d.get("started", ""))[-config.max_runs:]
    return json.dumps([{k: run.get(k) for k in keys} for run in runs])


def search_shards(con: duckdb.DuckDBPyConnection, n_levels: int, n_shards: int) -> Iterator[tuple[int, str]]:
    """``(shard, json)``: every pool image by ``image_id mod n_shards`` (app.js computes the same with
    BigInt), with its status, cluster path (l1 first), curated parts, duplicate status and thumbnail."""
    levels = ", ".join(f"m.l{t}" for t in range(1, n_levels + 1))
    path = f"CASE WHEN m.image_id IS NULL THEN NULL ELSE [{levels}] END"
    rows = con.sql(f"""
        WITH d AS (SELECT image_id, min(kept_id) AS kept_id, min(reason) AS reason FROM duplicates GROUP BY 1)
        SELECT ((p.image_id % {n_shards}) + {n_shards}) % {n_shards} AS shard,
               '[' || string_agg(json_array(p.image_id::VARCHAR, p.uri, p.status, {path}, m.parts,
                                            d.kept_id::VARCHAR, d.reason, t.sheet, t.cell)::VARCHAR,
                                 ',' ORDER BY p.image_id) || ']'
        FROM pool p LEFT JOIN m USING (image_id) LEFT JOIN d USING (image_id)
        LEFT JOIN thumbs t ON t.image_id = p.image_id AND t.status = 'ok'
        GROUP BY shard""").to_arrow_reader(8)
    for batch in rows:
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
