"""The pool's vector index: exact for small pools, a self-tuned IVF index for large ones.

Embeddings are L2-normalised, so inner product is cosine similarity. The index records how it
was built (kind, nlist, nprobe, PQ size, measured recall) so the manifest can say what a
retrieval or dedup result was computed with, and a fingerprint of the embeddings it indexes so
a caller cannot silently query it with the wrong pool.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, Protocol

import faiss
import numpy as np
import psutil
from faiss.contrib.clustering import two_level_clustering
from faiss.contrib.evaluation import knn_intersection_measure
from faiss.contrib.exhaustive_search import knn_ground_truth

from curation.index_rows import ListRows, place_rows

# Brute force stays exact and cheap below this (20k x 384-d: ~15 MFLOP per query, so a full
# k=64 self-kNN graph is ~3e11 FLOP); above it IVF is faster at recall >= 0.95.
EXACT_MAX = 20_000
# faiss k-means warns below 39 training points per centroid; training cost is linear in this.
TRAIN_POINTS_PER_LIST = 40
# Enough k-means iterations for a coarse quantiser (faiss default 25 buys little recall here).
TRAIN_NITER = 10
N_TUNE_QUERIES = 1_000
RECALL_AT = 10
ADD_BATCH = 65_536
TRUTH_BLOCK = 8_192
SEARCH_BATCH = 16_384

_MAGIC = b"CURATEIDX1"

UseGpu = bool | Literal["auto"]


def fingerprint(x: np.ndarray, chunk_rows: int = 65_536) -> str:
    """sha256 of shape, dtype and bytes, read in row chunks so memory-mapped pools stay on disk."""
    h = hashlib.sha256()
    h.update(repr((tuple(x.shape), np.dtype(x.dtype).str)).encode())
    for start in range(0, x.shape[0], chunk_rows):
        h.update(np.ascontiguousarray(x[start : start + chunk_rows]).data)
    return h.hexdigest()


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _blocks(x: np.ndarray, rows: int = ADD_BATCH) -> Iterator[np.ndarray]:
    """float32 row blocks of ``x`` (memory-mapped pools are read one block at a time)."""
    for start in range(0, x.shape[0], rows):
        yield _f32(x[start : start + rows])


class RowSource(Protocol):
    """Rows 0..N-1 that `build_index` reads in batches and never needs whole: an array
    (`InMemoryRows`) or a table read again at each pass (`catalog.embeddings.RowStream`)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(row numbers, rows)`` blocks covering every row once, in any order."""
        ...

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows numbered ``rows`` (sorted, unique)."""
        ...

    def load(self) -> np.ndarray:
        """Every row, as one array."""
        ...


@dataclass(frozen=True)
class InMemoryRows:
    """An array (or memory map) as a `RowSource`."""

    x: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.x.shape[0], ADD_BATCH):
            block = self.x[start : start + ADD_BATCH]
            yield np.arange(start, start + len(block)), block

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.x[rows]

    def load(self) -> np.ndarray:
        return self.x


def _set_nprobe(index: faiss.Index, nprobe: int, on_gpu: bool) -> None:
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", nprobe)


@dataclass
class PoolIndex:
    """A faiss index over pool rows 0..N-1 plus how it was built and what it indexes."""

    index: faiss.Index
    params: dict[str, Any]
    fingerprint: str
    on_gpu: bool = field(default=False)
    #: rows 0..N-1 as `build_index` indexed them (its ``x``, or the index's own lists); None for an index
    #: read back or updated
    rows: np.ndarray | ListRows | None = field(default=None, repr=False, compare=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(
        self, q: np.ndarray, k: int, batch_size: int = SEARCH_BATCH, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cosine similarities [Q,k] float32 and pool rows [Q,k] int64 (-1 where fewer than k).

        `nprobe` overrides the tuned value for this call only (IVF kinds; ignored for flat).
        """
        tuned = self.params.get("nprobe")
        override = nprobe is not None and tuned is not None and nprobe != tuned
        if override:
            _set_nprobe(self.index, min(nprobe, self.params["nlist"]), self.on_gpu)
        sims = np.empty((len(q), k), dtype=np.float32)
        rows = np.empty((len(q), k), dtype=np.int64)
        try:
            for start in range(0, len(q), batch_size):
                s, i = self.index.search(_f32(q[start : start + batch_size]), k)
                sims[start : start + len(s)] = s
                rows[start : start + len(i)] = i
        finally:
            if override:
                _set_nprobe(self.index, tuned, self.on_gpu)
        return sims, rows

    def replace_rows(self, removed: np.ndarray, x: np.ndarray, first_label: int) -> None:
        """IVF kinds: drop the rows labelled ``removed`` and add the rows ``x`` labelled ``first_label`` on
        (an index kept between runs of a growing pool; the quantiser stays the one trained first). The
        index then no longer matches one matrix: its fingerprint says so."""
        if self.params["kind"] == "flat":
            raise ValueError("a flat index is rebuilt, not updated")
        if len(removed):
            self.index.remove_ids(np.asarray(removed, dtype=np.int64))
        labels = first_label + np.arange(len(x), dtype=np.int64)
        for start in range(0, len(x), ADD_BATCH):
            self.index.add_with_ids(_f32(x[start : start + ADD_BATCH]), labels[start : start + ADD_BATCH])
        self.fingerprint, self.rows = "updated", None

    def write(self, out: BinaryIO) -> None:
        """Write the self-contained serialisation (a JSON header with params and fingerprint, then the
        faiss index) to ``out`` in pieces: no second copy of the index is ever held."""
        cpu = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        header = json.dumps({"params": self.params, "fingerprint": self.fingerprint}).encode()
        out.write(_MAGIC + struct.pack("<Q", len(header)) + header)
        faiss.write_index(cpu, faiss.PyCallbackIOWriter(out.write))

    @classmethod
    def read(cls, source: BinaryIO, use_gpu: UseGpu = False) -> PoolIndex:
        """The index `write` wrote, read from ``source`` in pieces."""
        if source.read(len(_MAGIC)) != _MAGIC:
            raise ValueError("not a curate PoolIndex serialisation")
        (n_header,) = struct.unpack("<Q", source.read(8))
        meta = json.loads(source.read(n_header))
        index = faiss.read_index(faiss.PyCallbackIOReader(source.read))
        index, on_gpu = _maybe_to_gpu(index, use_gpu)
        if meta["params"].get("nprobe") is not None:
            _set_nprobe(index, meta["params"]["nprobe"], on_gpu)
        return cls(index=index, params=meta["params"], fingerprint=meta["fingerprint"], on_gpu=on_gpu)

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        self.write(out)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, b: bytes, use_gpu: UseGpu = False) -> PoolIndex:
        return cls.read(io.BytesIO(b), use_gpu)


def _on_gpu(use_gpu: UseGpu) -> bool:
    """Whether indexes (and the quantiser's k-means) go to the GPU: ``"auto"`` where faiss sees one."""
    n_gpus = faiss.get_num_gpus()
    if use_gpu is True and n_gpus == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU")
    return use_gpu is not False and n_gpus > 0


def _maybe_to_gpu(index: faiss.Index, use_gpu: UseGpu) -> tuple[faiss.Index, bool]:
    if not _on_gpu(use_gpu):
        return index, False
    return faiss.index_cpu_to_all_gpus(index), True


def _nlist_for(n: int) -> int:
    """~4*sqrt(N) lists, capped so every list gets enough training points."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // TRAIN_POINTS_PER_LIST))


def _train_quantiser(index: faiss.IndexIVF, xt: np.ndarray, seed: int, gpu: bool) -> None:
    """Train the coarse quantiser of an empty CPU IVF index with two-level k-means (faiss contrib's
    ``two_level_clustering``: √nlist clusters, then each split in proportion to its rows), spherical as
    the rows are unit vectors. Flat k-means reads every training row against every centroid each
    iteration: 40·nlist² rows × centroids, 4.9e12 FLOPs at 10⁶ rows (nlist 4,000); two levels read
    each row against ~2·√nlist centroids, ~30× less there."""
    centroids, _ = two_level_clustering(xt, max(1, int(math.sqrt(index.nlist))), index.nlist,
                                        clustering_niter=TRAIN_NITER, seed=seed, spherical=True, gpu=gpu,
                                        min_points_per_centroid=1)  # the splits have ~40 rows a centroid
    index.quantizer.add(np.ascontiguousarray(centroids, np.float32))
    index.train(xt)  # the rest of the index (PQ codebooks; nothing for float16 codes), the quantiser kept


def _pq_m_for(n: int, d: int, budget: int) -> int:
    """Largest PQ code size (bytes/vector, a divisor of d, at most d/2) whose codes fit `budget`."""
    for m in sorted((m for m in range(1, d // 2 + 1) if d % m == 0), reverse=True):
        if n * (m + 8) <= budget:
            return m
    raise MemoryError(f"{n} vectors do not fit {budget} bytes even with 1-byte PQ codes")


def _add_in_batches(index: faiss.Index, x: np.ndarray) -> None:
    for block in _blocks(x):
        index.add(block)


def _fill_fp16_lists(index: faiss.IndexIVFScalarQuantizer, source: RowSource) -> ListRows:
    """Add rows 0..N-1 of ``source`` to an empty CPU IVF index with float16 codes of the rows themselves
    (``by_residual=False``), each inverted list allocated once at its final size; the rows as the lists
    now hold them.

    faiss's ``add`` appends to every list's vector, which grows by doubling: at 3×10⁵ × 384 the lists
    took 315 MB for 220 MB of codes. Here a first pass assigns every row to its list (the search
    ``add`` does), the lists are sized from the counts, and a second pass writes each row's code at its
    place, rows in order within a list (whatever order the source gives them in): the same index, byte
    for byte, without the slack."""
    lists = np.empty(source.shape[0], np.int64)
    for labels, rows in source.batches():
        lists[labels] = index.quantizer.search(_f32(rows), 1)[1][:, 0]
    counts, place = place_rows(lists, index.nlist)
    inverted = faiss.downcast_InvertedLists(index.invlists)
    for list_no in np.flatnonzero(counts):
        inverted.resize(int(list_no), int(counts[list_no]))
    for labels, rows in source.batches():
        at_list, at_place = lists[labels], place[labels]
        order = np.lexsort((at_place, at_list))
        labels, at_list, at_place = labels[order], at_list[order], at_place[order]
        rows = np.ascontiguousarray(rows[order])
        # float16 rows are their own codes; others take faiss's rounding (which breaks ties unlike numpy's)
        codes = rows.view(np.uint8) if rows.dtype == np.float16 else index.sq.compute_codes(_f32(rows))
        # runs of rows that sit next to one another in one list: one write each
        cuts = np.flatnonzero((np.diff(at_list) != 0) | (np.diff(at_place) != 1)) + 1
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(order)]])):
            inverted.update_entries(int(at_list[lo]), int(at_place[lo]), int(hi - lo), faiss.swig_ptr(labels[lo:hi]),
                                    faiss.swig_ptr(codes[lo:hi]))
    index.ntotal = len(lists)
    return ListRows(index, lists, place)


def _tune_nprobe(
    index: faiss.Index, nlist: int, q: np.ndarray, truth: np.ndarray, target: float, on_gpu: bool
) -> tuple[int, float]:
    """Smallest nprobe reaching `target` recall: doubling, then bisection between the last two."""

    def measure(p: int) -> float:
        _set_nprobe(index, p, on_gpu)
        _, i = index.search(q, truth.shape[1])
        return knn_intersection_measure(i, truth)

    lo, hi = 0, 1
    r_hi = measure(hi)
    while r_hi < target and hi < nlist:
        lo, hi = hi, min(hi * 2, nlist)
        r_hi = measure(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = measure(mid)
        if r >= target:
            hi, r_hi = mid, r
        else:
            lo = mid
    _set_nprobe(index, hi, on_gpu)
    return hi, r_hi


def _lists_hold_rows(source: RowSource, exact_max: int, budget: int, use_gpu: UseGpu) -> bool:
    """Whether the index `build_index` makes of ``source`` holds its rows exactly (CPU IVF lists of
    float16 codes, from float16 rows), so it can stand in for them."""
    n, d = source.shape
    return n > exact_max and n * d * 2 <= budget and np.dtype(source.dtype) == np.float16 and not _on_gpu(use_gpu)


def build_index(
    x: np.ndarray | RowSource,
    *,
    recall_target: float = 0.95,
    exact_max: int = EXACT_MAX,
    memory_budget_bytes: int | None = None,
    seed: int = 0,
    use_gpu: UseGpu = "auto",
) -> PoolIndex:
    """Index L2-normalised rows of `x` (float16/float32, may be memory-mapped, or a `RowSource`) for
    cosine search.

    N <= exact_max: IndexFlatIP (exact). Otherwise IVF with ~4·√N lists, its quantiser trained on a
    seeded subsample (`_train_quantiser`). The lists hold the vectors as float16 (the storage dtype of
    `curate embed`, so no precision is lost for our tables and the index is one float16 copy, not a
    float32 one) when they fit `memory_budget_bytes` (default half the machine's RAM), else IVF-PQ
    codes. nprobe is then tuned on a held-out sample of pool rows against exact search so recall@10 >=
    recall_target (a warning if even nprobe = nlist cannot).

    The result's ``rows`` are the indexed rows: ``x`` itself, or for a `RowSource` of float16 rows the
    index's own lists (`curation.index_rows.ListRows`), so the rows are never held twice; any other
    source is loaded.
    """
    budget = memory_budget_bytes or psutil.virtual_memory().total // 2
    if not isinstance(x, np.ndarray) and not _lists_hold_rows(x, exact_max, budget, use_gpu):
        x = x.load()  # the index cannot stand in for these rows: they are held as they are
    source = InMemoryRows(x) if isinstance(x, np.ndarray) else x
    n, d = source.shape
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {"n": int(n), "dim": int(d), "metric": "inner_product", "seed": seed}

    if n <= exact_max:
        index, on_gpu = _maybe_to_gpu(faiss.IndexFlatIP(d), use_gpu)
        _add_in_batches(index, x)
        params.update(kind="flat", nlist=None, nprobe=None, m=None, recall_at_10=1.0)
        return PoolIndex(index=index, params=params, fingerprint=fingerprint(x), on_gpu=on_gpu, rows=x)

    nlist = _nlist_for(n)
    quantizer = faiss.IndexFlatIP(d)
    if n * d * 2 <= budget:
        cpu_index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_INNER_PRODUCT, False)  # by_residual=False:
        params.update(kind="ivf_fp16", m=None)  # codes are the float16 rows themselves, exact for our tables
    else:
        m = _pq_m_for(n, d, budget)
        cpu_index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        params.update(kind="ivf_pq", m=m)
    train_seed = int(rng.integers(2**31 - 1))
    n_train = min(n - min(N_TUNE_QUERIES, n // 10), TRAIN_POINTS_PER_LIST * nlist)
    train_rows = np.sort(rng.choice(n, size=n_train, replace=False))
    _train_quantiser(cpu_index, _f32(source.take(train_rows)), train_seed, _on_gpu(use_gpu))
    index, on_gpu = _maybe_to_gpu(cpu_index, use_gpu)
    if params["kind"] == "ivf_fp16" and not on_gpu:
        held = _fill_fp16_lists(index, source)
    else:
        _add_in_batches(index, x)
    rows = x if isinstance(x, np.ndarray) else held

    # Held out from training so the recall estimate is not flattered by centroids fit to the queries;
    # they are still pool rows (find themselves), as in the self-kNN graph of dedup.
    held_out = np.setdiff1d(np.arange(n), train_rows, assume_unique=True)
    q_rows = np.sort(rng.choice(held_out, size=min(N_TUNE_QUERIES, len(held_out)), replace=False))
    q = _f32(rows[q_rows])
    # blocks of TRUTH_BLOCK rows: the exact search holds a queries × block similarity matrix (4 MB a 1k block)
    _, truth = knn_ground_truth(q, _blocks(rows, TRUTH_BLOCK), RECALL_AT, metric_type=faiss.METRIC_INNER_PRODUCT)
    nprobe, recall = _tune_nprobe(index, nlist, q, truth, recall_target, on_gpu)
    if recall < recall_target:
        warnings.warn(
            f"{params['kind']} reaches recall@{RECALL_AT}={recall:.3f} < {recall_target} at nprobe=nlist",
            stacklevel=2,
        )
    params.update(
        nlist=nlist,
        nprobe=nprobe,
        n_train=int(n_train),
        recall_at_10=round(float(recall), 4),
        recall_target=recall_target,
        memory_budget_bytes=int(budget),
    )
    return PoolIndex(index=index, params=params, fingerprint=fingerprint(rows), on_gpu=on_gpu, rows=rows)
