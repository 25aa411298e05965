"""``curate cluster``: hierarchical k-means with resampling over the pool's embeddings.

Leaves out the images dedup and the filter stage removed. Writes ``clusters`` (each image's cluster at every
level, l1 finest) and ``centroids`` (every
cluster with its parent and size). Each level and resampling step is checkpointed under the catalog,
so a killed run resumes at the step it was in and ends with bit-identical clusters.

With ``workers > 1`` the driver reads only image ids, and level 1 (its k-means and the assignments of
its resampling steps) runs on Ray actors that each hold a range of the embeddings
(`pipelines.distributed_kmeans`); the clusters are bit-identical to ``workers = 1``, so the worker
count is not part of the plan and a run may resume with another one.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog import schemas
from catalog.array_store import CatalogArrayStore
from catalog.config import ConfigError, above, at_least
from catalog.embeddings import embedding_metadata
from catalog.ledger import Ledger
from catalog.ledger_items import Item, Members, Retiring, live
from catalog.lineage import file_fingerprint, run_output_fingerprint
from catalog.manifest import fingerprint
from catalog.progress import progress
from catalog.schemas import (
    CENTROIDS_TABLE,
    CLUSTERS_TABLE,
    DUPLICATES_TABLE,
    EMBEDDINGS_TABLE,
    ERRORS_TABLE,
    FILTER_STAGE,
)
from catalog.shards import read_schema, shard_urls
from catalog.threads import machine_cpus
from curation.cluster_cost import measure_rates
from curation.cluster_plan import format_plan, plan_levels
from curation.drift import drift_report
from curation.hierarchy import Hierarchy, LevelSpec, default_levels, hierarchical_kmeans
from curation.kmeans import RowSource, compute_dtype, default_chunk_size, resolve_device
from pipelines.cluster_update import (
    assign_down,
    cluster_items,
    clustered_distances,
    input_ids,
    labelled_table,
    new_ids,
    write_drift_report,
)
from pipelines.cluster_warm import forget_warm_start, has_clustering, keep_warm_start, read_warm_start
from pipelines.stage import Output, Stage, StageContext, Totals, Unit

log = logging.getLogger("curate.pipelines")

if TYPE_CHECKING:
    import torch

    from pipelines.distributed_kmeans import RowIndex


@dataclass(frozen=True)
class ClusterConfig:
    """``levels`` empty means: ``n_levels`` levels scaled from the paper's ratios to the pool size.

    ``embeddings``/``ids``: cluster vectors brought from outside (``.npy`` with ids, or a Parquet file)
    instead of the catalog's embeddings table. ``workers > 1`` runs level 1 on that many Ray actors of
    ``worker_cpus`` CPUs each (catalog embeddings only); the result is the same as with one.
    ``precision``: of the nearest-centroid search; ``auto`` is bf16 on CUDA (the fused Triton kernel)
    and fp32 on CPU (`curation.kmeans.compute_dtype`).

    A rerun after the embeddings grew assigns the new images down the existing hierarchy (nearest level-1
    centroid, then its parents) and reports their drift (`drift_report`); ``recluster`` (``--recluster``),
    or drift beyond ``max_drift`` (the share of new images farther from their level-1 centroid than the
    99th percentile of the clustered ones), clusters the whole pool again instead, starting from the
    hierarchy it had (`curation.warm_start`; ``--overwrite`` starts cold).
    """

    n_levels: int = 5
    levels: list[LevelSpec] = field(default_factory=list)
    resampling_steps: int = 10
    metric: Literal["l2", "cosine"] = "cosine"
    n_iter: int = 30
    seed: int = 0
    device: str = "auto"
    exclude_duplicates: bool = True
    embeddings: str | None = None
    ids: str | None = None
    workers: int = 1
    worker_cpus: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    recluster: bool = False
    max_drift: float = 0.5

    def __post_init__(self) -> None:
        at_least(self, 1, "n_levels", "n_iter", "workers")
        at_least(self, 0, "resampling_steps")
        above(self, 0, "worker_cpus")
        if not 0.0 <= self.max_drift <= 1.0:
            raise ConfigError(f"max_drift is a share of the new images in [0, 1], got {self.max_drift}")
        if self.workers > 1 and self.embeddings is not None:
            raise ConfigError("workers > 1 reads the catalog's embeddings table; use workers=1 with --embeddings")


def level_specs(config: ClusterConfig, n_rows: int, dim: int) -> list[LevelSpec]:
    """The configured levels, else `default_levels` for this pool (level 1 two-step when its cost says so)."""
    if config.levels:
        return list(config.levels)
    return default_levels(n_rows, config.n_levels, resampling_steps=config.resampling_steps, dim=dim,
                          n_iter=config.n_iter)


def plan_text(config: ClusterConfig, rows: int, dim: int) -> str:
    """``curate cluster --plan``: the levels this config gives a pool of ``rows`` × ``dim`` and their cost.

    The same `level_specs` the stage runs, costed by `curation.cluster_plan` at rates measured on the
    configured device (a calibration matmul, no data, no Ray).
    """
    specs = level_specs(config, rows, dim)
    rates = measure_rates(_device(config.device))
    return format_plan(plan_levels(rows, dim, levels=specs, n_iter=config.n_iter, rates=rates))


def _device(name: str) -> str:
    """The device to cluster on; on CPU also every CPU of the machine (cgroup-capped) as torch threads.

    A Ray job's driver starts with one OpenMP thread, and matmuls blocked for another thread count
    round differently: fixing the count keeps a job's clusters bit-identical to an in-process run's.
    """
    import torch

    device = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(machine_cpus())
    return device


def clusters_table(ids: np.ndarray, hierarchy: Hierarchy) -> pa.Table:
    labels = hierarchy.point_labels()
    n_levels = labels.shape[1]
    columns = [pa.array(ids, pa.int64())] + [pa.array(labels[:, i]) for i in range(n_levels)]
    columns.append(pa.array(hierarchy.distances.astype(np.float32)))
    return pa.Table.from_arrays(columns, schema=schemas.stamp(schemas.clusters(n_levels), CLUSTERS_TABLE))


def centroids_table(hierarchy: Hierarchy) -> pa.Table:
    """One row per cluster at every level; ``size`` counts images, ``parent_id`` the next level up."""
    labels = hierarchy.point_labels()
    facts = {"k": json.dumps([len(c) for c in hierarchy.centroids]), "inertia": json.dumps(hierarchy.inertia)}
    parts = []
    for level, c in enumerate(hierarchy.centroids):
        k, d = c.shape
        parent = hierarchy.labels[level + 1] if level + 1 < len(hierarchy.labels) else np.full(k, -1)
        size = np.bincount(labels[:, level], minlength=k)
        parts.append(pa.Table.from_arrays(
            [pa.array(np.full(k, level + 1, np.int32)), pa.array(np.arange(k, dtype=np.int64)),
             pa.array(parent.astype(np.int64)), pa.array(size.astype(np.int64)),
             pa.FixedSizeListArray.from_arrays(pa.array(c.astype(np.float32).ravel()), d)],
            schema=schemas.stamp(schemas.centroids(d), CENTROIDS_TABLE, facts)))
    return pa.concat_tables(parts)


def _read_inputs(root: str, config: ClusterConfig) -> tuple[np.ndarray, np.ndarray | RowIndex]:
    """Sorted image ids and their vectors in that order, or (``workers > 1``) where to find them."""
    from pipelines.embedding_source import filtered_ids, load_vectors, removed_ids  # DuckDB, imported where used

    exclude = np.union1d(removed_ids(root), filtered_ids(root)) if config.exclude_duplicates else filtered_ids(root)
    if config.workers > 1:
        from pipelines.distributed_kmeans import RowIndex  # Ray, imported only for workers > 1

        index = RowIndex.read(root, exclude_ids=exclude)
        return index.image_ids, index
    return load_vectors(root, config.embeddings, config.ids, exclude_ids=exclude)  # sorted: layout-free order


def _level1(vectors: np.ndarray | RowIndex, config: ClusterConfig, specs: list[LevelSpec], device: str,
            dtype: torch.dtype) -> ContextManager[np.ndarray | RowSource]:
    """Level 1's rows: the array, or actors holding the indexed rows on the chunk grid ``kmeans`` uses."""
    if isinstance(vectors, np.ndarray):
        return nullcontext(vectors)
    from pipelines.distributed_kmeans import ShardedEmbeddings

    return ShardedEmbeddings(vectors, workers=config.workers, num_cpus=config.worker_cpus, device=device,
                             dtype=dtype, chunk_size=default_chunk_size(specs[0].k, resolve_device(device), dtype,
                                                                        dim=vectors.dim))


class ClusterStage(Stage):
    """One unit, the whole hierarchy; its own checkpoints (per level and resampling step) make it resumable."""

    name = "cluster"
    config_class = ClusterConfig
    writes = (CLUSTERS_TABLE, CENTROIDS_TABLE)
    retires_in_place = True  # its items are the embeddings' (and duplicates') shards
    runtime_keys = frozenset({"workers", "worker_cpus", "recluster", "max_drift"})

    def tables_read(self, config: ClusterConfig) -> tuple[str, ...]:
        own = () if config.embeddings else (EMBEDDINGS_TABLE,)
        return own + ((DUPLICATES_TABLE,) if config.exclude_duplicates else ())

    def extra_inputs(self, ctx: StageContext) -> dict[str, str]:
        files = {"embeddings": ctx.config.embeddings, "ids": ctx.config.ids}
        inputs = {f"file:{k}": file_fingerprint(v) for k, v in files.items() if v}
        filtered = run_output_fingerprint(ctx.root, FILTER_STAGE, ERRORS_TABLE)  # the filter stage's removals
        model = {} if ctx.config.embeddings else {"embeddings_model": fingerprint(embedding_metadata(ctx.root))}
        return inputs | model | ({"run:filter": filtered} if filtered else {})

    def plan(self, ctx: StageContext) -> list[Unit]:
        return [Unit("all", {}, 1, fingerprint("all"))]

    def items(self, ctx: StageContext) -> list[Item] | None:
        """The catalog's embeddings (and duplicates) by shard, so the plan grows with shards, not images
        (None for vectors brought from a file: those are clustered whole)."""
        if ctx.config.embeddings:
            return None
        return cluster_items(ctx.root, ctx.config.exclude_duplicates)

    def unit_prefix(self, ctx: StageContext) -> str:
        return "hierarchy"

    def cut(self, ctx: StageContext, items: list[Item], generation: int) -> list[list[Item]]:
        """The first run clusters everything in one unit; an update assigns the new images of its new (or
        rewritten) shards in units of a few shards."""
        if not generation:
            return [items] if items else []
        return [items[k : k + ASSIGN_SHARDS] for k in range(0, len(items), ASSIGN_SHARDS)]

    def unit_payload(self, ctx: StageContext, items: list[Item], generation: int) -> dict[str, Any]:
        """An update unit's images, read from the tables when it is planned (`new_ids`): never in the plan."""
        if not generation:
            return {}
        return {"assign": new_ids(ctx.root, ctx.run, [i.key for i in items], generation,
                                  ctx.config.exclude_duplicates).tolist()}

    def retire(self, ctx: StageContext, tables: dict[str, pa.Table], retiring: Retiring,
               members: Members) -> dict[str, pa.Table]:
        """A finished unit whose shards changed or vanished keeps the rows of the images still in them."""
        keep = pa.array(input_ids(ctx.root, set(live(members)) | retiring.changed, ctx.config.exclude_duplicates))
        return {t: rows.filter(pc.is_in(rows.column("image_id"), keep)) if t == CLUSTERS_TABLE else rows
                for t, rows in tables.items()}

    def restart_reason(self, ctx: StageContext, new: list[Item], generation: int) -> str | None:
        """``recluster`` once images were assigned (now or by earlier updates), or new images that drifted."""
        if ctx.config.recluster and (new or generation):
            return "recluster=true (--recluster)"
        if not new:
            return None
        if not has_clustering(ctx.root, ctx.run):
            return "its clustering is gone (a recluster was cut short)"
        ids = new_ids(ctx.root, ctx.run, [i.key for i in new], generation + 1, ctx.config.exclude_duplicates)
        if not len(ids):
            return None
        _, labels, distances = _assigned(ctx.config, ctx.root, ids)
        drift = drift_report(clustered_distances(ctx.root), labels[:, -1], distances)
        if drift["share"] > ctx.config.max_drift:
            return (f"{drift['share']:.1%} of the {drift['new']} new images lie farther from their level-1 centroid "
                    f"than 99% of the clustered ones (max_drift={ctx.config.max_drift:g})")
        return None

    def clear(self, ctx: StageContext) -> None:
        CatalogArrayStore(ctx.root, self.name).clear()

    def prepare_restart(self, ctx: StageContext, warm: bool) -> None:
        """A recluster (``warm``) keeps the clustering it replaces to start from (`pipelines.cluster_warm`);
        any other restart forgets it."""
        if not warm:
            forget_warm_start(ctx.root)
            return
        config: ClusterConfig = ctx.config
        device = _device(config.device)
        keep_warm_start(ctx.root, ctx.run, CatalogArrayStore(ctx.root, self.name), config.exclude_duplicates,
                        config.metric, device, compute_dtype(config.precision, resolve_device(device)))

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        config: ClusterConfig = ctx.config
        if "assign" in unit.payload:
            ids, labels, distances = _assigned(config, ctx.root, np.asarray(unit.payload["assign"], np.int64))
            return Output({CLUSTERS_TABLE: labelled_table(ids, labels, distances)})
        image_ids, vectors = _read_inputs(ctx.root, config)
        dim = vectors.shape[1] if isinstance(vectors, np.ndarray) else vectors.dim
        specs = level_specs(config, len(image_ids), dim)
        device = _device(config.device)
        dtype = compute_dtype(config.precision, resolve_device(device))
        steps = sum(1 + s.resampling_steps for s in specs)
        store = CatalogArrayStore(ctx.root, self.name)
        previous = read_warm_start(ctx.root)
        if previous is not None:
            log.info("cluster: starting from the clustering it replaces (%s clusters per level; %.1f%% of the "
                     "pool lies outside it and gets fresh seeds)", "/".join(str(len(c)) for c in previous.centroids),
                     100 * previous.far_share)
        with (progress(steps, "cluster", unit="step") as bar,
              _level1(vectors, config, specs, device, dtype) as level1):
            hierarchy = hierarchical_kmeans(level1, specs, seed=config.seed, metric=config.metric,
                                            n_iter=config.n_iter, device=device, dtype=dtype, store=store,
                                            progress=lambda msg: (bar.set_postfix_str(msg), bar.update(1)),
                                            previous=previous)
        return Output({CLUSTERS_TABLE: clusters_table(image_ids, hierarchy),
                       CENTROIDS_TABLE: centroids_table(hierarchy)})

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        n = totals.rows(CLUSTERS_TABLE)
        meta = schemas.metadata_of(read_schema(shard_urls(ctx.root, CENTROIDS_TABLE)[0]))
        summary = {"in": n, "out": n, "errored": 0, "levels": json.loads(meta["k"]),
                   "inertia": json.loads(meta["inertia"])}
        plan = Ledger(ctx.root, ctx.run).plan()
        if plan is not None and plan.members is not None and plan.generation:
            summary["drift"] = write_drift_report(ctx.root, ctx.run, plan.generation, ctx.config.max_drift)
        previous = read_warm_start(ctx.root)
        if previous is not None and not (plan and plan.generation):
            summary["warm_start"] = {"levels": [len(c) for c in previous.centroids],
                                     "far_share": round(previous.far_share, 4)}
        return summary


ASSIGN_SHARDS = 8  # new shards per assignment unit


def _assigned(config: ClusterConfig, root: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    device = _device(config.device)
    return assign_down(root, ids, config.metric, device, compute_dtype(config.precision, resolve_device(device)))


STAGE = ClusterStage()
