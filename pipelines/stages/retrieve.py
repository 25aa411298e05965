"""``curate retrieve --seed NAME``: the pool images that look like a trusted seed dataset.

``knn`` takes the k nearest pool images of every seed image (large seeds); ``cluster`` takes images
from the pool clusters that hold more than a few seed images (small seeds); ``auto`` picks by seed
size. Duplicates found by ``curate dedup`` are never retrieved. The faiss index is saved under the
catalog and reused while the embeddings it indexes are unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.ledger import Ledger
from catalog.manifest import RunManifest
from catalog.paths import exists, join, read_bytes, write_bytes_atomic
from catalog.shards import table_exists, write_shards
from catalog.sql import query
from curation.index import PoolIndex, build_index, fingerprint
from curation.kmeans import assign
from curation.retrieval import (
    KNN_K,
    MIN_SEED_PER_CLUSTER,
    RetrievalResult,
    choose_mode,
    cluster_retrieve,
    knn_retrieve,
)
from pipelines.embedding_source import load_vectors, removed_ids
from pipelines.reports import write_retrieval_report
from pipelines.stages.seeds import SeedsConfig, resolve_seed, seed_vectors

STAGE = "retrieve"


@dataclass(frozen=True)
class RetrieveConfig:
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


def pool_index(root: str, x: np.ndarray, config: RetrieveConfig) -> PoolIndex:
    """Load the saved index of these exact embeddings, or build and save one."""
    url = join(root, "_index", f"pool-{fingerprint(x)[:16]}.faiss")
    if exists(url):
        return PoolIndex.from_bytes(read_bytes(url), use_gpu="auto")
    index = build_index(x, recall_target=config.recall_target, seed=config.seed)
    write_bytes_atomic(url, index.to_bytes())
    return index


def _cluster_mode(root: str, pool_ids: np.ndarray, seed_x: np.ndarray, config: RetrieveConfig) -> RetrievalResult:
    if not table_exists(root, "clusters"):
        raise FileNotFoundError("cluster-based retrieval needs the clusters of `curate build-lvd` (or `curate cluster`)")
    level = config.cluster_level
    clusters = query(root, f"SELECT image_id, l{level} AS label FROM clusters")
    label_of = dict(zip(clusters.column("image_id").to_pylist(), clusters.column("label").to_pylist()))
    pool_labels = np.asarray([label_of.get(int(i), -1) for i in pool_ids], np.int64)
    cents = query(root, f"SELECT cluster_id, centroid FROM centroids WHERE level = {level} ORDER BY cluster_id")
    c = np.asarray(cents.column("centroid").to_pylist(), np.float32)
    seed_labels, _ = assign(seed_x, c, metric="cosine")
    keep = pool_labels >= 0
    result = cluster_retrieve(pool_labels[keep], np.asarray(seed_labels), seed=config.seed,
                              min_seed_per_cluster=config.min_seed_per_cluster, per_cluster=config.per_cluster)
    rows = np.flatnonzero(keep)[result.rows]
    return RetrievalResult(rows, result.seed_rows, result.rank, result.similarity)


def retrieved_table(seed: str, pool_ids: np.ndarray, seed_ids: np.ndarray, result: RetrievalResult) -> pa.Table:
    seed_image = np.where(result.seed_rows >= 0, seed_ids[np.maximum(result.seed_rows, 0)], -1)
    return pa.table({"image_id": pa.array(pool_ids[result.rows], pa.int64()),
                     "seed": pa.array([seed] * len(result), pa.string()),
                     "seed_image_id": pa.array(seed_image, pa.int64()),
                     "rank": pa.array(result.rank, pa.int32()),
                     "similarity": pa.array(result.similarity, pa.float32())},
                    schema=schemas.stamp(schemas.RETRIEVED, "retrieved"))


def retrieve(root: str, seed: str, config: RetrieveConfig | None = None, *, address: str | None = None
             ) -> dict[str, object]:
    """Retrieve for one seed and (re)write its rows of the ``retrieved`` table."""
    config = config or RetrieveConfig()
    name, spec = resolve_seed(seed, root, config.seeds)
    with RunManifest(root, STAGE, {"seed": name, **asdict(config)}) as manifest:
        seed_ids, seed_x, seed_uris = seed_vectors(root, name, spec, address=address)
        pool_ids, x = load_vectors(root)
        keep = ~np.isin(pool_ids, removed_ids(root))
        pool_ids, x = pool_ids[keep], np.ascontiguousarray(x[keep])
        mode = config.mode if config.mode != "auto" else choose_mode(len(seed_ids), config.knn_min_seeds)
        if mode == "knn":
            index = pool_index(root, x, config)
            result = knn_retrieve(index, seed_x, config.k, config.min_similarity, config.max_per_seed)
            manifest.notes["index"] = index.params
        else:
            result = _cluster_mode(root, pool_ids, seed_x, config)
            if config.max_per_seed is not None and len(result) > config.max_per_seed:
                pick = np.sort(np.argsort(result.rank, kind="stable")[: config.max_per_seed])
                result = RetrievalResult(result.rows[pick], result.seed_rows[pick], result.rank[pick],
                                         result.similarity[pick])
        write_shards(root, "retrieved", f"seed={name}", retrieved_table(name, pool_ids, seed_ids, result))
        manifest.inputs = {"seed": name, "seed_images": len(seed_ids), "pool": len(pool_ids), "mode": mode}
        manifest.rows = {"in": len(pool_ids), "out": len(result), "errored": 0}
    Ledger(root, STAGE).mark(f"seed={name}", {"mode": mode, "retrieved": len(result)})
    report = write_retrieval_report(root, name, dict(zip(seed_ids.tolist(), seed_uris)), config.cluster_level)
    return {"seed": name, "mode": mode, "retrieved": len(result), "seed_images": len(seed_ids), "report": report}


def retrieved_uris(root: str, seed: str) -> pa.Table:
    """The retrieved rows of one seed joined with the pool's uris (for the mix and reports)."""
    return query(root, "SELECT r.image_id, p.uri, r.seed_image_id, r.rank, r.similarity FROM retrieved r "
                       f"JOIN pool p USING (image_id) WHERE r.seed = '{seed}' ORDER BY r.image_id")

