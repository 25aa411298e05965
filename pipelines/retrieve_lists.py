"""Each seed image's nearest pool images kept between runs, so that k-NN retrieval on a grown pool
searches only the new images.

A k-NN run leaves, under ``_checkpoints/retrieve-<seed>/``, every seed image's ``MARGIN`` × k nearest pool
images (ids and similarities), the pool images it searched, and the key of what it searched with (the
embeddings' model, the seed set's content, k and the index settings). The next run with the same key:

- drops from the lists the images that left the pool (new duplicates, removed files);
- searches every seed image against an index of the new pool images only, and merges: an image not in a
  kept list is no nearer than its last entry, so the merged top k are those of a search of the whole
  pool (exactly so with a flat index);
- searches again, against the whole pool, the seed images whose list lost so many that fewer than k are
  left.

The lists are the retrieve unit's output files, written before its rows and marker, so a kill before the
marker redoes the unit from them and finds the same result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from catalog.array_store import CatalogArrayStore, checkpoint_path, npz_bytes
from catalog.id_lookup import positions
from curation.index import PoolIndex, RowSource, build_index
from curation.retrieval import KnnSearch, top_neighbours

log = logging.getLogger("curate.pipelines")

MARGIN = 2  # kept neighbours per seed image: MARGIN × k, so a few that leave the pool cost no new search


LISTS = "knn_lists"  # the bundle under the retrieve run's checkpoints


def lists_file(run: str) -> str:
    return checkpoint_path(run, LISTS)


@dataclass(frozen=True)
class Neighbours:
    """Each seed image's nearest pool images, best first: ids and similarities [S, depth] (-inf: none)."""

    ids: np.ndarray
    sims: np.ndarray

    def rows(self, pool_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows of ``pool_ids``) of the k nearest, -1 where there are fewer."""
        sims, rows = self.sims[:, :k], positions(pool_ids, self.ids[:, :k])
        ok = np.isfinite(sims) & (rows >= 0)
        return np.where(ok, sims, -np.inf).astype(np.float32), np.where(ok, rows, -1)


def _searched(search: KnnSearch, index: PoolIndex, ids: np.ndarray, q: np.ndarray, depth: int) -> Neighbours:
    """The ``depth`` nearest of the rows ``ids`` indexed by ``index``, padded with empty places."""
    sims, rows = search(index, q, min(depth, index.ntotal))
    pad = depth - rows.shape[1]
    ok = rows >= 0
    found = Neighbours(np.where(ok, ids[np.maximum(rows, 0)], 0), np.where(ok, sims, -np.inf))
    return Neighbours(np.pad(found.ids, ((0, 0), (0, pad))), np.pad(found.sims, ((0, 0), (0, pad)),
                                                                    constant_values=-np.inf))


def knn_neighbours(root: str, run: str, key: str, pool_ids: np.ndarray, x: RowSource, seed_x: np.ndarray, k: int,
                   full_index: Callable[[], PoolIndex], search: KnnSearch,
                   seed: int) -> tuple[Neighbours, dict[str, bytes]]:
    """The seed images' neighbours among ``pool_ids`` (sorted; ``x`` their embeddings, read only where
    needed) and the files that keep them for the next run (``full_index``: the whole pool's index, built
    only if needed)."""
    depth = MARGIN * k
    saved = _load(root, run, key)
    if saved is None:
        found = _searched(search, full_index(), pool_ids, seed_x, depth)
    else:
        found = _updated(saved, pool_ids, x, seed_x, k, depth, full_index, search, seed)
    kept = npz_bytes({"key": np.array(key), "searched": pool_ids, "ids": found.ids, "sims": found.sims})
    return found, {lists_file(run): kept}


def _updated(saved: dict[str, np.ndarray], pool_ids: np.ndarray, x: RowSource, seed_x: np.ndarray, k: int,
             depth: int, full_index: Callable[[], PoolIndex], search: KnnSearch, seed: int) -> Neighbours:
    ids, sims = saved["ids"], np.where(np.isin(saved["ids"], pool_ids), saved["sims"], -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")  # the entries that left go last
    kept = Neighbours(np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1))
    full = np.isfinite(saved["sims"]).sum(axis=1) == depth  # lists that stopped at depth, not at the pool's end
    short = full & (np.isfinite(kept.sims).sum(axis=1) < k)
    new = np.flatnonzero(~np.isin(pool_ids, saved["searched"]))
    if len(new):
        more = _searched(search, build_index(x.take(new), seed=seed), pool_ids[new], seed_x, depth)
        merged_sims, merged_ids = top_neighbours(kept.sims, kept.ids, more.sims, more.ids, depth)
        kept = Neighbours(merged_ids, merged_sims)
    if short.any():
        again = _searched(search, full_index(), pool_ids, seed_x[short], depth)
        kept.ids[short], kept.sims[short] = again.ids, again.sims
    log.info("retrieve: %d new pool images searched; %d seed images searched again against the whole pool",
             len(new), int(short.sum()))
    return kept


def _load(root: str, run: str, key: str) -> dict[str, np.ndarray] | None:
    saved = CatalogArrayStore(root, run).get(LISTS)
    return saved if saved is not None and str(saved["key"]) == key else None
