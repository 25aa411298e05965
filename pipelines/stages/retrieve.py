"""``curate retrieve --seed NAME``: the pool images that look like a trusted seed dataset.

``knn`` takes the k nearest pool images of every seed image (large seeds); ``cluster`` takes images
from the pool clusters that hold more than a few seed images (small seeds); ``auto`` takes k-NN for
seeds over ``knn_min_seeds`` images and, below that, cluster mode only where the seed images bunch up
in the pool's clusters (`curation.retrieval.seed_support`). When cluster mode finds nothing the stage
falls back to k-NN with a warning that gives the numbers; an empty result is always a warning.
Duplicates found by ``curate dedup`` are never retrieved. The faiss index is saved under the
catalog and reused while the embeddings it indexes are unchanged; k-NN mode also keeps each seed image's
nearest pool images, so on a grown pool it searches only the new ones (`pipelines.retrieve_lists`).
One run per seed (``retrieve-<seed>``) writes that seed's rows of ``retrieved``; the seed's own ingest
and embed run through the stage runner (``pipelines.seeds``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.array_store import CatalogArrayStore
from catalog.config import ConfigError, above, at_least
from catalog.embeddings import RowStream, embedding_metadata, load_embeddings, load_ids, row_stream
from catalog.id_lookup import lookup
from catalog.lineage import table_state
from catalog.manifest import fingerprint as content_fingerprint
from catalog.paths import exists, join, read_stream, write_stream_atomic
from catalog.schemas import (
    CENTROIDS_TABLE,
    CLUSTERS_TABLE,
    DUPLICATES_TABLE,
    EMBEDDINGS_TABLE,
    POOL_TABLE,
    RETRIEVED_TABLE,
)
from catalog.shards import table_exists
from catalog.sql import query
from curation.index import SEARCH_BATCH, PoolIndex, build_index
from curation.kmeans import assign
from curation.retrieval import (
    KNN_K,
    MIN_SEED_PER_CLUSTER,
    KnnSearch,
    RetrievalResult,
    choose_mode,
    cluster_retrieve,
    merge_neighbours,
    seed_support,
)
from pipelines.embedding_source import removed_ids
from pipelines.reports import write_retrieval_report
from pipelines.retrieve_lists import knn_neighbours
from pipelines.seeds import SeedsConfig, prepare_seed, resolve_seed, seed_fingerprint, seed_name
from pipelines.stage import Output, Stage, StageContext, Totals, Unit

log = logging.getLogger("curate.pipelines")


@dataclass(frozen=True)
class RetrieveConfig:
    """``seed_set``: a seed name from ``seeds`` or a path to images (``curate retrieve --seed``).

    ``workers > 1``: the k-NN search runs on that many Ray actors of ``worker_cpus`` CPUs, ``query_block``
    seed images per task (`pipelines.distributed_search`); the result is the same as with one."""

    seed_set: str = ""
    mode: Literal["auto", "knn", "cluster"] = "auto"
    k: int = KNN_K
    min_similarity: float | None = None
    max_per_seed: int | None = None
    knn_min_seeds: int = 1_000_000
    cluster_level: int = 1
    min_seed_per_cluster: int = MIN_SEED_PER_CLUSTER
    per_cluster: int = 10_000
    recall_target: float = 0.95
    seed: int = 0
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    workers: int = 1
    worker_cpus: float = 1.0
    query_block: int = SEARCH_BATCH

    def __post_init__(self) -> None:
        at_least(self, 1, "k", "max_per_seed", "knn_min_seeds", "cluster_level", "min_seed_per_cluster",
                 "per_cluster", "workers", "query_block")
        above(self, 0, "worker_cpus")
        if not 0.0 < self.recall_target <= 1.0:
            raise ConfigError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.min_similarity is not None and not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"min_similarity is a cosine similarity in [-1, 1], got {self.min_similarity}")


@dataclass(frozen=True)
class SeedFacts:
    name: str
    catalog: str  # the catalog root holding the seed's embeddings (and pool, unless brought precomputed)
    mode: Literal["knn", "cluster"]
    seed_images: int


def pool_index(root: str, rows: RowStream, config: RetrieveConfig) -> PoolIndex:
    """Load the saved index of these rows (the embeddings table as it is now, less the removed images),
    or build one from the table read batch by batch (its float16 lists are then the only copy of the
    rows: `curation.index.build_index`) and save it."""
    key = content_fingerprint(table_state(root, EMBEDDINGS_TABLE).fingerprint,
                              hashlib.sha256(rows.ids.tobytes()).hexdigest(), config.recall_target, config.seed)
    url = join(root, "_index", f"pool-{key[:16]}.faiss")
    if exists(url):
        return read_stream(url, lambda f: PoolIndex.read(f, use_gpu="auto"))
    index = build_index(rows, recall_target=config.recall_target, seed=config.seed)
    write_stream_atomic(url, index.write)
    return index


def knn_search(config: RetrieveConfig, address: str | None = None) -> KnnSearch:
    """Where the seed images are searched: in this process or on ``workers`` Ray actors, in the same
    ``query_block``-row blocks either way."""
    if config.workers == 1:
        return lambda index, q, k: index.search(q, k, batch_size=config.query_block)
    from pipelines.distributed_search import RaySearch  # Ray, imported only for workers > 1

    return RaySearch(config.workers, config.worker_cpus, address, config.query_block).knn_search


def _seed_labels(root: str, seed_x: np.ndarray, level: int) -> np.ndarray:
    """The pool cluster (at ``level``) of every seed image: its nearest centroid."""
    if not table_exists(root, CLUSTERS_TABLE):
        raise ConfigError("cluster-based retrieval needs the clusters of `curate build-lvd` (or `curate cluster`)")
    cents = query(root, "SELECT centroid FROM centroids WHERE level = ? ORDER BY cluster_id", [level]).column(0)
    c = cents.combine_chunks().flatten().to_numpy().reshape(len(cents), -1)  # as a Python list: ~1 KB a pool image
    return np.asarray(assign(seed_x, c, metric="cosine")[0])


def auto_mode(root: str, seed_catalog: str, n_seed: int, config: RetrieveConfig) -> Literal["knn", "cluster"]:
    """k-NN above ``knn_min_seeds`` seed images or without clusters; below, cluster mode only where the
    seed images bunch up in the pool's clusters (`choose_mode` on their `seed_support`)."""
    if n_seed > config.knn_min_seeds:
        return "knn"
    if not table_exists(root, CLUSTERS_TABLE):
        log.info("retrieve: k-NN mode for %d seed images: the pool has no clusters", n_seed)
        return "knn"
    seed_x = load_embeddings(seed_catalog)[1]
    support = seed_support(_seed_labels(root, seed_x, config.cluster_level), config.min_seed_per_cluster)
    mode = choose_mode(n_seed, config.knn_min_seeds, support=support)
    log.info("retrieve: %s mode for %d seed images: %s", mode, n_seed, support.describe())
    return mode


def _cluster_mode(root: str, pool_ids: np.ndarray, seed_x: np.ndarray, config: RetrieveConfig) -> RetrievalResult:
    seed_labels = _seed_labels(root, seed_x, config.cluster_level)
    clusters = query(root, f"SELECT image_id, l{config.cluster_level} AS label FROM clusters ORDER BY image_id")
    pool_labels = lookup(clusters.column("image_id").to_numpy(), clusters.column("label").to_numpy().astype(np.int64),
                         pool_ids, -1)
    keep = pool_labels >= 0
    result = cluster_retrieve(pool_labels[keep], np.asarray(seed_labels), seed=config.seed,
                              min_seed_per_cluster=config.min_seed_per_cluster, per_cluster=config.per_cluster)
    rows = np.flatnonzero(keep)[result.rows]
    return RetrievalResult(rows, result.seed_rows, result.rank, result.similarity, result.note)


def lists_key(root: str, facts: SeedFacts, config: RetrieveConfig) -> str:
    """What kept neighbour lists were searched with: the pool's embedding model, the seed set's content,
    k and the index settings."""
    return content_fingerprint(embedding_metadata(root), seed_fingerprint(facts.catalog), config.k,
                               config.recall_target, config.seed)


def retrieved_table(seed: str, pool_ids: np.ndarray, seed_ids: np.ndarray, result: RetrievalResult) -> pa.Table:
    seed_image = np.where(result.seed_rows >= 0, seed_ids[np.maximum(result.seed_rows, 0)], -1)
    return pa.table({"image_id": pa.array(pool_ids[result.rows], pa.int64()),
                     "seed": pa.array([seed] * len(result), pa.string()),
                     "seed_image_id": pa.array(seed_image, pa.int64()),
                     "rank": pa.array(result.rank, pa.int32()),
                     "similarity": pa.array(result.similarity, pa.float32())},
                    schema=schemas.stamp(schemas.RETRIEVED, RETRIEVED_TABLE))


def _cap(result: RetrievalResult, cap: int | None) -> RetrievalResult:
    """At most ``cap`` rows, the best ranks first (cluster mode has no per-seed-image k)."""
    if cap is None or len(result) <= cap:
        return result
    pick = np.sort(np.argsort(result.rank, kind="stable")[:cap])
    return RetrievalResult(result.rows[pick], result.seed_rows[pick], result.rank[pick], result.similarity[pick])


class RetrieveStage(Stage):
    name = "retrieve"
    config_class = RetrieveConfig
    writes = (RETRIEVED_TABLE,)
    # where the seed lives is its catalog's business (an input); any worker count gives the same rows
    runtime_keys = frozenset({"seeds", "workers", "worker_cpus"})
    empty_schemas = {RETRIEVED_TABLE: schemas.stamp(schemas.RETRIEVED, RETRIEVED_TABLE)}
    state_checks_inputs = True  # kept neighbour lists (k-NN mode) are checked image by image

    def run_name(self, config: RetrieveConfig) -> str:
        if not config.seed_set:
            raise ConfigError("retrieve needs a seed: a name from the seeds config or a path (--seed)")
        return f"retrieve-{seed_name(config.seed_set, config.seeds)}"

    def tables_read(self, config: RetrieveConfig) -> tuple[str, ...]:
        cluster = (CLUSTERS_TABLE, CENTROIDS_TABLE) if config.mode != "knn" else ()
        return (EMBEDDINGS_TABLE, DUPLICATES_TABLE, POOL_TABLE, *cluster)

    def prepare(self, ctx: StageContext) -> SeedFacts:
        """The seed's catalog, made (ingest + embed like the pool) if needed, and the mode for its size."""
        config: RetrieveConfig = ctx.config
        name, spec = resolve_seed(config.seed_set, ctx.root, config.seeds)
        catalog = prepare_seed(ctx.root, name, spec, address=ctx.address)
        n = query(catalog, "SELECT count(*) FROM embeddings").column(0)[0].as_py()
        mode = config.mode if config.mode != "auto" else auto_mode(ctx.root, catalog, n, config)
        return SeedFacts(name, catalog, mode, n)

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        return {**super().settings(ctx), "mode": ctx.facts.mode}

    def extra_inputs(self, ctx: StageContext) -> dict[str, str]:
        return {f"seed:{ctx.facts.name}": seed_fingerprint(ctx.facts.catalog)}

    def plan(self, ctx: StageContext) -> list[Unit]:
        return [Unit("all", {}, 1, content_fingerprint("all"))]

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        config: RetrieveConfig = ctx.config
        facts: SeedFacts = ctx.facts
        seed_ids, seed_x = load_embeddings(facts.catalog)
        removed = removed_ids(ctx.root)
        result = None
        if facts.mode == "cluster":  # needs the pool's ids and clusters, not its vectors
            pool_ids = load_ids(ctx.root, exclude_ids=removed)
            result = _cap(_cluster_mode(ctx.root, pool_ids, seed_x, config), config.max_per_seed)
            if not len(result):
                log.warning("%s: %s; falling back to k-NN (%d neighbours per seed image)", ctx.run, result.note,
                            config.k)
        files: dict[str, bytes] = {}
        if result is None or not len(result):
            rows = row_stream(ctx.root, exclude_ids=removed)
            pool_ids = rows.ids
            found, files = knn_neighbours(
                ctx.root, ctx.run, lists_key(ctx.root, facts, config), pool_ids, rows, seed_x, config.k,
                lambda: pool_index(ctx.root, rows, config), knn_search(config, ctx.address), config.seed)
            result = merge_neighbours(*found.rows(pool_ids, config.k), config.min_similarity, config.max_per_seed)
        return Output({RETRIEVED_TABLE: retrieved_table(facts.name, pool_ids, seed_ids, result)}, files)

    def clear(self, ctx: StageContext) -> None:
        """``--overwrite`` forgets the kept neighbour lists."""
        CatalogArrayStore(ctx.root, ctx.run).clear()

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        facts: SeedFacts = ctx.facts
        pool = query(ctx.root, "SELECT count(*) FROM embeddings").column(0)[0].as_py()
        seed_uris = {}
        if table_exists(facts.catalog, POOL_TABLE):
            rows = query(facts.catalog, "SELECT image_id, uri FROM pool")
            seed_uris = dict(zip(rows.column("image_id").to_pylist(), rows.column("uri").to_pylist()))
        report = write_retrieval_report(ctx.root, facts.name, seed_uris, ctx.config.cluster_level)
        retrieved = totals.rows(RETRIEVED_TABLE)
        fell_back = facts.mode == "cluster" and retrieved > 0 and _took_knn(ctx.root, facts.name)
        mode = "knn" if fell_back else facts.mode
        if not retrieved:
            log.warning("%s: 0 pool images retrieved (%s mode, %d seed images, %d pool embeddings, k=%d, "
                        "min_similarity=%s): lower min_similarity or check that the seed resembles the pool",
                        ctx.run, mode, facts.seed_images, pool, ctx.config.k, ctx.config.min_similarity)
        return {"in": pool, "out": retrieved, "errored": 0, "seed": facts.name, "mode": mode,
                "fallback_from": "cluster" if fell_back else None,
                "retrieved": retrieved, "seed_images": facts.seed_images, "report": report}


def _took_knn(root: str, seed: str) -> bool:
    """Whether the seed's rows came from k-NN (each names its seed image; cluster rows name none)."""
    rows = query(root, "SELECT count(*) FROM retrieved WHERE seed = ? AND seed_image_id <> -1", [seed])
    return rows.column(0)[0].as_py() > 0


STAGE = RetrieveStage()
