"""The rows an IVF index with float16 codes holds, read back by row number like an array.

An index whose codes are the float16 rows themselves (`curation.index`, ``by_residual=False``) is a
copy of the pool. Dedup reads its queries and its pairs' descriptors from that copy instead of keeping
a second one beside it: at 10⁶ × 384 that second copy was 768 MB. Each row's list and place in its
list are known when the lists are filled (`place_rows`), so a row is found without a search, at
8 bytes a row.
"""

from __future__ import annotations

import faiss
import numpy as np


def place_rows(lists: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows per list [nlist], each row's place in its list [N] int32): rows in order within a list."""
    counts = np.bincount(lists, minlength=nlist)
    order = np.argsort(lists, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    place = np.empty(len(lists), np.int32)
    place[order] = np.arange(len(lists)) - np.repeat(starts, counts)
    return counts, place


class ListRows:
    """Rows 0..N-1 of a filled float16 IVF index (``x[i]``, ``x[a:b]``, ``x[rows]``, ``x.shape``, as a
    float16 ndarray would answer them). Valid while the index's lists are unchanged."""

    def __init__(self, index: faiss.IndexIVF, lists: np.ndarray, place: np.ndarray) -> None:
        self.index = index  # kept alive: the views below point into its lists
        self.lists = lists.astype(np.int32)
        self.place = place
        self.dtype = np.dtype(np.float16)
        self.shape = (len(lists), int(index.d))
        inverted = faiss.downcast_InvertedLists(index.invlists)
        self._codes = [self._view(inverted, list_no) for list_no in range(index.nlist)]

    def _view(self, inverted: faiss.InvertedLists, list_no: int) -> np.ndarray:
        size = inverted.list_size(list_no)
        if size == 0:
            return np.empty((0, self.shape[1]), np.float16)
        raw = faiss.rev_swig_ptr(inverted.get_codes(list_no), size * self.index.code_size)
        return raw.view(np.float16).reshape(size, self.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        rows = np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.asarray(key, np.int64)
        out = np.empty((len(rows), self.shape[1]), np.float16)
        lists = self.lists[rows]
        order = np.argsort(lists, kind="stable")
        cuts = np.flatnonzero(np.diff(lists[order])) + 1
        for group in np.split(order, cuts):
            if len(group):
                out[group] = self._codes[lists[group[0]]][self.place[rows[group]]]
        return out
