"""The cluster stage's recluster start (`curation.warm_start`): the clustering a grown pool's recluster
replaces, kept under ``_checkpoints/cluster-warm/`` before the run's outputs go, so a recluster killed at
any point starts from the same clustering when it resumes. A cold restart (``--overwrite``, a new model)
forgets it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from catalog.array_store import CatalogArrayStore
from catalog.ledger_items import shard_items, written_ids
from catalog.schemas import CENTROIDS_TABLE, CLUSTERS_TABLE, EMBEDDINGS_TABLE
from catalog.shards import read_table, shard_sizes
from curation.drift import far_limit
from curation.kmeans_assign import Metric
from curation.warm_start import WarmStart
from pipelines.cluster_update import assign_down, input_ids, recorded_centroids

if TYPE_CHECKING:
    import torch

STORE = "cluster-warm"  # a store of its own: a restart clears the stage's checkpoints, not this
KEY = "start"


def has_clustering(root: str, run: str) -> bool:
    """Whether the run's centroids are there (a restart cut short after its outputs went has none)."""
    return any(name.startswith(f"{run}=") for name in shard_sizes(root, CENTROIDS_TABLE))


def keep_warm_start(root: str, run: str, stage_store: CatalogArrayStore, exclude_duplicates: bool, metric: Metric,
                    device: str, dtype: torch.dtype) -> None:
    """Keep the run's clustering (its centroids and sizes per level, level 1's pre-clusters from the stage's
    checkpoints) and the share of the pool it leaves far; once its outputs are gone, the kept one stays."""
    if not has_clustering(root, run):
        return
    centroids = recorded_centroids(root)
    level, vectors, sizes = centroids["level"], centroids["centroid"], centroids["size"]
    levels = range(1, int(level.max()) + 1)
    pre = stage_store.get("level1/pre")
    start = WarmStart([vectors[level == t] for t in levels], [sizes[level == t] for t in levels],
                      far_share(root, run, exclude_duplicates, metric, device, dtype),
                      None if pre is None else pre["centroids"],
                      None if pre is None else np.bincount(pre["labels"], minlength=len(pre["centroids"])))
    CatalogArrayStore(root, STORE).put(KEY, start.to_arrays())


def far_share(root: str, run: str, exclude_duplicates: bool, metric: Metric, device: str,
              dtype: torch.dtype) -> float:
    """The share of the images to cluster now that lie farther from their level-1 centroid than 99 % of
    the images the clustering was fitted on (those not yet assigned are assigned here)."""
    pool = input_ids(root, [item.key for item in shard_items(root, EMBEDDINGS_TABLE)], exclude_duplicates)
    clusters = read_table(root, CLUSTERS_TABLE, ["image_id", "distance"])
    ids, distance = clusters.column("image_id").to_numpy(), clusters.column("distance").to_numpy()
    fitted = np.isin(ids, written_ids(root, CLUSTERS_TABLE, run, lambda g: g == 0))
    limit = far_limit(distance[fitted])
    unassigned = np.setdiff1d(pool, ids)
    new = assign_down(root, unassigned, metric, device, dtype)[2] if len(unassigned) else np.empty(0)
    far = int((distance[~fitted & np.isin(ids, pool)] > limit).sum() + (new > limit).sum())
    return far / max(1, len(pool))


def read_warm_start(root: str) -> WarmStart | None:
    kept = CatalogArrayStore(root, STORE).get(KEY)
    return None if kept is None else WarmStart.from_arrays(kept)


def forget_warm_start(root: str) -> None:
    CatalogArrayStore(root, STORE).clear()
