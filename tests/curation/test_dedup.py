"""Copy detection against brute-force similarity, a BFS reference and hand-built graphs."""

from collections import deque

import numpy as np
import pytest

from curation.components import ComponentForest
from curation.dedup import (
    block_edges,
    connected_components,
    copy_dedup,
    graph_components,
    graph_nprobe,
    knn_graph,
    query_blocks,
    relative_dedup,
    select_keepers,
)
from curation.index import build_index


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def with_copies(n: int, n_groups: int, d: int = 64, seed: int = 0):
    """Random unit vectors (pairwise cosine ~N(0, 1/d), far below 0.6) with groups of 2-4 near
    copies (cosine ~0.9 to their original) written over random rows. Returns x and group per row
    (-1 for rows that are in no group)."""
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, d)))
    group = np.full(n, -1)
    rows = rng.permutation(n)
    used = 0
    for g in range(n_groups):
        size = int(rng.integers(2, 5))
        members = rows[used : used + size]
        used += size
        x[members[1:]] = unit(x[members[0]] + 0.45 * rng.standard_normal((size - 1, d)) / np.sqrt(d))
        group[members] = g
    return x, group


def same_group_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for lab in np.unique(labels[labels >= 0]):
        m = np.flatnonzero(labels == lab)
        pairs |= {(int(a), int(b)) for i, a in enumerate(m) for b in m[i + 1 :]}
    return pairs


def bfs_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    adj = [[] for _ in range(n)]
    for a, b in zip(src.tolist(), dst.tolist()):
        adj[a].append(b)
        adj[b].append(a)
    labels = np.full(n, -1)
    c = 0
    for start in range(n):
        if labels[start] >= 0:
            continue
        labels[start] = c
        queue = deque([start])
        while queue:
            for v in adj[queue.popleft()]:
                if labels[v] < 0:
                    labels[v] = c
                    queue.append(v)
        c += 1
    return labels


def test_components_match_bfs():
    rng = np.random.default_rng(1)
    n = 3000
    src, dst = rng.integers(0, n, size=(2, 2500))
    labels = connected_components(n, src, dst)
    np.testing.assert_array_equal(labels, bfs_components(n, src, dst))
    np.testing.assert_array_equal(connected_components(5, np.array([], int), np.array([], int)), np.arange(5))


@pytest.mark.parametrize("n_shards", [1, 3, 17])
def test_forest_over_edge_shards_matches_bfs(n_shards):
    """Edge shards fed to separate forests and merged in any order give the one-shot components."""
    rng = np.random.default_rng(n_shards)
    n = 5000
    src, dst = rng.integers(0, n, size=(2, 4000))
    shards = np.array_split(rng.permutation(len(src)), n_shards)
    forests = []
    for part in shards:
        forest = ComponentForest(n)
        for piece in np.array_split(part, 3):  # a worker feeds its shard block by block
            forest.add_edges(src[piece], dst[piece])
        forests.append(forest)
    merged = forests[-1]
    for forest in forests[-2::-1]:
        merged.merge(forest)
    np.testing.assert_array_equal(merged.labels(), bfs_components(n, src, dst))
    assert (merged.parent <= np.arange(n)).all()  # roots are the smallest node of their component
    with pytest.raises(ValueError):
        merged.merge(ComponentForest(n + 1))


def test_streamed_graph_components_equal_whole_graph():
    """Blocks searched separately (as Ray workers would), edges never gathered: same components."""
    x, _ = with_copies(12_000, 300, seed=8)
    index = build_index(x, exact_max=2_000)  # IVF, probed at least GRAPH_MIN_NPROBE lists
    src, dst, _ = knn_graph(index, 16, x=x)
    whole = connected_components(len(x), src, dst)
    labels, found = graph_components(index, x, 16, batch_size=1_000)
    np.testing.assert_array_equal(labels, whole)
    assert len(src) <= found <= 2 * len(src)
    workers = [ComponentForest(len(x)), ComponentForest(len(x))]
    for i, (start, q) in enumerate(query_blocks(x, 700)):
        e = block_edges(index, q, start, 16, nprobe=graph_nprobe(index))
        workers[i % 2].add_edges(e.src, e.dst)
    workers[1].merge(workers[0])
    np.testing.assert_array_equal(workers[1].labels(), whole)


def test_knn_graph_equals_brute_force():
    x, _ = with_copies(1500, 120, seed=2)
    k, thr = 5, 0.6
    src, dst, sim = knn_graph(x, k=k, threshold=thr)
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1)[:, :k]
    ref = {}
    for a in range(len(x)):
        for b in nn[a]:
            if s[a, b] > thr:
                ref[(min(a, int(b)), max(a, int(b)))] = s[a, b]
    got = dict(zip(zip(src.tolist(), dst.tolist()), sim.tolist()))
    assert got.keys() == ref.keys() and len(got) == len(src) > 100
    assert (src < dst).all()
    np.testing.assert_allclose([got[p] for p in ref], list(ref.values()), atol=1e-5)


def test_knn_graph_rejects_other_embeddings():
    x, _ = with_copies(500, 10, seed=3)
    index = build_index(x)
    with pytest.raises(ValueError):
        knn_graph(index, x=x[::-1].copy())


@pytest.mark.parametrize("exact_max", [100_000, 2_000])
def test_copy_dedup_finds_injected_groups(exact_max):
    x, group = with_copies(20_000, 400, seed=4)
    ids = np.arange(len(x), dtype=np.int64) + 1000
    priority = np.random.default_rng(5).integers(100, 10_000, size=len(x))
    index = build_index(x, exact_max=exact_max)
    result = copy_dedup(x, ids, priority, k=16, index=index)
    truth = same_group_pairs(group)
    found = same_group_pairs(np.where(np.bincount(result.labels)[result.labels] > 1, result.labels, -1))
    tp = len(truth & found)
    assert tp / len(found) >= 0.95 and tp / len(truth) >= 0.95
    assert len(result.removed_rows) + len(result.kept_rows) == len(x)
    # every removed row stands next to its keeper, the largest image of its component
    keepers = result.keeper_of_removed
    assert (result.labels[keepers] == result.labels[result.removed_rows]).all()
    assert (priority[keepers] >= priority[result.removed_rows]).all()
    np.testing.assert_allclose(
        result.removed_similarity, np.einsum("ij,ij->i", x[result.removed_rows], x[keepers]), atol=1e-5
    )


def test_keepers_largest_then_smallest_id_any_order():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    priority = np.array([10, 30, 30, 5, 5, 1, 7, 8])
    ids = np.array([50, 42, 41, 9, 3, 77, 1, 2])
    keep, keeper = select_keepers(labels, priority, ids)
    np.testing.assert_array_equal(np.flatnonzero(keep), [2, 4, 5, 7])
    np.testing.assert_array_equal(keeper, [2, 2, 2, 4, 4, 5, 7, 7])
    perm = np.random.default_rng(6).permutation(len(labels))
    keep_p, keeper_p = select_keepers(labels[perm], priority[perm], ids[perm])
    assert set(ids[perm][keep_p]) == set(ids[keep])
    np.testing.assert_array_equal(ids[perm][keeper_p], ids[keeper][perm])


def test_relative_dedup_removes_whole_touching_component():
    rng = np.random.default_rng(7)
    d = 256  # random pairs: cosine sd 1/16, so 0.45 is > 7 sd away
    basis = np.linalg.qr(rng.standard_normal((d, 2)))[0].T  # two orthonormal directions
    arc = lambda deg: np.cos(np.radians(deg)) * basis[0] + np.sin(np.radians(deg)) * basis[1]
    # eval point at 0 deg; a pool chain at 40, 80, 120 deg: neighbours cosine 0.77 > 0.45,
    # while the chain's far end has cosine -0.5 to the eval point.
    pool = unit(rng.standard_normal((300, d)))
    chain = [10, 150, 220]
    for row, deg in zip(chain, (40, 80, 120)):
        pool[row] = arc(deg)
    eval_x = unit(np.vstack([arc(0), rng.standard_normal((20, d))]))
    removed = relative_dedup(pool, eval_x, k=8)
    np.testing.assert_array_equal(removed, chain)
