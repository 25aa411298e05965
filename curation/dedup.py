"""Copy detection: kNN similarity graph, connected components, one keeper each (exact-hash dedup is SQL
in `pipelines/stages/dedup.py`).

Defaults follow the DINOv2 LVD-142M recipe (Oquab et al. 2023, §3 and App. A.3): self-dedup on
SSCD copy-detection embeddings with k=64 nearest neighbours, edges with cosine > 0.6, connected
components, one image kept per component; relative dedup against evaluation sets with the same
procedure at cosine > 0.45, dropping every component that touches an evaluation image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components as _scipy_components

from curation.index import PoolIndex, build_index, fingerprint

COPY_K = 64  # DINOv2: k=64 nearest neighbours per image
COPY_THRESHOLD = 0.6  # DINOv2: self-dedup edge when cosine > 0.6
RELATIVE_THRESHOLD = 0.45  # DINOv2: relative dedup vs eval sets when cosine > 0.45
GRAPH_BATCH = 8_192
# nprobe tuned for recall@10 of ordinary neighbours can be 1 on clustered pools, which misses near
# copies that straddle a cell boundary (1.6% of injected pairs at 1M); copies are what dedup is for.
GRAPH_MIN_NPROBE = 16


def knn_graph(
    index_or_x: PoolIndex | np.ndarray,
    k: int = COPY_K,
    threshold: float = COPY_THRESHOLD,
    *,
    x: np.ndarray | None = None,
    batch_size: int = GRAPH_BATCH,
    min_nprobe: int = GRAPH_MIN_NPROBE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges (src < dst, int64) with cosine > threshold among each row's k neighbours.

    Pass embeddings (an index is built for them) or a PoolIndex plus the embeddings it indexes
    as `x` (checked by fingerprint); IVF indexes are probed at least `min_nprobe` lists. Each pair
    appears once, with the larger of its two measured similarities (approximate search can see a
    pair from one side only, or score it slightly apart).
    """
    if isinstance(index_or_x, PoolIndex):
        if x is None:
            raise ValueError("a PoolIndex needs the embeddings it indexes as x= (the queries)")
        if fingerprint(x) != index_or_x.fingerprint:
            raise ValueError("x is not the embedding matrix this index was built from")
        index = index_or_x
    else:
        x = index_or_x
        index = build_index(x, seed=seed)
    n = x.shape[0]
    kk = min(k + 1, n)  # +1: a row usually finds itself first
    tuned = index.params.get("nprobe")
    nprobe = None if tuned is None else max(tuned, min_nprobe)
    srcs, dsts, sims = [], [], []
    for start in range(0, n, batch_size):
        q_rows = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        s, i = index.search(x[start : start + len(q_rows)], kk, nprobe=nprobe)
        valid = (i >= 0) & (i != q_rows[:, None])
        valid &= np.cumsum(valid, axis=1) <= k  # at most k neighbours besides self
        valid &= s > threshold
        src = np.broadcast_to(q_rows[:, None], i.shape)[valid]
        dst = i[valid]
        srcs.append(np.minimum(src, dst))
        dsts.append(np.maximum(src, dst))
        sims.append(s[valid])
    src, dst, sim = (np.concatenate(a) for a in (srcs, dsts, sims))
    order = np.lexsort((-sim, dst, src))
    src, dst, sim = src[order], dst[order], sim[order]
    first = np.ones(len(src), dtype=bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    return src[first], dst[first], sim[first]


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label per node, 0..C-1 numbered in order of each component's smallest node."""
    graph = sp.coo_matrix(
        (np.ones(len(src), dtype=np.int8), (np.asarray(src), np.asarray(dst))), shape=(n, n)
    ).tocsr()
    _, labels = _scipy_components(graph, directed=False)
    _, first_node, dense = np.unique(labels, return_index=True, return_inverse=True)
    relabel = np.empty(len(first_node), dtype=np.int64)
    relabel[np.argsort(first_node, kind="stable")] = np.arange(len(first_node))
    return relabel[dense]


def select_keepers(
    labels: np.ndarray, priority: np.ndarray, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(keep_mask [n], keeper row of each row's component [n]).

    Keeps the highest priority (pixel count: the largest copy) per component, ties to the smallest
    id (row index when `ids` is None), so the choice does not depend on input order.
    """
    n = len(labels)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    order = np.lexsort((ids, -np.asarray(priority, dtype=np.float64), labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order[1:]] != labels[order[:-1]]
    keeper_of_label = np.empty(int(labels.max()) + 1 if n else 0, dtype=np.int64)
    keeper_of_label[labels[order[first]]] = order[first]
    keep_mask = np.zeros(n, dtype=bool)
    keep_mask[order[first]] = True
    return keep_mask, keeper_of_label[labels]


@dataclass
class DedupResult:
    """Rows are positions in the input arrays; `removed_similarity` aligns with `removed_rows`."""

    removed_rows: np.ndarray  # int64, sorted
    kept_rows: np.ndarray  # int64, sorted
    keeper_of_removed: np.ndarray  # int64, the kept row that stands in for each removed row
    removed_similarity: np.ndarray  # float32, cosine of each removed row to its keeper
    labels: np.ndarray  # int64 [n], component of every row
    n_edges: int


def _rowwise_cosine(x: np.ndarray, a: np.ndarray, b: np.ndarray, batch: int = 65_536) -> np.ndarray:
    out = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), batch):
        xa = np.asarray(x[a[s : s + batch]], dtype=np.float32)
        xb = np.asarray(x[b[s : s + batch]], dtype=np.float32)
        out[s : s + len(xa)] = np.einsum("ij,ij->i", xa, xb)
    return out


def copy_dedup(
    x: np.ndarray,
    ids: np.ndarray,
    priority: np.ndarray,
    k: int = COPY_K,
    threshold: float = COPY_THRESHOLD,
    *,
    index: PoolIndex | None = None,
    seed: int = 0,
) -> DedupResult:
    """Self-dedup: kNN graph -> components -> keep the largest image (then smallest id) of each.

    The reported similarity is to the keeper itself, which can be below `threshold` when the row
    joined the component through a chain of near copies.
    """
    src, dst, _ = knn_graph(x if index is None else index, k, threshold, x=x, seed=seed)
    labels = connected_components(x.shape[0], src, dst)
    keep_mask, keeper = select_keepers(labels, priority, ids)
    removed = np.flatnonzero(~keep_mask)
    return DedupResult(
        removed_rows=removed,
        kept_rows=np.flatnonzero(keep_mask),
        keeper_of_removed=keeper[removed],
        removed_similarity=_rowwise_cosine(x, removed, keeper[removed]),
        labels=labels,
        n_edges=len(src),
    )


def relative_dedup(
    pool_x: np.ndarray,
    eval_x: np.ndarray,
    k: int = COPY_K,
    threshold: float = RELATIVE_THRESHOLD,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Sorted pool rows to drop: every pool row whose component (graph over pool + eval) has an eval row."""
    n_pool = pool_x.shape[0]
    both = np.concatenate([pool_x, np.asarray(eval_x, dtype=pool_x.dtype)])
    src, dst, _ = knn_graph(both, k, threshold, seed=seed)
    labels = connected_components(len(both), src, dst)
    return np.flatnonzero(np.isin(labels[:n_pool], labels[n_pool:]))
