"""k-NN search on Ray actors: dedup's copy graph and retrieval's seed queries, split by query block.

Each `SearchWorker` actor holds the whole index (shipped once through the object store) and answers
the query blocks it is handed, round robin; the driver keeps at most two blocks per worker in flight,
so the queries never travel all at once. The blocks are the ones the in-process search uses (same
first rows, same sizes) and faiss answers a block the same wherever it runs, so the edges, the
components and the retrieved rows are identical for any number of workers. What comes back is edges
(dedup) or top-k rows (retrieval), never vectors: the components are merged on the driver from the
edge list alone (`curation.components.ComponentForest`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np

from catalog.ray_runtime import ensure_ray
from catalog.threads import ensure_threads
from curation.dedup import EdgeQuery, Edges
from curation.index import SEARCH_BATCH, PoolIndex

log = logging.getLogger("curate.pipelines")

IN_FLIGHT_PER_WORKER = 2


class SearchWorker:  # a Ray actor (ray.remote is applied when one starts: no Ray import for in-process runs)
    """One copy of the index, searching the query blocks it is sent."""

    def __init__(self, index_bytes: bytes):
        ensure_threads()  # faiss/OpenMP threads for the CPUs Ray gave this actor
        self.index = PoolIndex.from_bytes(index_bytes)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def edges(self, first_row: int, queries: np.ndarray, query: EdgeQuery) -> Edges:
        return query.edges(self.index, first_row, queries)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k, batch_size=len(queries) or 1)


class RaySearch:
    """`curation.dedup.EdgeSearch` and `curation.retrieval.KnnSearch` on ``workers`` Ray actors.

    Each search starts its actors for the index it is given and ends them when done; ``nodes`` collects
    the Ray nodes they ran on (a check that a multi-node cluster was used). ``query_block``: seed images
    per task of `knn_search`; `PoolIndex.search` with the same ``batch_size`` is its in-process twin.
    """

    def __init__(self, workers: int, num_cpus: float = 1.0, address: str | None = None,
                 query_block: int = SEARCH_BATCH):
        if workers < 2:
            raise ValueError(f"RaySearch is for workers > 1, got {workers}: search in process instead")
        self.workers, self.num_cpus, self.address, self.query_block = workers, num_cpus, address, query_block
        self.nodes: set[str] = set()

    @contextmanager
    def _actors(self, index: PoolIndex) -> Iterator[list]:
        import ray

        ensure_ray(self.address)
        shipped = ray.put(index.to_bytes())
        actor = ray.remote(SearchWorker).options(num_cpus=self.num_cpus)
        actors = [actor.remote(shipped) for _ in range(self.workers)]
        try:
            self.nodes |= set(ray.get([a.node.remote() for a in actors]))
            log.info("search: %d Ray workers on %d node(s)", len(actors), len(self.nodes))
            yield actors
        finally:
            for a in actors:
                ray.kill(a)

    def _ordered(self, index: PoolIndex, method: str, calls: Iterable[tuple]) -> Iterator:
        """Each call's answer in call order, calls spread round robin, a bounded number in flight."""
        import ray

        with self._actors(index) as actors:
            pending: deque = deque()
            for i, args in enumerate(calls):
                pending.append(getattr(actors[i % len(actors)], method).remote(*args))
                if len(pending) >= IN_FLIGHT_PER_WORKER * len(actors):
                    yield ray.get(pending.popleft())
            while pending:
                yield ray.get(pending.popleft())

    def edge_search(self, index: PoolIndex, blocks: Iterable[tuple[int, np.ndarray]],
                    query: EdgeQuery) -> Iterator[Edges]:
        """Each block's copy-graph edges (`curation.dedup.local_edges` on the actors)."""
        return self._ordered(index, "edges", ((start, np.ascontiguousarray(q), query) for start, q in blocks))

    def knn_search(self, index: PoolIndex, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of every query row, ``query_block`` rows per task."""
        blocks = ((np.ascontiguousarray(q[s : s + self.query_block]), k) for s in range(0, len(q), self.query_block))
        parts = list(self._ordered(index, "search", blocks))
        if not parts:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts])
