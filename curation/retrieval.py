"""Retrieve pool images that resemble a seed dataset (DINOv2 LVD-142M, Oquab et al. 2023 §3).

Large seed sets: the k nearest pool images of every seed image (k=4 for ImageNet-22k and Google
Landmarks). Small seed sets: k-means clusters of the pool that hold more than 3 seed images,
a fixed number of pool images drawn from each (10,000 per cluster in DINOv2); retrieval per seed
dataset is capped (1M in DINOv2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from curation.index import PoolIndex

KNN_K = 4  # DINOv2: 4 neighbours per seed image for ImageNet-22k / GLDv2
MIN_SEED_PER_CLUSTER = 3  # DINOv2: clusters associated with > 3 seed images
PER_CLUSTER = 10_000  # DINOv2: images taken from each such cluster
KNN_MODE_MIN_SEEDS = 1_000_000  # DINOv2: sample-based retrieval for seed sets > 1M images


@dataclass
class RetrievalResult:
    """One entry per retrieved pool row, sorted by row.

    kNN: `seed_rows` is the seed image with the highest similarity to the row, `rank` the best
    (0-based) neighbour rank any seed gave it, `similarity` the highest cosine.
    Cluster: `seed_rows` is -1 (no single seed), `rank` the row's position in its cluster's
    random draw, `similarity` NaN.
    """

    rows: np.ndarray  # int64
    seed_rows: np.ndarray  # int64
    rank: np.ndarray  # int32
    similarity: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.rows)


def knn_retrieve(
    index: PoolIndex,
    seed_x: np.ndarray,
    k: int = KNN_K,
    min_similarity: float | None = None,
    max_per_seed: int | None = None,
) -> RetrievalResult:
    """k nearest pool rows per seed image, merged over seeds; `max_per_seed` keeps the most similar."""
    sims, rows = index.search(seed_x, k)
    seed_rows = np.broadcast_to(np.arange(len(seed_x), dtype=np.int64)[:, None], rows.shape)
    ranks = np.broadcast_to(np.arange(k, dtype=np.int32)[None, :], rows.shape)
    valid = rows >= 0
    if min_similarity is not None:
        valid &= sims >= min_similarity
    r, s, sd, rk = rows[valid], sims[valid], seed_rows[valid], ranks[valid]

    # Per row: best similarity first (ties: better rank, then smaller seed row) -> its seed.
    order = np.lexsort((sd, rk, -s, r))
    r, s, sd, rk = r[order], s[order], sd[order], rk[order]
    first = np.ones(len(r), dtype=bool)
    first[1:] = r[1:] != r[:-1]
    starts = np.flatnonzero(first)
    best_rank = np.minimum.reduceat(rk, starts) if len(starts) else rk[:0]
    out = RetrievalResult(rows=r[first], seed_rows=sd[first], rank=best_rank, similarity=s[first])

    if max_per_seed is not None and len(out) > max_per_seed:
        top = np.sort(np.lexsort((out.rows, -out.similarity))[:max_per_seed])
        out = RetrievalResult(out.rows[top], out.seed_rows[top], out.rank[top], out.similarity[top])
    return out


def cluster_retrieve(
    pool_labels: np.ndarray,
    seed_labels: np.ndarray,
    *,
    min_seed_per_cluster: int = MIN_SEED_PER_CLUSTER,
    per_cluster: int = PER_CLUSTER,
    seed: int = 0,
) -> RetrievalResult:
    """`per_cluster` random pool rows (all if fewer) from every cluster with > min seeds in it."""
    pool_labels = np.asarray(pool_labels, dtype=np.int64)
    seed_labels = np.asarray(seed_labels, dtype=np.int64)
    n_clusters = int(max(pool_labels.max(initial=-1), seed_labels.max(initial=-1))) + 1
    eligible = np.bincount(seed_labels, minlength=n_clusters) > min_seed_per_cluster
    candidates = np.flatnonzero(eligible[pool_labels])
    cand_labels = pool_labels[candidates]
    # A random key per candidate, grouped by cluster: the first per_cluster of each group are drawn.
    keys = np.random.default_rng(seed).random(len(candidates))
    order = np.lexsort((keys, cand_labels))
    grouped = cand_labels[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = grouped[1:] != grouped[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    position = np.arange(len(order)) - group_start
    take = position < per_cluster
    rows = candidates[order[take]]
    by_row = np.argsort(rows)
    return RetrievalResult(
        rows=rows[by_row],
        seed_rows=np.full(len(rows), -1, dtype=np.int64),
        rank=position[take][by_row].astype(np.int32),
        similarity=np.full(len(rows), np.nan, dtype=np.float32),
    )


def choose_mode(n_seed: int, threshold: int = KNN_MODE_MIN_SEEDS) -> Literal["knn", "cluster"]:
    """DINOv2: nearest neighbours per seed image for seed sets above `threshold`, clusters below."""
    return "knn" if n_seed > threshold else "cluster"
