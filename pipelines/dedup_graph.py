"""The copy step's graph kept between runs, so that dedup on a grown pool searches only what is new.

A finished copy step leaves, under ``_checkpoints/dedup/``, each searched image's copy component and a
hash of its bytes, the key of the settings it was searched with, and (an IVF index, pools over
`curation.index.EXACT_MAX` rows) the index itself. The next run on the same settings:

- keeps the component of every image still there with the same bytes;
- searches again the images that are new or changed, and every member of a component that lost one (an
  image that left may have been the link between the others), against an index of every image: the
  kept IVF index with those images' old rows removed and the searched ones added (its quantiser stays
  the one trained first; ``--overwrite`` trains it again), or a flat index built anew;
- so its components, and the duplicates, are those of a search of the whole pool (exactly so with a
  flat index; an IVF index finds a pair with the recall it was tuned for either way).

The files are the copy unit's output (`pipelines.stage.Output.files`), written before its rows and
marker: a kill before the marker redoes the unit from them, and finds the same result.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from catalog.array_store import CatalogArrayStore, checkpoint_path, npz_bytes
from catalog.id_lookup import lookup, positions
from catalog.paths import HashingReader, HashingWriter, Produce, exists, join, read_stream
from curation.dedup import KnownComponents
from curation.index import PoolIndex, RowSource, build_index
from curation.index_rows import ListRows

log = logging.getLogger("curate.pipelines")

STAGE, GRAPH = "dedup", "copy_graph"  # the bundle under the dedup stage's checkpoints
#: A 64-bit hash of an image's bytes (its sha256) in DuckDB: an image rewritten under its id gets another.
CONTENT_HASH = "(hash(sha256) >> 1)::BIGINT"
GRAPH_FILE = checkpoint_path(STAGE, GRAPH)
INDEX_FILE = "_checkpoints/dedup/copy_index.faiss"


@dataclass(frozen=True)
class GraphStart:
    """What the copy search starts from: the index, the known components (None: search everything),
    the image behind each label of the index (``label_live``: not removed from it), and the descriptors
    by row (on a first search of a large pool, the index's own lists: `curation.index.build_index`)."""

    index: PoolIndex
    known: KnownComponents | None
    label_ids: np.ndarray
    label_live: np.ndarray
    rows: np.ndarray | ListRows


def graph_start(root: str, key: str, ids: np.ndarray, content: np.ndarray, source: RowSource,
                seed: int) -> GraphStart:
    """The search of ``ids`` (sorted; ``content``: a hash of each image's bytes; ``source``: their
    descriptors), from the graph the last run left with the same ``key``, else from nothing."""
    saved = _load(root, key)
    if saved is None:
        index = build_index(source, seed=seed)
        return GraphStart(index, None, ids, np.ones(len(ids), bool), index.rows)
    x = source.load()
    component = _kept_components(saved, ids, content)
    keep, search = np.flatnonzero(component >= 0), np.flatnonzero(component < 0)
    index = _saved_index(root, saved)
    if index is None:
        order = np.concatenate([keep, search])
        index, label_ids, live, first = build_index(x[order], seed=seed), ids[order], np.ones(len(ids), bool), len(keep)
    else:
        label_ids, live = saved["label_ids"], saved["label_live"].copy()
        dropped = np.flatnonzero(live & ~np.isin(label_ids, ids[keep]))
        first = len(label_ids)
        index.replace_rows(dropped, x[search], first)
        live[dropped] = False
        label_ids, live = np.concatenate([label_ids, ids[search]]), np.concatenate([live, np.ones(len(search), bool)])
    row_of_label = np.where(live, positions(ids, label_ids), -1)
    log.info("dedup: the copy graph of the last run holds %d of %d images; searching %d (new, changed, or in a "
             "copy group that lost an image)", len(keep), len(ids), len(search))
    return GraphStart(index, KnownComponents(component, row_of_label, first), label_ids, live, x)


def _kept_components(saved: dict[str, np.ndarray], ids: np.ndarray, content: np.ndarray) -> np.ndarray:
    """Each image's saved component where it stays valid, else -1 (to search): new or changed images, and
    every member of a component one of whose images left or changed."""
    at = positions(saved["ids"], ids)
    same = (at >= 0) & (lookup(saved["ids"], saved["content"], ids, 0) == content)
    component = np.where(same, lookup(saved["ids"], saved["component"], ids, -1), -1)
    lost = ~np.isin(saved["ids"], ids[same])
    component[np.isin(component, saved["component"][lost]) & (component >= 0)] = -1
    return component


def _load(root: str, key: str) -> dict[str, np.ndarray] | None:
    saved = CatalogArrayStore(root, STAGE).get(GRAPH)
    if saved is not None and str(saved["key"]) != key:
        log.info("dedup: the saved copy graph was searched with other settings; searching every image")
        return None
    return saved


def _saved_index(root: str, saved: dict[str, np.ndarray]) -> PoolIndex | None:
    """The kept IVF index, if the graph has one and it is the one the graph was saved with (read in
    pieces and hashed as it is read: the index is never held twice)."""
    sha = str(saved["index_sha256"])
    url = join(root, INDEX_FILE)
    if not sha or not exists(url):
        return None

    def checked(f: BinaryIO) -> PoolIndex | None:
        reader = HashingReader(f)
        try:
            index = PoolIndex.read(reader)
        except (ValueError, RuntimeError, struct.error):  # not an index (faiss raises RuntimeError)
            return None
        return index if reader.sha256_of_all() == sha else None

    return read_stream(url, checked)


def _index_sha256(index: PoolIndex) -> str:
    hashing = HashingWriter()
    index.write(hashing)
    return hashing.sha256


def graph_files(key: str, ids: np.ndarray, content: np.ndarray, component: np.ndarray,
                start: GraphStart) -> dict[str, bytes | Produce]:
    """The graph to keep (catalog-relative path -> bytes): components by image, and an IVF index whole
    (written in pieces when the unit commits, after the graph that names its sha256)."""
    ivf = start.index.params["kind"] != "flat"
    searched = len(ids) if start.known is None else len(start.known.search_rows())
    graph = npz_bytes({"key": np.array(key), "ids": ids, "content": content, "component": component.astype(np.int64),
                       "searched": np.array(searched),
                       "label_ids": start.label_ids if ivf else np.empty(0, np.int64),
                       "label_live": start.label_live if ivf else np.empty(0, bool),
                       "index_sha256": np.array(_index_sha256(start.index) if ivf else "")})
    return {GRAPH_FILE: graph, **({INDEX_FILE: start.index.write} if ivf else {})}


def graph_summary(root: str) -> dict[str, int] | None:
    """How many images the kept graph holds and how many its run searched (None without a graph)."""
    saved = CatalogArrayStore(root, STAGE).get(GRAPH)
    return None if saved is None else {"images": len(saved["ids"]), "searched": int(saved["searched"])}
