"""The cluster stage's update of a grown pool: new images assigned down the recorded hierarchy, and how
far they lie from it (the drift report, `curation.drift`)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.embeddings import to_numpy
from catalog.ledger_items import Item, generation_of, live
from catalog.paths import join, write_bytes_atomic
from catalog.schemas import CENTROIDS_TABLE, CLUSTERS_TABLE, EMBEDDINGS_TABLE, POOL_TABLE
from catalog.shards import read_table, table_exists
from curation.drift import drift_report
from curation.kmeans_assign import Metric, assign

if TYPE_CHECKING:
    import torch

log = logging.getLogger("curate.pipelines")


def cluster_items(root: str, exclude_duplicates: bool) -> list[Item]:
    """The ids the cluster stage clusters (the embeddings but those dedup and the filter removed), in id
    order, each with its image's hash (another image under the same id is a changed item)."""
    from catalog.sql import query  # DuckDB: imported where used, as the stage's module is by the CLI's --help
    from pipelines.embedding_source import filtered_ids, removed_ids

    ids = np.unique(read_table(root, EMBEDDINGS_TABLE, ["image_id"]).column("image_id").to_numpy())
    exclude = np.union1d(removed_ids(root), filtered_ids(root)) if exclude_duplicates else filtered_ids(root)
    ids = ids[~np.isin(ids, exclude)]
    sha: dict[int, str] = {}
    if table_exists(root, POOL_TABLE):
        pool = query(root, "SELECT image_id, sha256 FROM pool WHERE status = 'ok'")
        sha = dict(zip(pool.column("image_id").to_pylist(), pool.column("sha256").to_pylist()))
    return [Item(str(i), sha.get(i) or "-") for i in ids.tolist()]


def assign_down(root: str, ids: np.ndarray, metric: Metric, device: str,
                dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, labels [n, levels], distances)``: each image's nearest level-1 centroid of the recorded
    hierarchy (with the clustering's metric, so distances compare with ``clusters.distance``), then that
    cluster's parents up the levels."""
    from pipelines.embedding_source import load_vectors

    centroids = read_table(root, CENTROIDS_TABLE).sort_by([("level", "ascending"), ("cluster_id", "ascending")])
    level = centroids.column("level").to_numpy()
    parent = centroids.column("parent_id").to_numpy()
    c1 = to_numpy(centroids.column("centroid").combine_chunks(), centroids.schema.field("centroid").type.list_size)
    all_ids, x = load_vectors(root)
    order = np.argsort(all_ids, kind="stable")
    rows = order[np.searchsorted(all_ids, ids, sorter=order)]
    labels, distances = assign(x[rows], c1[level == 1], metric=metric, device=device, dtype=dtype)
    columns = [labels]
    for lvl in range(2, int(level.max()) + 1):
        columns.append(parent[level == lvl - 1][columns[-1]])
    return ids, np.stack(columns, axis=1), distances


def labelled_table(ids: np.ndarray, labels: np.ndarray, distances: np.ndarray) -> pa.Table:
    columns = [pa.array(ids, pa.int64())] + [pa.array(labels[:, i]) for i in range(labels.shape[1])]
    columns.append(pa.array(distances.astype(np.float32)))
    return pa.Table.from_arrays(columns, schema=schemas.stamp(schemas.clusters(labels.shape[1]), CLUSTERS_TABLE))


def clustered_distances(root: str, assigned: np.ndarray | None = None) -> np.ndarray:
    """Distances to their level-1 centroid of the images in ``clusters`` (but the ``assigned`` ones)."""
    table = read_table(root, CLUSTERS_TABLE, ["image_id", "distance"])
    keep = ~np.isin(table.column("image_id").to_numpy(), assigned if assigned is not None else [])
    return table.column("distance").to_numpy()[keep]


def write_drift_report(root: str, members: dict[str, list[list[str]]], generation: int,
                       max_drift: float) -> dict[str, Any]:
    """The drift of the latest update's images (``reports/cluster/drift.json``), loudly past ``max_drift``."""
    assigned = np.asarray([int(k) for unit, pairs in members.items() if generation_of(unit) for k in live(pairs)],
                          np.int64)
    latest = np.asarray([int(k) for unit, pairs in members.items() if generation_of(unit) == generation
                         for k in live(pairs)], np.int64)
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
