"""Retrieve pool images that resemble a seed dataset (DINOv2 LVD-142M, Oquab et al. 2023 §3).

Large seed sets: the k nearest pool images of every seed image (k=4 for ImageNet-22k and Google
Landmarks). Small seed sets: k-means clusters of the pool that hold more than 3 seed images,
a fixed number of pool images drawn from each (10,000 per cluster in DINOv2); retrieval per seed
dataset is capped (1M in DINOv2).

Cluster mode only works when the seed images bunch up in the pool's clusters. DINOv2's clusters held
thousands of images each; on a 766-image pool whose level-1 clusters held ~4 images, no cluster held
more than 3 seed images and cluster mode retrieved nothing. So `choose_mode` looks at how the seeds
actually fall into clusters (`seed_support`), and `cluster_retrieve` says why when it comes back empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from curation.index import PoolIndex

KNN_K = 4  # DINOv2: 4 neighbours per seed image for ImageNet-22k / GLDv2
MIN_SEED_PER_CLUSTER = 3  # DINOv2: clusters associated with > 3 seed images
#: Cluster mode only when the eligible clusters hold at least this share of the seed images: below it,
#: most seeds would retrieve nothing, and k-NN represents every seed image.
MIN_SEED_SHARE = 0.5
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
    note: str = ""  # why the result is empty (or smaller than asked), with the numbers

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class SeedSupport:
    """How a seed set falls into the pool's clusters: what cluster mode would retrieve around."""

    n_seed: int
    clusters_with_seeds: int
    max_seeds_in_one: int
    eligible_clusters: int  # clusters holding more than min_seed_per_cluster seed images
    seeds_in_eligible: int
    min_seed_per_cluster: int

    @property
    def share(self) -> float:
        """Fraction of the seed images inside eligible clusters."""
        return self.seeds_in_eligible / self.n_seed if self.n_seed else 0.0

    def describe(self) -> str:
        return (f"{self.eligible_clusters} of the {self.clusters_with_seeds} clusters holding seed images hold more "
                f"than {self.min_seed_per_cluster} of the {self.n_seed} seed images (at most {self.max_seeds_in_one} "
                f"in one); they hold {self.share:.0%} of the seeds")


def seed_support(seed_labels: np.ndarray, min_seed_per_cluster: int = MIN_SEED_PER_CLUSTER) -> SeedSupport:
    """Count, per pool cluster, the seed images assigned to it (``seed_labels``: one cluster per seed)."""
    counts = np.bincount(np.asarray(seed_labels, dtype=np.int64)) if len(seed_labels) else np.zeros(0, np.int64)
    eligible = counts > min_seed_per_cluster
    return SeedSupport(n_seed=len(seed_labels), clusters_with_seeds=int((counts > 0).sum()),
                       max_seeds_in_one=int(counts.max(initial=0)), eligible_clusters=int(eligible.sum()),
                       seeds_in_eligible=int(counts[eligible].sum()), min_seed_per_cluster=min_seed_per_cluster)


#: Top-k search of query rows against an index: (similarities [Q, k], pool rows [Q, k]), as `PoolIndex.search`.
KnnSearch = Callable[[PoolIndex, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def top_neighbours(sims_a: np.ndarray, ids_a: np.ndarray, sims_b: np.ndarray, ids_b: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per seed image, the ``k`` most similar of two neighbour lists of disjoint images (an empty place has
    similarity -inf), best first; at equal similarity the first list's entry comes first."""
    sims, ids = np.concatenate([sims_a, sims_b], axis=1), np.concatenate([ids_a, ids_b], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


def merge_neighbours(sims: np.ndarray, rows: np.ndarray, min_similarity: float | None = None,
                     max_per_seed: int | None = None) -> RetrievalResult:
    """Each seed image's neighbours (``rows`` [S, k] best first, -1 where there are fewer) as one result:
    every pool row once, with its best similarity, rank and seed image."""
    k = rows.shape[1]
    seed_rows = np.broadcast_to(np.arange(rows.shape[0], dtype=np.int64)[:, None], rows.shape)
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
    """`per_cluster` random pool rows (all if fewer) from every cluster with > min seeds in it.

    An empty result carries a ``note`` saying why (no cluster holds enough seeds, or those that do
    hold no pool row), so a caller can fall back to k-NN and tell the user the numbers.
    """
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
        note=_empty_note(len(rows), seed_support(seed_labels, min_seed_per_cluster)),
    )


def _empty_note(n_rows: int, support: SeedSupport) -> str:
    if n_rows:
        return ""
    if support.eligible_clusters == 0:
        return f"cluster mode retrieved nothing: {support.describe()}"
    return (f"cluster mode retrieved nothing: the {support.eligible_clusters} clusters holding more than "
            f"{support.min_seed_per_cluster} seed images hold no pool image")


def choose_mode(
    n_seed: int,
    threshold: int = KNN_MODE_MIN_SEEDS,
    *,
    support: SeedSupport | None = None,
    min_seed_share: float = MIN_SEED_SHARE,
) -> Literal["knn", "cluster"]:
    """k-NN for seed sets above ``threshold`` (DINOv2); below it, cluster mode only where the seeds
    bunch up: ``support`` (from `seed_support`) must show eligible clusters holding at least
    ``min_seed_share`` of the seed images, else k-NN. Without ``support`` only the size decides."""
    if n_seed > threshold:
        return "knn"
    if support is not None and (support.eligible_clusters == 0 or support.share < min_seed_share):
        return "knn"
    return "cluster"
