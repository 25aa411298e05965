"""Copy detection: kNN similarity graph, connected components, one keeper each (exact-hash dedup is SQL
in `pipelines/stages/dedup.py`).

The graph is searched block by block (`block_edges`: one query block against the index, the edges
above the threshold out) and its components come from the edges alone (`curation.components`), so
a Ray stage can hand blocks to workers, give each worker a `ComponentForest`, and merge the forests:
the result is the same for any split of the blocks.

Defaults follow the DINOv2 LVD-142M recipe (Oquab et al. 2023, §3 and App. A.3): self-dedup on
SSCD copy-detection embeddings with k=64 nearest neighbours, edges with cosine > 0.6, connected
components, one image kept per component; relative dedup against evaluation sets with the same
procedure at cosine > 0.45, dropping every component that touches an evaluation image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from curation.components import ComponentForest, connected_components
from curation.index import PoolIndex, build_index, fingerprint

__all__ = [
    "COPY_K",
    "COPY_THRESHOLD",
    "RELATIVE_THRESHOLD",
    "DedupResult",
    "EdgeQuery",
    "EdgeSearch",
    "Edges",
    "KnownComponents",
    "Mirror",
    "Verify",
    "block_edges",
    "checked_index",
    "connected_components",
    "copy_dedup",
    "graph_components",
    "graph_nprobe",
    "knn_graph",
    "local_edges",
    "query_blocks",
    "relative_dedup",
    "select_keepers",
    "unique_edges",
]

COPY_K = 64  # DINOv2: k=64 nearest neighbours per image
COPY_THRESHOLD = 0.6  # DINOv2: self-dedup edge when cosine > 0.6
RELATIVE_THRESHOLD = 0.45  # DINOv2: relative dedup vs eval sets when cosine > 0.45
GRAPH_BATCH = 8_192
# nprobe tuned for recall@10 of ordinary neighbours can be 1 on clustered pools, which misses near
# copies that straddle a cell boundary (1.6% of injected pairs at 1M); copies are what dedup is for.
GRAPH_MIN_NPROBE = 16


@dataclass(frozen=True)
class Edges:
    """Undirected edges (src < dst, int64) with their cosine similarity (float32)."""

    src: np.ndarray
    dst: np.ndarray
    sim: np.ndarray

    def __len__(self) -> int:
        return len(self.src)


def checked_index(index_or_x: PoolIndex | np.ndarray, x: np.ndarray | None, seed: int) -> tuple[PoolIndex, np.ndarray]:
    """(index, the rows it indexes): an index is built for bare rows; a given one must match ``x``."""
    if not isinstance(index_or_x, PoolIndex):
        return build_index(index_or_x, seed=seed), index_or_x
    if x is None:
        raise ValueError("a PoolIndex needs the embeddings it indexes as x= (the queries)")
    if x is not index_or_x.rows and fingerprint(x) != index_or_x.fingerprint:  # its own rows need no check
        raise ValueError("x is not the embedding matrix this index was built from")
    return index_or_x, x


def graph_nprobe(index: PoolIndex, min_nprobe: int = GRAPH_MIN_NPROBE) -> int | None:
    """nprobe for the copy graph: the tuned one, but at least ``min_nprobe`` (None for exact indexes)."""
    tuned = index.params.get("nprobe")
    return None if tuned is None else max(tuned, min_nprobe)


Mirror = Callable[[np.ndarray], np.ndarray]
#: A second opinion on candidate edges (bool per edge: a copy), e.g. `curation.copy_verify.edge_check`.
Verify = Callable[[Edges], np.ndarray]


def block_edges(
    index: PoolIndex,
    queries: np.ndarray,
    first_row: int,
    k: int = COPY_K,
    threshold: float = COPY_THRESHOLD,
    *,
    nprobe: int | None = None,
    mirror: Mirror | None = None,
) -> Edges:
    """Edges of one query block (rows ``first_row ..``, themselves indexed): cosine > threshold among
    each row's k neighbours besides itself. A pair may come out of both of its rows' blocks.

    ``mirror`` maps descriptors to those of the mirrored images (`curation.copy_descriptor.mirror`):
    each row is then also searched mirrored, so a left/right flipped copy meets its original.
    """
    edges = _search_edges(index, queries, first_row, k, threshold, nprobe)
    if mirror is None:
        return edges
    flipped = _search_edges(index, mirror(queries), first_row, k, threshold, nprobe)
    return Edges(*(np.concatenate([getattr(edges, f), getattr(flipped, f)]) for f in ("src", "dst", "sim")))


def _search_edges(index: PoolIndex, queries: np.ndarray, first_row: int, k: int, threshold: float,
                  nprobe: int | None) -> Edges:
    kk = min(k + 1, index.ntotal)  # +1: a row usually finds itself first
    q_rows = np.arange(first_row, first_row + len(queries), dtype=np.int64)
    s, i = index.search(queries, kk, nprobe=nprobe)
    valid = (i >= 0) & (i != q_rows[:, None])
    valid &= np.cumsum(valid, axis=1) <= k  # at most k neighbours besides self
    valid &= s > threshold
    src = np.broadcast_to(q_rows[:, None], i.shape)[valid]
    dst = i[valid]
    return Edges(np.minimum(src, dst), np.maximum(src, dst), s[valid])


def unique_edges(parts: Iterable[Edges]) -> Edges:
    """One edge per pair, with the larger of its measured similarities (approximate search can see a
    pair from one side only, or score it slightly apart), sorted by (src, dst)."""
    parts = list(parts)
    src, dst, sim = (np.concatenate([getattr(p, f) for p in parts]) for f in ("src", "dst", "sim"))
    order = np.lexsort((-sim, dst, src))
    src, dst, sim = src[order], dst[order], sim[order]
    first = np.ones(len(src), dtype=bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    return Edges(src[first], dst[first], sim[first])


def query_blocks(x: np.ndarray, batch_size: int = GRAPH_BATCH) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of consecutive blocks: the unit a worker searches."""
    for start in range(0, x.shape[0], batch_size):
        yield start, x[start : start + batch_size]


def knn_graph(
    index_or_x: PoolIndex | np.ndarray,
    k: int = COPY_K,
    threshold: float = COPY_THRESHOLD,
    *,
    x: np.ndarray | None = None,
    batch_size: int = GRAPH_BATCH,
    min_nprobe: int = GRAPH_MIN_NPROBE,
    seed: int = 0,
    mirror: Mirror | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges (src < dst, int64) with cosine > threshold among each row's k neighbours.

    Pass embeddings (an index is built for them) or a PoolIndex plus the embeddings it indexes
    as `x` (checked by fingerprint); IVF indexes are probed at least `min_nprobe` lists. Each pair
    appears once (`unique_edges`).
    """
    index, x = checked_index(index_or_x, x, seed)
    nprobe = graph_nprobe(index, min_nprobe)
    blocks = (block_edges(index, q, start, k, threshold, nprobe=nprobe, mirror=mirror)
              for start, q in query_blocks(x, batch_size))
    e = unique_edges(blocks)
    return e.src, e.dst, e.sim


@dataclass(frozen=True)
class EdgeQuery:
    """What every query block of one copy graph is searched with (`block_edges`'s arguments)."""

    k: int = COPY_K
    threshold: float = COPY_THRESHOLD
    nprobe: int | None = None
    mirror: Mirror | None = None

    def edges(self, index: PoolIndex, first_row: int, queries: np.ndarray) -> Edges:
        return block_edges(index, queries, first_row, self.k, self.threshold, nprobe=self.nprobe,
                           mirror=self.mirror)


#: Searches query blocks ``(first row, rows)`` of an index and yields each block's edges, in block order.
EdgeSearch = Callable[[PoolIndex, Iterable[tuple[int, np.ndarray]], EdgeQuery], Iterator[Edges]]


def local_edges(index: PoolIndex, blocks: Iterable[tuple[int, np.ndarray]], query: EdgeQuery) -> Iterator[Edges]:
    """`EdgeSearch` in this process, one block at a time."""
    for start, q in blocks:
        yield query.edges(index, start, q)


@dataclass(frozen=True)
class KnownComponents:
    """Where an update of the copy graph starts: each row's copy component from an earlier search (-1: a
    row to search now), and the row of ``x`` behind each label of the index (-1: a label removed). The
    rows to search hold the labels from ``first_label`` on, in order, so their query blocks are runs of
    labels as in a full search (a row finds itself and is skipped)."""

    component: np.ndarray  # int64 [n]
    row_of_label: np.ndarray  # int64 [labels]
    first_label: int

    def search_rows(self) -> np.ndarray:
        return self.row_of_label[self.first_label :]

    def join(self, forest: ComponentForest) -> None:
        """Put the known components into ``forest`` (a chain of edges through each one's rows)."""
        rows = np.flatnonzero(self.component >= 0)
        rows = rows[np.argsort(self.component[rows], kind="stable")]
        same = self.component[rows[1:]] == self.component[rows[:-1]]
        forest.add_edges(rows[:-1][same], rows[1:][same])

    def as_rows(self, e: Edges) -> Edges:
        """Edges between labels as edges between rows of ``x`` (src < dst)."""
        a, b = self.row_of_label[e.src], self.row_of_label[e.dst]
        ok = (a >= 0) & (b >= 0)
        a, b = a[ok], b[ok]
        return Edges(np.minimum(a, b), np.maximum(a, b), e.sim[ok])


def graph_components(
    index: PoolIndex,
    x: np.ndarray,
    k: int = COPY_K,
    threshold: float = COPY_THRESHOLD,
    *,
    batch_size: int = GRAPH_BATCH,
    min_nprobe: int = GRAPH_MIN_NPROBE,
    mirror: Mirror | None = None,
    search: EdgeSearch = local_edges,
    verify: Verify | None = None,
    known: KnownComponents | None = None,
) -> tuple[np.ndarray, int]:
    """(component per row, edges found) of the copy graph, streamed: each query block's edges go
    straight into a `ComponentForest`, so no whole edge list is ever held. ``edges found`` counts a
    pair once per row whose search found it (and, with ``verify``, that it confirmed). ``search`` may
    run the blocks elsewhere (Ray workers, `pipelines.distributed_search`): the blocks and so the
    components are the same; ``verify`` runs here, on each block's edges as they come back.

    ``known``: an update; only its rows to search are searched (against every row in ``index``), the
    others keep their components."""
    forest = ComponentForest(x.shape[0])
    query = EdgeQuery(k, threshold, graph_nprobe(index, min_nprobe), mirror)
    found = 0
    blocks = query_blocks(x, batch_size)
    if known is not None:
        known.join(forest)
        rows = known.search_rows()
        blocks = ((known.first_label + s, x[rows[s : s + batch_size]]) for s in range(0, len(rows), batch_size))
    for e in search(index, blocks, query):
        if known is not None:
            e = known.as_rows(e)
        if verify is not None:
            e = unique_edges([e])
            keep = verify(e)
            e = Edges(e.src[keep], e.dst[keep], e.sim[keep])
        forest.add_edges(e.src, e.dst)
        found += len(e)
    return forest.labels(), found


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
    n_edges: int  # edges above the threshold as found (a pair found from both of its rows counts twice)


def _rowwise_cosine(x: np.ndarray, a: np.ndarray, b: np.ndarray, mirror: Mirror | None = None,
                    batch: int = 8_192) -> np.ndarray:
    """cos(x[a_i], x[b_i]) (the better of straight and mirrored with ``mirror``), ``batch`` pairs at a
    time: two float32 blocks of 65,536 pairs were ~250 MB at 384-d, the peak of a dedup at 3×10⁵ rows."""
    out = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), batch):
        xa = np.asarray(x[a[s : s + batch]], dtype=np.float32)
        xb = np.asarray(x[b[s : s + batch]], dtype=np.float32)
        sim = np.einsum("ij,ij->i", xa, xb)
        if mirror is not None:
            sim = np.maximum(sim, np.einsum("ij,ij->i", mirror(xa), xb))
        out[s : s + len(xa)] = sim
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
    mirror: Mirror | None = None,
    batch_size: int = GRAPH_BATCH,
    search: EdgeSearch = local_edges,
    verify: Verify | None = None,
    known: KnownComponents | None = None,
) -> DedupResult:
    """Self-dedup: kNN graph -> components -> keep the largest image (then smallest id) of each.
    With ``verify``, only the candidate edges it confirms join components; with ``known`` (an update:
    ``index`` holds every row under the labels it names), only its rows to search are searched.

    The reported similarity is to the keeper itself (the better of straight and mirrored with
    ``mirror``), which can be below `threshold` when the row joined the component through a chain
    of near copies.
    """
    if known is None:
        index, x = checked_index(x if index is None else index, x, seed)
    elif index is None:
        raise ValueError("an update of the copy graph needs the index that holds its rows")
    labels, n_edges = graph_components(index, x, k, threshold, mirror=mirror, batch_size=batch_size, search=search,
                                       verify=verify, known=known)
    keep_mask, keeper = select_keepers(labels, priority, ids)
    removed = np.flatnonzero(~keep_mask)
    return DedupResult(
        removed_rows=removed,
        kept_rows=np.flatnonzero(keep_mask),
        keeper_of_removed=keeper[removed],
        removed_similarity=_rowwise_cosine(x, removed, keeper[removed], mirror),
        labels=labels,
        n_edges=n_edges,
    )


def relative_dedup(
    pool_x: np.ndarray,
    eval_x: np.ndarray,
    k: int = COPY_K,
    threshold: float = RELATIVE_THRESHOLD,
    *,
    seed: int = 0,
    mirror: Mirror | None = None,
    batch_size: int = GRAPH_BATCH,
    search: EdgeSearch = local_edges,
) -> np.ndarray:
    """Sorted pool rows to drop: every pool row whose component (graph over pool + eval) has an eval row."""
    n_pool = pool_x.shape[0]
    both = np.concatenate([pool_x, np.asarray(eval_x, dtype=pool_x.dtype)])
    labels, _ = graph_components(build_index(both, seed=seed), both, k, threshold, mirror=mirror,
                                 batch_size=batch_size, search=search)
    return np.flatnonzero(np.isin(labels[:n_pool], labels[n_pool:]))
