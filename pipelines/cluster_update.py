"""The cluster stage's update of a grown pool: new images assigned down the recorded hierarchy, and how
far they lie from it (the drift report, `curation.drift`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.embeddings import to_numpy
from catalog.ledger_items import Item, shard_items, shard_key, written_ids
from catalog.paths import join, write_bytes_atomic
from catalog.schemas import CENTROIDS_TABLE, CLUSTERS_TABLE, DUPLICATES_TABLE, EMBEDDINGS_TABLE
from catalog.shards import read_shard, read_table, table_dir
from curation.drift import drift_report
from curation.kmeans_assign import Metric, assign

if TYPE_CHECKING:
    import torch

log = logging.getLogger("curate.pipelines")


def cluster_items(root: str, exclude_duplicates: bool) -> list[Item]:
    """The cluster stage's input by shard (`shard_items`): the embeddings, and dedup's duplicates where they
    are left out; which images are new is worked out from the tables (`new_ids`)."""
    tables = (EMBEDDINGS_TABLE, DUPLICATES_TABLE) if exclude_duplicates else (EMBEDDINGS_TABLE,)
    return [item for table in tables for item in shard_items(root, table)]


def excluded_ids(root: str, exclude_duplicates: bool) -> np.ndarray:
    """Images the filter (and, with ``exclude_duplicates``, dedup) removed: never clustered."""
    from pipelines.embedding_source import filtered_ids, removed_ids

    return np.union1d(removed_ids(root), filtered_ids(root)) if exclude_duplicates else filtered_ids(root)


def shard_ids(root: str, keys: Iterable[str]) -> np.ndarray:
    """The image ids in the embeddings shards among these item keys (other tables' shards hold none)."""
    names = sorted(name for table, name in map(shard_key, keys) if table == EMBEDDINGS_TABLE)
    parts = [read_shard(join(table_dir(root, EMBEDDINGS_TABLE), n), ["image_id"]).column("image_id").to_numpy()
             for n in names]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)


def input_ids(root: str, keys: Iterable[str], exclude_duplicates: bool) -> np.ndarray:
    """The images to cluster in these shards (as they are now): those not left out. What a finished unit
    keeps when some of its shards changed or vanished (a changed image moved to a new shard: a new unit
    assigns it)."""
    ids = shard_ids(root, keys)
    return ids[~np.isin(ids, excluded_ids(root, exclude_duplicates))]


def new_ids(root: str, run: str, keys: Iterable[str], generation: int, exclude_duplicates: bool) -> np.ndarray:
    """What an update unit of ``generation`` assigns: the images of its embeddings shards that are neither
    left out nor clustered by an earlier generation's unit (the same answer after a kill, as the unit's own
    rows do not count)."""
    ids = input_ids(root, keys, exclude_duplicates)
    return ids[~np.isin(ids, written_ids(root, CLUSTERS_TABLE, run, lambda g: g < generation))]


def assign_down(root: str, ids: np.ndarray, metric: Metric, device: str,
                dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, labels [n, levels], distances)``: each image's nearest level-1 centroid of the recorded
    hierarchy (with the clustering's metric, so distances compare with ``clusters.distance``), then that
    cluster's parents up the levels."""
    from pipelines.embedding_source import load_vectors

    centroids = recorded_centroids(root)
    level, parent, c1 = centroids["level"], centroids["parent_id"], centroids["centroid"]
    all_ids, x = load_vectors(root)
    order = np.argsort(all_ids, kind="stable")
    rows = order[np.searchsorted(all_ids, ids, sorter=order)]
    labels, distances = assign(x[rows], c1[level == 1], metric=metric, device=device, dtype=dtype)
    columns = [labels]
    for lvl in range(2, int(level.max()) + 1):
        columns.append(parent[level == lvl - 1][columns[-1]])
    return ids, np.stack(columns, axis=1), distances


def recorded_centroids(root: str) -> dict[str, np.ndarray]:
    """The ``centroids`` table as arrays (``level``, ``parent_id``, ``size``, ``centroid`` [k, d]), by level
    then cluster id."""
    table = read_table(root, CENTROIDS_TABLE).sort_by([("level", "ascending"), ("cluster_id", "ascending")])
    vectors = to_numpy(table.column("centroid").combine_chunks(), table.schema.field("centroid").type.list_size)
    return {name: table.column(name).to_numpy() for name in ("level", "parent_id", "size")} | {"centroid": vectors}


def labelled_table(ids: np.ndarray, labels: np.ndarray, distances: np.ndarray) -> pa.Table:
    columns = [pa.array(ids, pa.int64())] + [pa.array(labels[:, i]) for i in range(labels.shape[1])]
    columns.append(pa.array(distances.astype(np.float32)))
    return pa.Table.from_arrays(columns, schema=schemas.stamp(schemas.clusters(labels.shape[1]), CLUSTERS_TABLE))


def clustered_distances(root: str, assigned: np.ndarray | None = None) -> np.ndarray:
    """Distances to their level-1 centroid of the images in ``clusters`` (but the ``assigned`` ones)."""
    table = read_table(root, CLUSTERS_TABLE, ["image_id", "distance"])
    keep = ~np.isin(table.column("image_id").to_numpy(), assigned if assigned is not None else [])
    return table.column("distance").to_numpy()[keep]


def write_drift_report(root: str, run: str, generation: int, max_drift: float) -> dict[str, Any]:
    """The drift of the latest update's images (``reports/cluster/drift.json``), loudly past ``max_drift``."""
    assigned = written_ids(root, CLUSTERS_TABLE, run, lambda g: g > 0)
    latest = written_ids(root, CLUSTERS_TABLE, run, lambda g: g == generation)
    clusters = read_table(root, CLUSTERS_TABLE)
    mine = np.isin(clusters.column("image_id").to_numpy(), latest)
    levels = [c for c in clusters.column_names if c[:1] == "l" and c[1:].isdigit()]
    labels = np.stack([clusters.column(c).to_numpy()[mine] for c in levels], axis=1)
    report = {"generation": generation, **drift_report(clustered_distances(root, assigned), labels[:, -1],
                                                        clusters.column("distance").to_numpy()[mine])}
    write_bytes_atomic(join(root, "reports", "cluster", "drift.json"), json.dumps(report, indent=1).encode())
    if report["share"] > max_drift:
        log.warning("cluster: %.1f%% of the %d images of update %d lie beyond the clustered images' 99th percentile "
                    "distance (max_drift=%g): rerun with --recluster", 100 * report["share"], report["new"],
                    generation, max_drift)
    return report
