"""A recluster's start: the clustering it replaces, reused where the pool still is.

When a grown pool is clustered again, each level's first k-means starts from that level's old centroids
instead of k-means++, so Lloyd only moves them as far as the new rows pull. Rows the old clustering does
not cover (farther from their old level-1 centroid than 99 % of the images it was fitted on: a concept it
never saw) get their share of the level's centroids as fresh D² seeds, in place of the old clusters that
cost least to lose (`loss_if_dropped`); a level whose k grew with the pool gets its extra centroids the
same way. A two-step level 1 starts its pre-clusters from the old ones and seeds each split with the old
leaves nearest to it.
Resampling steps still restart from k-means++ (why: `curation.hierarchy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from curation.kmeans import RowSource, kmeans_plusplus
from curation.kmeans_assign import Metric, assign


@dataclass(frozen=True)
class WarmStart:
    """The old clustering, level by level, and how much of the pool now lies outside it."""

    centroids: list[np.ndarray]  # per old level, [k_t, d]
    sizes: list[np.ndarray]  # per old level, the members of each cluster (images at level 1)
    far_share: float  # share of the pool farther from its old level-1 centroid than 99 % of the fitted images
    pre: np.ndarray | None = None  # level 1's old pre-clusters, where it was two-step
    pre_sizes: np.ndarray | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"far_share": np.float64(self.far_share)}
        for t, (c, n) in enumerate(zip(self.centroids, self.sizes, strict=True), start=1):
            arrays |= {f"centroids{t}": c, f"sizes{t}": n}
        if self.pre is not None:
            arrays |= {"pre": self.pre, "pre_sizes": self.pre_sizes}
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> WarmStart:
        levels = sum(1 for name in arrays if name.startswith("centroids"))
        return cls([arrays[f"centroids{t}"] for t in range(1, levels + 1)],
                   [arrays[f"sizes{t}"] for t in range(1, levels + 1)], float(arrays["far_share"]),
                   arrays.get("pre"), arrays.get("pre_sizes"))

    def seeds(self, level: int, rows: RowSource, k: int, *, pre: bool, seed: int, metric: Metric,
              device: torch.device) -> np.ndarray | None:
        """``k`` initial centroids for a level's first k-means (``pre``: of its pre-clustering), or None
        where the old clustering had no such level."""
        if pre:
            old, sizes = (self.pre, self.pre_sizes) if level == 1 else (None, None)
        elif level <= len(self.centroids):
            old, sizes = self.centroids[level - 1], self.sizes[level - 1]
        else:
            return None
        if old is None:
            return None
        fresh = min(k, max(k - len(old), round(k * self.far_share)))
        kept = old[np.sort(np.argsort(-loss_if_dropped(old, sizes, metric), kind="stable")[: k - fresh])]
        if not fresh:
            return kept
        return kmeans_plusplus(rows, k, seed=seed, metric=metric, device=device, given=kept)

    def leaf_seeds(self, pre_centroids: np.ndarray, *, metric: Metric,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """The old level-1 centroids by their nearest new pre-cluster, larger clusters first within each:
        ``(group of each, vectors)``, the first sub-centroids of each group's split."""
        groups, _ = assign(self.centroids[0], pre_centroids, metric=metric, device=device)
        order = np.lexsort((-self.sizes[0], groups))
        return groups[order], self.centroids[0][order]


def loss_if_dropped(centroids: np.ndarray, sizes: np.ndarray, metric: Metric) -> np.ndarray:
    """What dropping each centroid would cost, roughly: its members times the squared distance to the
    nearest other centroid they would join. Small for one of two near twins in a dense region, large for
    an isolated tail concept, so a recluster makes room for new concepts without losing the tail."""
    import faiss  # imported where used

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if metric == "cosine":
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    if len(c) < 2:
        return np.full(len(c), np.inf)
    squared, _ = faiss.knn(c, c, 2)
    return sizes * squared[:, 1].astype(np.float64)
