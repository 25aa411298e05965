"""``curate cluster``: hierarchical k-means with resampling over the pool's embeddings.

Writes ``clusters`` (each image's cluster at every level, l1 finest) and ``centroids`` (every
cluster with its parent and size). Each level and resampling step is checkpointed under the catalog,
so a killed run resumes at the step it was in and ends with bit-identical clusters.

With ``workers > 1`` the driver reads only image ids, and level 1 (its k-means and the assignments of
its resampling steps) runs on Ray actors that each hold a range of the embeddings
(`pipelines.distributed_kmeans`); the clusters are bit-identical to ``workers = 1``, so the worker
count is not part of the plan and a run may resume with another one.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import ContextManager, Literal

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.array_store import CatalogArrayStore
from catalog.ledger import Ledger
from catalog.manifest import RunManifest, fingerprint
from catalog.progress import progress
from catalog.shards import delete_table, write_shards
from curation.hierarchy import Hierarchy, LevelSpec, default_levels, hierarchical_kmeans
from curation.kmeans import RowSource, default_chunk_size, resolve_device
from pipelines.distributed_kmeans import RowIndex, ShardedEmbeddings
from pipelines.embedding_source import load_vectors, removed_ids

STAGE = "cluster"


@dataclass(frozen=True)
class LevelConfig:
    k: int
    resampling_steps: int = 0
    sample_size: int | None = None
    sample_strategy: Literal["closest", "random"] = "closest"
    n_splits: int = 1


@dataclass(frozen=True)
class ClusterConfig:
    """``levels`` empty means: ``n_levels`` levels scaled from the paper's ratios to the pool size.

    ``workers > 1`` runs level 1 on that many Ray actors of ``worker_cpus`` CPUs each (catalog
    embeddings only, not ``--embeddings``); the result is the same as with one.
    """

    n_levels: int = 5
    levels: list[LevelConfig] = field(default_factory=list)
    resampling_steps: int = 10
    metric: Literal["l2", "cosine"] = "cosine"
    n_iter: int = 30
    seed: int = 0
    device: str = "auto"
    exclude_duplicates: bool = True
    workers: int = 1
    worker_cpus: float = 1.0

    def plan_settings(self) -> dict[str, object]:
        """The settings the clusters depend on (not where level 1 runs)."""
        return {k: v for k, v in asdict(self).items() if k not in ("workers", "worker_cpus")}


def level_specs(config: ClusterConfig, n_rows: int, dim: int) -> list[LevelSpec]:
    if config.levels:
        return [LevelSpec(**asdict(level)) for level in config.levels]
    return default_levels(n_rows, config.n_levels, resampling_steps=config.resampling_steps, dim=dim,
                          n_iter=config.n_iter)


def _device(name: str) -> str:
    """The device to cluster on; on CPU also every core as torch threads.

    A Ray job's driver starts with one OpenMP thread, and matmuls blocked for another thread count
    round differently: fixing the count keeps a job's clusters bit-identical to an in-process run's.
    """
    import torch

    device = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    return device


def clusters_table(ids: np.ndarray, hierarchy: Hierarchy) -> pa.Table:
    labels = hierarchy.point_labels()
    n_levels = labels.shape[1]
    columns = [pa.array(ids, pa.int64())] + [pa.array(labels[:, i]) for i in range(n_levels)]
    columns.append(pa.array(hierarchy.distances.astype(np.float32)))
    return pa.Table.from_arrays(columns, schema=schemas.stamp(schemas.clusters(n_levels), "clusters"))


def centroids_table(hierarchy: Hierarchy) -> pa.Table:
    """One row per cluster at every level; ``size`` counts images, ``parent_id`` the next level up."""
    labels = hierarchy.point_labels()
    parts = []
    for level, c in enumerate(hierarchy.centroids):
        k, d = c.shape
        parent = hierarchy.labels[level + 1] if level + 1 < len(hierarchy.labels) else np.full(k, -1)
        size = np.bincount(labels[:, level], minlength=k)
        parts.append(pa.Table.from_arrays(
            [pa.array(np.full(k, level + 1, np.int32)), pa.array(np.arange(k, dtype=np.int64)),
             pa.array(parent.astype(np.int64)), pa.array(size.astype(np.int64)),
             pa.FixedSizeListArray.from_arrays(pa.array(c.astype(np.float32).ravel()), d)],
            schema=schemas.stamp(schemas.centroids(d), "centroids")))
    return pa.concat_tables(parts)


def _read_inputs(root: str, config: ClusterConfig, embeddings: str | None,
                 ids: str | None) -> tuple[np.ndarray, np.ndarray | RowIndex]:
    """Sorted image ids and their vectors in that order, or (``workers > 1``) where to find them."""
    exclude = removed_ids(root) if config.exclude_duplicates else None
    if config.workers > 1:
        if embeddings is not None:
            raise ValueError("workers > 1 reads the catalog's embeddings table; use workers=1 with --embeddings")
        index = RowIndex.read(root, exclude_ids=exclude)
        return index.image_ids, index
    image_ids, x = load_vectors(root, embeddings, ids)
    if exclude is not None:
        keep = ~np.isin(image_ids, exclude)
        image_ids, x = image_ids[keep], x[keep]
    order = np.argsort(image_ids, kind="stable")  # row order independent of shard layout
    return image_ids[order], np.ascontiguousarray(x[order])


def _level1(vectors: np.ndarray | RowIndex, config: ClusterConfig, specs: list[LevelSpec],
            device: str) -> ContextManager[np.ndarray | RowSource]:
    """Level 1's rows: the array, or actors holding the indexed rows on the chunk grid ``kmeans`` uses."""
    if isinstance(vectors, np.ndarray):
        return nullcontext(vectors)
    return ShardedEmbeddings(vectors, workers=config.workers, num_cpus=config.worker_cpus, device=device,
                             chunk_size=default_chunk_size(specs[0].k, resolve_device(device)))


def cluster(root: str, config: ClusterConfig | None = None, *, embeddings: str | None = None,
            ids: str | None = None, overwrite: bool = False) -> dict[str, object]:
    """Cluster the embeddings and write ``clusters`` and ``centroids``; skipped when already done."""
    config = config or ClusterConfig()
    ledger = Ledger(root, STAGE)
    store = CatalogArrayStore(root, STAGE)
    if overwrite:
        ledger.reset()
        store.clear()
    image_ids, vectors = _read_inputs(root, config, embeddings, ids)
    dim = vectors.dim if isinstance(vectors, RowIndex) else vectors.shape[1]
    specs = level_specs(config, len(image_ids), dim)
    plan = fingerprint(config.plan_settings(), [asdict(s) for s in specs], len(image_ids), int(image_ids.sum()))
    if ledger.is_complete() and ledger.done().get("all", {}).get("plan") == plan:
        return {"skipped": True, "levels": [s.k for s in specs]}
    ledger.check_plan(plan)
    device = _device(config.device)
    with RunManifest(root, STAGE, asdict(config)) as manifest:
        manifest.inputs = {"rows": len(image_ids), "dim": dim, "levels": [asdict(s) for s in specs]}
        steps = sum(1 + s.resampling_steps for s in specs)
        with progress(steps, "cluster", unit="step") as bar, _level1(vectors, config, specs, device) as level1:
            hierarchy = hierarchical_kmeans(level1, specs, seed=config.seed, metric=config.metric,
                                            n_iter=config.n_iter, device=device, store=store,
                                            progress=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))
        delete_table(root, "clusters")
        delete_table(root, "centroids")
        write_shards(root, "clusters", "clusters", clusters_table(image_ids, hierarchy))
        write_shards(root, "centroids", "centroids", centroids_table(hierarchy))
        manifest.rows = {"in": len(image_ids), "out": len(image_ids), "errored": 0}
        manifest.notes = {"inertia": hierarchy.inertia, "k": [len(c) for c in hierarchy.centroids]}
    ledger.mark("all", {"plan": plan})
    ledger.mark_complete(manifest.notes)
    return {"skipped": False, "levels": manifest.notes["k"], "inertia": hierarchy.inertia}
