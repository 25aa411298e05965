"""Balanced hierarchical sampling: split a budget top-down over a cluster tree by water-filling.

Every step is a segment operation over all sibling groups of a level at once (sort by parent,
segment prefix sums, a closed-form water level per segment), so the cost is a few sorts of the
level's size, with no per-cluster Python recursion.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class LevelCounts:
    """One level of the tree as aggregates: its cluster ids (sorted, each holding rows), their row counts
    and (below the top) each one's parent at the next level up. This is all water-filling needs, so a
    caller can get it from a group-by over the ``clusters`` table instead of holding every row."""

    ids: np.ndarray
    sizes: np.ndarray
    parents: np.ndarray | None = None


def level_counts(point_labels: np.ndarray) -> list[LevelCounts]:
    """`LevelCounts` of every level (level 1 first) of in-memory ``point_labels`` [N, L]."""
    labels = _as_2d(point_labels)
    out = []
    for level in range(labels.shape[1]):
        child = labels[:, level]
        sizes = np.bincount(child)
        ids = np.flatnonzero(sizes)
        parents = None
        if level + 1 < labels.shape[1]:
            parent_of = np.zeros(len(sizes), dtype=np.int64)
            parent_of[child] = labels[:, level + 1]
            parents = parent_of[ids]
        out.append(LevelCounts(ids, sizes[ids], parents))
    return out


def _id_range(ids: np.ndarray) -> int:
    """Length of a dense array indexed by these cluster ids."""
    return int(ids.max()) + 1 if len(ids) else 0


def _dense(ids: np.ndarray, values: np.ndarray, length: int | None = None) -> np.ndarray:
    out = np.zeros(_id_range(ids) if length is None else length, dtype=np.int64)
    out[ids] = values
    return out


def leaf_budgets(levels: list[LevelCounts], target: int, rng: np.random.Generator,
                 multiplier: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(budget, size)`` per level-1 cluster id: ``target`` water-filled over the top clusters, then over
    the children of every cluster, level by level. Draws from ``rng`` in the order `balanced_sample` does."""
    top = levels[-1]
    budget = water_fill(_capacity(_dense(top.ids, top.sizes), multiplier), target, rng)
    for lc in reversed(levels[:-1]):
        child_budget = np.zeros(_id_range(lc.ids), dtype=np.int64)
        child_budget[lc.ids] = water_fill_segments(_capacity(lc.sizes, multiplier), lc.parents, budget, rng)
        budget = child_budget
    return budget, _dense(levels[0].ids, levels[0].sizes, len(budget))


PREFERRED = 1e6  # subtracted from a preferred row's key: keys are uniform draws or distances, far smaller


class LeafPicker:
    """Picks rows inside level-1 clusters from rows streamed in table order, batch by batch.

    Per cluster with budget b and s rows: every row ⌊b/s⌋ times, plus the b mod s rows of smallest key
    (a uniform draw, or the distance for closest / farthest), ties to the earlier row. Only the current
    best rows of each cluster are kept (a row whose key is not below its full cluster's worst kept key
    is dropped at once), so memory is the picks plus per-cluster counters, whatever the row count.
    Candidates are merged once at least ``merge_rows`` (and as many as are kept) wait, so the sorting
    stays O(N + picks · log) in total.
    """

    def __init__(self, budget: np.ndarray, sizes: np.ndarray, rng: np.random.Generator,
                 strategy: Strategy = "random", merge_rows: int = 65_536) -> None:
        self._merge_rows = merge_rows
        self._copies = budget // np.maximum(sizes, 1)
        self._rem = budget - self._copies * sizes
        self._rng, self._strategy = rng, strategy
        self._threshold = np.where(self._rem == 0, -np.inf, 0.0)
        self._full = self._rem == 0
        self._kept = (np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64))  # leaf, key, row
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_pending = 0
        self._repeated: list[np.ndarray] = []
        self._offset = 0

    def add(self, leaf: np.ndarray, distances: np.ndarray | None = None, preferred: np.ndarray | None = None) -> None:
        """The next rows of the table: their level-1 ids (and distances, for closest / farthest); rows
        ``preferred`` (a previous selection) go before every other row of their cluster, in key order."""
        leaf = np.asarray(leaf, dtype=np.int64)
        rows = np.arange(self._offset, self._offset + len(leaf), dtype=np.int64)
        self._offset += len(leaf)
        if self._strategy == "random":
            key = self._rng.random(len(leaf))
        elif distances is None:
            raise ValueError(f"strategy {self._strategy!r} needs distances")
        else:
            key = np.asarray(distances, dtype=np.float64) * (1.0 if self._strategy == "closest" else -1.0)
        if preferred is not None:
            key = np.where(preferred, key - PREFERRED, key)
        copies = self._copies[leaf]
        if copies.any():
            self._repeated.append(np.repeat(rows, copies))
        keep = ~self._full[leaf] | (key < self._threshold[leaf])
        if keep.any():
            self._pending.append((leaf[keep], key[keep], rows[keep]))
            self._n_pending += int(keep.sum())
        if self._n_pending >= max(len(self._kept[0]), self._merge_rows):
            self._merge()

    def _merge(self) -> None:
        leaf, key, row = (np.concatenate([self._kept[i]] + [p[i] for p in self._pending]) for i in range(3))
        self._pending, self._n_pending = [], 0
        order = np.lexsort((row, key, leaf))
        rank, _ = _segment_rank(leaf[order])
        order = order[rank < self._rem[leaf[order]]]
        self._kept = leaf[order], key[order], row[order]
        ids, last = np.unique(self._kept[0][::-1], return_index=True)
        worst = self._kept[1][len(order) - 1 - last]
        counts = np.bincount(self._kept[0], minlength=len(self._rem))[ids]
        full = (counts == self._rem[ids]) & ~np.isnan(worst)
        self._threshold[ids[full]] = worst[full]
        self._full[ids[full]] = True

    def rows(self) -> np.ndarray:
        """Sorted row indices of every pick (a row repeats when its cluster took whole copies)."""
        self._merge()
        return np.sort(np.concatenate([self._kept[2], *self._repeated]))


def _as_2d(point_labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(point_labels, dtype=np.int64)
    return labels[:, None] if labels.ndim == 1 else labels


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
    small clusters; rows may then repeat. A table too big for memory takes the same steps streamed:
    `leaf_budgets` from aggregates, then `LeafPicker` batch by batch (same picks for the same seed).
    """
    labels = _as_2d(point_labels)
    if strategy != "random" and distances is None:
        raise ValueError(f"strategy {strategy!r} needs distances")
    rng = np.random.default_rng(seed)
    budget, sizes = leaf_budgets(level_counts(labels), target, rng, multiplier)
    picker = LeafPicker(budget, sizes, rng, strategy)
    picker.add(labels[:, 0], distances)
    return picker.rows()
