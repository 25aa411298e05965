"""Connected components of a graph given as edge lists, one shard at a time, without the vectors.

`ComponentForest` is a union-find over node numbers 0..n-1 whose only state is one int64 parent per
node (8 bytes a row). Each root points at the smallest node of its component, so after any sequence
of `add_edges` and `merge` calls — in any order, on any split of the edges — `labels` gives the same
numbering as one `connected_components` call on all edges: components numbered in the order of
their smallest node. That is what lets a Ray stage search the k-NN graph in blocks, feed each block's
edges to a forest (one per worker), and merge the workers' forests at the end.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components as _scipy_components


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


class ComponentForest:
    """Union-find over n nodes, fed edge shards; roots are the smallest node of their component."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    @property
    def n(self) -> int:
        return len(self.parent)

    def find(self, nodes: np.ndarray) -> np.ndarray:
        """Roots of ``nodes``, compressing their paths (parents only ever point at smaller nodes)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        roots = self.parent[nodes]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self.parent[nodes] = roots
        return roots

    def add_edges(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Join the components of every edge's ends; work ∝ edges (and path lengths), not n."""
        if len(src) == 0:
            return
        a, b = self.find(src), self.find(dst)
        roots, local = np.unique(np.concatenate([a, b]), return_inverse=True)
        joined = connected_components(len(roots), local[: len(a)], local[len(a) :])
        # roots are sorted, so each joined component's first local node is its smallest root
        _, first = np.unique(joined, return_index=True)
        self.parent[roots] = roots[first][joined]

    def merge(self, other: ComponentForest) -> None:
        """Fold in another forest over the same nodes (e.g. another worker's edge shards)."""
        if other.n != self.n:
            raise ValueError(f"forests over {self.n} and {other.n} nodes cannot merge")
        self.add_edges(np.arange(self.n, dtype=np.int64), other.roots())

    def roots(self) -> np.ndarray:
        """The smallest node of every node's component [n]."""
        return self.find(np.arange(self.n, dtype=np.int64))

    def labels(self) -> np.ndarray:
        """Component per node, 0..C-1 in order of each component's smallest node (as `connected_components`)."""
        _, dense = np.unique(self.roots(), return_inverse=True)
        return dense.astype(np.int64)
