"""Balanced hierarchical sampling: split a budget top-down over a cluster tree by water-filling.

Every step is a segment operation over all sibling groups of a level at once (sort by parent,
segment prefix sums, a closed-form water level per segment), so the cost is a few sorts of the
level's size, with no per-cluster Python recursion.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Strategy = Literal["random", "closest", "farthest"]


def _segment_rank(seg_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segment ids in sorted order: (position inside its segment, start of its segment)."""
    starts = np.searchsorted(seg_sorted, seg_sorted, side="left")
    return np.arange(len(seg_sorted)) - starts, starts


def water_fill_segments(
    sizes: np.ndarray, segment_ids: np.ndarray, budgets: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Max-min fair split of ``budgets[s]`` over the items of each segment s, capped by ``sizes``.

    Per segment: if Σ sizes ≤ budget every item gets its size; else with t* the largest integer such
    that Σ min(t*, size) ≤ budget, items get min(t*, size) and the remainder (< number of items with
    size > t*) goes as +1 to items drawn uniformly without replacement among those with size > t*.
    Sorted sizes a_1 ≤ … ≤ a_n make Σ min(a_j, a_i) = P_j + a_j (n − j) monotone in j, so t* follows
    from a count instead of a search: t* = ⌊(b − P_j) / (n − j)⌋ for the largest j with that sum ≤ b.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    seg = np.asarray(segment_ids, dtype=np.int64)
    budgets = np.asarray(budgets, dtype=np.int64)
    n_seg = len(budgets)
    out = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) == 0:
        return out
    order = np.lexsort((sizes, seg))
    a, s = sizes[order], seg[order]
    pos, start = _segment_rank(s)
    count = np.bincount(s, minlength=n_seg)
    csum = np.cumsum(a)
    prefix = csum - np.where(start > 0, csum[start - 1], 0)  # P_{pos+1} inside the segment
    filled = prefix + a * (count[s] - pos - 1)
    b = budgets[s]
    j = np.bincount(s, weights=filled <= b, minlength=n_seg).astype(np.int64)
    seg_start = np.concatenate([[0], np.cumsum(count)[:-1]])
    p_j = np.where(j > 0, prefix[np.maximum(seg_start + j - 1, 0)], 0)
    free = count - j
    t_star = np.where(free > 0, (budgets - p_j) // np.maximum(free, 1), np.iinfo(np.int64).max)
    alloc = np.minimum(a, t_star[s])
    rem = budgets - np.bincount(s, weights=alloc, minlength=n_seg).astype(np.int64)
    rem = np.where(free > 0, rem, 0)
    eligible = a > t_star[s]
    key = rng.random(len(a))
    order2 = np.lexsort((key, ~eligible, s))
    rank, _ = _segment_rank(s[order2])
    plus = eligible[order2] & (rank < rem[s[order2]])
    alloc[order2[plus]] += 1
    out[order] = alloc
    return out


def water_fill(sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Water-filling of one budget over one set of capacities (see `water_fill_segments`)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return water_fill_segments(sizes, np.zeros(len(sizes), dtype=np.int64), np.array([budget]), rng)


def _capacity(sizes: np.ndarray, multiplier: float) -> np.ndarray:
    return np.floor(sizes * multiplier).astype(np.int64)


def balanced_sample(
    point_labels: np.ndarray,
    target: int,
    *,
    seed: int = 0,
    strategy: Strategy = "random",
    distances: np.ndarray | None = None,
    multiplier: float = 1.0,
) -> np.ndarray:
    """Sorted row indices of a balanced sample of ``target`` rows (fewer if the pool is smaller).

    ``point_labels`` [N, L] is each row's cluster at every level (column 0 = level 1, as from
    `Hierarchy.point_labels`). The budget is water-filled over top clusters, then over the children
    of every cluster, level by level, down to level-1 clusters. Inside a level-1 cluster rows are
    picked at random, or closest / farthest to its centroid (``distances`` needed). ``multiplier``
    m > 1 lets a cluster of s rows absorb up to ⌊m·s⌋ picks (whole copies first), over-sampling
    small clusters; rows may then repeat.
    """
    labels = np.asarray(point_labels, dtype=np.int64)
    if labels.ndim == 1:
        labels = labels[:, None]
    n, n_levels = labels.shape
    rng = np.random.default_rng(seed)
    top = labels[:, -1]
    top_sizes = np.bincount(top)
    budget = water_fill(_capacity(top_sizes, multiplier), target, rng)
    for level in range(n_levels - 2, -1, -1):
        child, parent = labels[:, level], labels[:, level + 1]
        sizes = np.bincount(child)
        parent_of = np.zeros(len(sizes), dtype=np.int64)
        parent_of[child] = parent
        ids = np.flatnonzero(sizes)
        child_budget = np.zeros(len(sizes), dtype=np.int64)
        child_budget[ids] = water_fill_segments(_capacity(sizes[ids], multiplier), parent_of[ids], budget, rng)
        budget = child_budget
    leaf = labels[:, 0]
    sizes = np.bincount(leaf, minlength=len(budget))
    copies = budget // np.maximum(sizes, 1)
    rem = budget - copies * sizes
    if strategy == "random":
        key = rng.random(n)
    elif distances is None:
        raise ValueError(f"strategy {strategy!r} needs distances")
    else:
        key = np.asarray(distances, dtype=np.float64) * (1.0 if strategy == "closest" else -1.0)
    order = np.lexsort((np.arange(n), key, leaf))
    rank, _ = _segment_rank(leaf[order])
    picked = order[rank < rem[leaf[order]]]
    repeated = np.repeat(np.arange(n), copies[leaf])
    return np.sort(np.concatenate([picked, repeated]))
