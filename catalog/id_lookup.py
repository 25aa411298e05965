"""Values looked up by ``image_id``: the catalog's tables are read in id order (`catalog.embeddings.load_rows`),
so a column of one table is matched to the rows of another by a search in the sorted ids."""

from __future__ import annotations

import numpy as np


def lookup(sorted_ids: np.ndarray, values: np.ndarray, ids: np.ndarray, fill: int | float) -> np.ndarray:
    """``values`` (aligned with the sorted ``sorted_ids``) of each of ``ids`` (any shape), ``fill`` where an id
    is not among them."""
    values = np.asarray(values)
    out = np.full(np.shape(ids), fill, dtype=values.dtype)
    if len(sorted_ids):
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        found = sorted_ids[at] == ids
        out[found] = values[at[found]]
    return out


def positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The row of each of ``ids`` in the sorted ``sorted_ids``, -1 where it is not there."""
    return lookup(sorted_ids, np.arange(len(sorted_ids), dtype=np.int64), ids, -1)
