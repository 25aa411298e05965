"""The cluster tree's data: one row per node, and the images each node's page shows, all in DuckDB.

Temp tables on the site's DuckDB connection (every one built by a group-by or a window query over the
catalog's views, never by rows in Python):

- ``m``: each clustered image with its cluster at every level and, per curated part, whether it is in it;
- ``nodes``: per (level, id) the pool size, the curated size per part, the duplicates whose kept image
  is in it, the child count, the rank among its siblings (largest first) and its page's order;
- ``shown``: the images each page shows, by kind (``central``, ``random``, ``child``, ``member``, ``dup``)
  and position; ``node_dups``: the removed duplicates shown per node.

"Closest to the centroid" for a level-1 cluster means its members by their distance to its centroid
(the ``clusters.distance`` column). For a cluster at level t > 1 it means its level-1 descendants whose
centroids are closest (cosine) to its own centroid, each shown by its member closest to its own centroid:
exact distances at upper levels would need every embedding, the centroids table is small.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from catalog.errors import MissingInputError
from curation.index import build_index
from pipelines.explore.config import ExploreConfig

KINDS = ("central", "random", "child", "member", "dup")
ROOT_ID = -1  # the parent of the top level's nodes


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None):
    """The one value of a one-row, one-column query."""
    return con.sql(sql, params=params).fetchall()[0][0]


def level_count(con: duckdb.DuckDBPyConnection) -> int:
    cols = [row[0] for row in con.sql("DESCRIBE clusters").fetchall()]
    n = sum(1 for c in cols if c[0] == "l" and c[1:].isdigit())
    if n == 0:
        raise MissingInputError("the clusters table has no level columns (l1, l2, …)")
    return n


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def prepare_members(con: duckdb.DuckDBPyConnection, n_levels: int, part_views: list[str]) -> None:
    """``m``: clusters plus one membership flag per curated part and the list of parts (by index)."""
    levels = ", ".join(f"c.l{i}" for i in range(1, n_levels + 1))
    flags = "".join(f", c.image_id IN (SELECT image_id FROM {_q(v)}) AS in_{i}" for i, v in enumerate(part_views))
    parts = ("list_filter([" + ", ".join(f"CASE WHEN in_{i} THEN {i} END" for i in range(len(part_views)))
             + "], lambda x: x IS NOT NULL)") if part_views else "[]::INTEGER[]"
    any_part = " OR ".join(f"in_{i}" for i in range(len(part_views))) or "false"
    con.execute(f"CREATE TEMP TABLE m0 AS SELECT c.image_id, {levels}, c.distance{flags} FROM clusters c")
    con.execute(f"CREATE TEMP TABLE m AS SELECT *, {parts} AS parts, ({any_part}) AS curated FROM m0")
    con.execute("DROP TABLE m0")


def prepare_nodes(con: duckdb.DuckDBPyConnection, n_levels: int, n_parts: int) -> None:
    """``nodes`` for every level (the deepest page level's children need their sizes too)."""
    curated = "[" + ", ".join(f"sum(in_{i}::BIGINT)" for i in range(n_parts)) + "]::BIGINT[]"
    counts = " UNION ALL ".join(
        f"SELECT {t} AS level, l{t} AS id, {f'l{t + 1}' if t < n_levels else f'{ROOT_ID}::BIGINT'} AS parent, "
        f"count(*) AS pool, {curated} AS curated FROM m GROUP BY ALL" for t in range(1, n_levels + 1))
    dups = " UNION ALL ".join(
        f"SELECT {t} AS level, m.l{t} AS id, count(*) AS dups FROM duplicates d JOIN m ON m.image_id = d.kept_id "
        "GROUP BY ALL" for t in range(1, n_levels + 1))
    con.execute(f"""
        CREATE TEMP TABLE nodes AS
        WITH counts AS ({counts}), dups AS ({dups}),
             kids AS (SELECT level + 1 AS level, parent AS id, count(*) AS n_children FROM counts GROUP BY ALL)
        SELECT c.level, c.id, c.parent, c.pool, c.curated, coalesce(d.dups, 0) AS dups,
               coalesce(k.n_children, 0) AS n_children,
               row_number() OVER (PARTITION BY c.level, c.parent ORDER BY c.pool DESC, c.id) - 1 AS sib_rank,
               NULL::BIGINT AS page
        FROM counts c LEFT JOIN dups d USING (level, id) LEFT JOIN kids k USING (level, id)""")


def assign_pages(con: duckdb.DuckDBPyConnection, n_levels: int, deepest: int) -> int:
    """Number the pages top level first, each level's nodes grouped under their parent's order and
    largest first: a parent's children are consecutive, so the thumbnails a parent page shows of its
    children are built together, into the same few sheets. Returns the number of node pages."""
    order = []
    parent_rank = np.zeros(1, np.int64)  # the root
    start = 0
    for t in range(n_levels, deepest - 1, -1):
        rows = con.sql(f"SELECT id, parent, sib_rank FROM nodes WHERE level = {t}").fetchnumpy()
        parents = np.maximum(rows["parent"], 0) if t == n_levels else rows["parent"]
        sort = np.lexsort((rows["sib_rank"], parent_rank[parents]))
        page = np.empty(len(sort), np.int64)
        page[sort] = np.arange(start, start + len(sort))
        parent_rank = np.zeros(int(rows["id"].max()) + 1, np.int64)
        parent_rank[rows["id"]] = page
        order.append(pa.table({"level": pa.array(np.full(len(page), t, np.int32)), "id": rows["id"], "p": page}))
        start += len(sort)
    con.register("pages_tmp", pa.concat_tables(order))
    con.execute("UPDATE nodes SET page = p FROM pages_tmp "
                "WHERE nodes.level = pages_tmp.level AND nodes.id = pages_tmp.id")
    con.unregister("pages_tmp")
    return start


def _centroids(con: duckdb.DuckDBPyConnection, level: int) -> np.ndarray:
    """Unit-norm centroids of one level as rows indexed by cluster id (zeros where there is none), in
    float64: a parent of two children sits halfway, and float32 would order the two at random."""
    t = con.sql(f"SELECT cluster_id, centroid FROM centroids WHERE level = {level}").to_arrow_table()
    if t.num_rows == 0:
        raise MissingInputError(f"the centroids table has no level {level}: rerun `curate cluster`")
    x = t.column("centroid").combine_chunks().flatten().to_numpy().astype(np.float64).reshape(t.num_rows, -1)
    ids = t.column("cluster_id").to_numpy()
    out = np.zeros((int(ids.max()) + 1, x.shape[1]))
    out[ids] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


def _level1_ranking(con: duckdb.DuckDBPyConnection, n_levels: int) -> pa.Table:
    """Per level-1 cluster, its ancestors and the cosine of its centroid to each ancestor's."""
    anc = con.sql("SELECT DISTINCT " + ", ".join(f"l{t}" for t in range(1, n_levels + 1)) + " FROM m").fetchnumpy()
    cents = {t: _centroids(con, t) for t in range(1, n_levels + 1)}
    for t, c in cents.items():
        if anc[f"l{t}"].max() >= len(c):
            raise MissingInputError(f"clusters names level-{t} cluster {anc[f'l{t}'].max()}, which the centroids table "
                             "lacks: rerun `curate cluster`")
    cols = {f"l{t}": anc[f"l{t}"] for t in range(1, n_levels + 1)}
    for t in range(2, n_levels + 1):
        cols[f"sim{t}"] = np.einsum("ij,ij->i", cents[1][anc["l1"]], cents[t][anc[f"l{t}"]])
    return pa.table(cols)


def add_strips(con: duckdb.DuckDBPyConnection, n_levels: int, config: ExploreConfig) -> None:
    """``shown`` rows of kinds ``central`` and ``random`` for every page level."""
    con.execute("CREATE TEMP TABLE shown (level INTEGER, id BIGINT, kind VARCHAR, pos BIGINT, image_id BIGINT)")
    con.execute("CREATE TEMP TABLE reps AS SELECT l1, image_id, row_number() OVER "
                "(PARTITION BY l1 ORDER BY distance, image_id) AS pos FROM m QUALIFY pos <= greatest(1, ?)",
                [config.central])
    con.register("l1rank", _level1_ranking(con, n_levels))
    for t in range(config.deepest_level, n_levels + 1):
        if t == 1:
            con.execute("INSERT INTO shown SELECT 1, l1, 'central', pos, image_id FROM reps WHERE pos <= ?",
                        [config.central])
        else:
            con.execute(f"""INSERT INTO shown SELECT {t}, a.l{t}, 'central',
                            row_number() OVER (PARTITION BY a.l{t} ORDER BY a.sim{t} DESC, a.l1) AS rank, r.image_id
                            FROM l1rank a JOIN reps r ON r.l1 = a.l1 AND r.pos = 1 QUALIFY rank <= ?""",
                        [config.central])
        con.execute(f"""INSERT INTO shown SELECT {t}, m.l{t}, 'random',
                        row_number() OVER (PARTITION BY m.l{t} ORDER BY hash(m.image_id, ?)) AS pos, m.image_id
                        FROM m ANTI JOIN (SELECT id, image_id FROM shown WHERE level = {t} AND kind = 'central') s
                        ON s.id = m.l{t} AND s.image_id = m.image_id QUALIFY pos <= ?""",
                    [config.seed, config.random])


def add_members(con: duckdb.DuckDBPyConnection, n_levels: int, config: ExploreConfig) -> None:
    """``member`` rows: a random half of the node's curated members, then a random half of the others."""
    half = config.members - config.members // 2
    for t in range(config.deepest_level, n_levels + 1):
        con.execute(f"""INSERT INTO shown SELECT {t}, id, 'member', (NOT curated)::INTEGER * ? + rn, image_id FROM (
                            SELECT l{t} AS id, image_id, curated,
                                   row_number() OVER (PARTITION BY l{t}, curated ORDER BY hash(image_id, ?)) AS rn
                            FROM m QUALIFY rn <= CASE WHEN curated THEN ? ELSE ? END)""",
                    [half, config.seed, half, config.members // 2])


def add_child_thumbs(con: duckdb.DuckDBPyConnection, n_levels: int, config: ExploreConfig) -> None:
    """``child`` rows: a parent page shows the first strip images of its largest children."""
    con.execute("""INSERT INTO shown SELECT s.level + 1, n.parent, 'child', n.sib_rank * ? + s.pos, s.image_id
                   FROM shown s JOIN nodes n ON n.level = s.level AND n.id = s.id
                   WHERE s.kind = 'central' AND s.pos <= ? AND n.sib_rank < ? AND s.level < ?""",
                [config.child_thumbs, config.child_thumbs, config.children_with_thumbs, n_levels])


def add_node_duplicates(con: duckdb.DuckDBPyConnection, n_levels: int, config: ExploreConfig) -> None:
    """``node_dups``: removed duplicates whose kept image is in the node (removed images are not clustered)."""
    con.execute("CREATE TEMP TABLE node_dups (level INTEGER, id BIGINT, pos BIGINT, image_id BIGINT, "
                "kept_id BIGINT, similarity DOUBLE, reason VARCHAR)")
    for t in range(config.deepest_level, n_levels + 1):
        con.execute(f"""INSERT INTO node_dups SELECT {t}, m.l{t},
                        row_number() OVER (PARTITION BY m.l{t} ORDER BY d.kept_id, d.image_id) AS pos,
                        d.image_id, d.kept_id, d.similarity, d.reason
                        FROM duplicates d JOIN m ON m.image_id = d.kept_id QUALIFY pos <= ?""",
                    [config.node_duplicates])
    con.execute("""INSERT INTO shown SELECT level, id, 'dup', 2 * pos + k,
                          CASE WHEN k = 0 THEN kept_id ELSE image_id END
                   FROM node_dups, (VALUES (0), (1)) AS t(k)""")


def add_neighbours(con: duckdb.DuckDBPyConnection, n_levels: int, config: ExploreConfig) -> None:
    """``neighbours``: per node the nearest clusters of its level by centroid cosine (faiss)."""
    parts = []
    k = config.neighbours
    for t in range(config.deepest_level, n_levels + 1):
        ids = con.sql(f"SELECT id FROM nodes WHERE level = {t} ORDER BY id").fetchnumpy()["id"]
        if k < 1 or len(ids) < 2:
            continue
        x = _centroids(con, t)[ids].astype(np.float32)
        sims, rows = build_index(x, seed=config.seed, use_gpu=False).search(x, min(k + 1, len(ids)))
        src = np.repeat(ids, rows.shape[1])
        flat = rows.ravel()
        keep = (flat >= 0) & (ids[np.maximum(flat, 0)] != src)
        rank = np.tile(np.arange(rows.shape[1]), len(ids))
        parts.append(pa.table({"level": pa.array(np.full(int(keep.sum()), t, np.int32)), "id": src[keep],
                               "nb": ids[flat[keep]], "rank": rank[keep],
                               "sim": sims.ravel()[keep].astype(np.float64)}))
    schema = pa.schema([("level", pa.int32()), ("id", pa.int64()), ("nb", pa.int64()), ("rank", pa.int64()),
                        ("sim", pa.float64())])
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    con.register("neighbours_arrow", table)
    con.execute("CREATE TEMP TABLE neighbours AS SELECT * FROM neighbours_arrow "
                "QUALIFY row_number() OVER (PARTITION BY level, id ORDER BY rank) <= ?", [k])
    con.unregister("neighbours_arrow")


def _img_list(kind: str) -> str:
    return (f"SELECT level, id, list(i.img ORDER BY pos) AS imgs FROM shown s "
            f"JOIN imgs i USING (image_id) WHERE kind = '{kind}' GROUP BY ALL")


def json_similarity(column: str) -> str:
    """A similarity for JSON: NaN (eval-set duplicates, cluster-mode retrieval) becomes null."""
    return f"CASE WHEN isnan({column}) THEN NULL ELSE round({column}::DOUBLE, 4) END"


def _children(child_level: int, config: ExploreConfig) -> str:
    """Per parent, its children (largest first, at most ``max_children``) with a few strip thumbnails."""
    return f"""
        SELECT n.level + 1 AS level, n.parent AS id,
               list({{id: n.id, pool: n.pool, curated: n.curated, dups: n.dups, n_children: n.n_children,
                      thumbs: CASE WHEN n.sib_rank < {config.children_with_thumbs}
                                   THEN coalesce(st.imgs[1:{config.child_thumbs}], []) ELSE [] END}}
                    ORDER BY n.sib_rank) AS children
        FROM nodes n LEFT JOIN ({_img_list('central')}) st USING (level, id)
        WHERE n.level = {child_level} AND n.sib_rank < {config.max_children} GROUP BY ALL"""


def node_documents(con: duckdb.DuckDBPyConnection, level: int, n_levels: int, config: ExploreConfig
                   ) -> duckdb.DuckDBPyRelation:
    """``(id, json)`` for every node of ``level``; needs the ``imgs`` table (image id -> display struct)."""
    path = "[" + ", ".join(f"l{t}" for t in range(n_levels, level, -1)) + "]::BIGINT[]"
    return con.sql(f"""
        WITH anc AS (SELECT DISTINCT l{level} AS id, {path} AS path FROM m),
        strips AS ({_img_list('central')}), randoms AS ({_img_list('random')}), members AS ({_img_list('member')}),
        children AS ({_children(level - 1, config)}),
        dups AS (
            SELECT d.level, d.id, list({{removed: r.img, kept: k.img, similarity: {json_similarity('d.similarity')},
                                        reason: d.reason}} ORDER BY d.pos) AS dups
            FROM node_dups d JOIN imgs r ON r.image_id = d.image_id LEFT JOIN imgs k ON k.image_id = d.kept_id
            GROUP BY ALL),
        nbs AS (
            SELECT b.level, b.id, list({{id: b.nb, pool: n.pool, similarity: round(b.sim, 4)}} ORDER BY b.rank) AS nbs
            FROM neighbours b JOIN nodes n ON n.level = b.level AND n.id = b.nb GROUP BY ALL)
        SELECT n.id, to_json({{
            level: n.level, id: n.id, path: anc.path, pool: n.pool, curated: n.curated, dups: n.dups,
            n_children: n.n_children, children: coalesce(c.children, []),
            strip: coalesce(st.imgs, []), random: coalesce(rd.imgs, []), members: coalesce(mb.imgs, []),
            duplicates: coalesce(du.dups, []), neighbours: coalesce(nb.nbs, [])
        }})::VARCHAR AS json
        FROM nodes n JOIN anc USING (id)
        LEFT JOIN children c USING (level, id) LEFT JOIN strips st USING (level, id)
        LEFT JOIN randoms rd USING (level, id) LEFT JOIN members mb USING (level, id)
        LEFT JOIN dups du USING (level, id) LEFT JOIN nbs nb USING (level, id)
        WHERE n.level = {level}""")


def top_children(con: duckdb.DuckDBPyConnection, n_levels: int, config: ExploreConfig) -> str:
    """The root's children (the top level) as a JSON list, in the node documents' children format."""
    rows = con.sql(f"SELECT to_json(children)::VARCHAR FROM ({_children(n_levels, config)})").fetchall()
    return rows[0][0] if rows else "[]"
