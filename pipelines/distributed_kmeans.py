"""Level-1 k-means for pools too large for one device: Ray actors own row ranges, the driver reduces.

The rows are the catalog's ``embeddings`` (less any excluded ids) in sorted ``image_id`` order, the
cluster stage's order. The driver reads only the ``image_id`` column (`RowIndex`); each `ShardWorker`
reads the embedding shards itself by URL, keeps its contiguous range of that order as float32 and
answers Lloyd's questions (partial sums, assignments, the few rows init needs). The driver runs the
same loop as in-process ``kmeans`` (`curation.kmeans.kmeans_rows`) on the reduced sums.

Range boundaries fall on multiples of the k-means chunk size, so each chunk is one GEMM of the same
shape as in one process (GEMMs of different row counts round differently); with the exact partial
sums of `curation.kmeans` the result is then bit-identical to ``kmeans`` on the sorted array for any
number of workers. A pool with fewer chunks than workers uses fewer workers. Since ids are hashes, a
range of sorted ids spans nearly every shard: every worker reads every shard and keeps its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch

from catalog.embeddings import table_dim_and_dtype, to_numpy
from catalog.paths import resolve
from catalog.ray_runtime import ensure_ray
from catalog.schemas import EMBEDDINGS_TABLE, check_version
from catalog.shards import iter_shards, read_schema
from catalog.threads import ensure_threads
from curation.kmeans import (
    KMeansResult,
    Metric,
    PartialSums,
    assign,
    default_chunk_size,
    kmeans_rows,
    partial_sums,
    reduce_partials,
    resolve_device,
)


@dataclass(frozen=True)
class RowIndex:
    """Where each row of the sorted order lives, from the ``image_id`` column alone."""

    urls: list[str]  # the table's shards, in read order
    shard_rows: np.ndarray  # [n_shards] rows per shard when the index was read
    image_ids: np.ndarray  # [N] int64, sorted
    shard: np.ndarray  # [N] int32: position in ``urls`` of each row
    row: np.ndarray  # [N] int64: row inside that shard
    dim: int

    @classmethod
    def read(cls, root: str, *, exclude_ids: np.ndarray | None = None, table: str = EMBEDDINGS_TABLE) -> RowIndex:
        """Index of ``table`` without ``exclude_ids``, ordered like the stage (stable sort by image_id)."""
        urls, ids = [], []
        for url, shard in iter_shards(root, table, columns=["image_id"]):
            urls.append(url)
            ids.append(shard.column("image_id").to_numpy())
        if not urls:
            raise FileNotFoundError(f"catalog {root} has no {table} table: run `curate embed` first")
        dim, _ = table_dim_and_dtype(read_schema(urls[0]))
        counts = np.array([len(i) for i in ids], dtype=np.int64)
        all_ids = np.concatenate(ids)
        shard_of = np.repeat(np.arange(len(urls), dtype=np.int32), counts)
        row_in = np.arange(len(all_ids), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = np.arange(len(all_ids)) if exclude_ids is None else np.flatnonzero(~np.isin(all_ids, exclude_ids))
        order = keep[np.argsort(all_ids[keep], kind="stable")]
        return cls(urls, counts, all_ids[order], shard_of[order], row_in[order], dim)


def worker_bounds(n_rows: int, workers: int, chunk_size: int) -> list[int]:
    """Range edges on chunk multiples, chunks spread evenly over at most ``workers`` non-empty ranges."""
    n_chunks = -(-n_rows // chunk_size)
    return sorted({min(n_rows, (w * n_chunks // workers) * chunk_size) for w in range(workers + 1)})


def _read_vectors(url: str, dim: int, expected_rows: int) -> np.ndarray:
    fs, path = resolve(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        check_version(pf.schema_arrow, url)
        vectors = to_numpy(pf.read(columns=["embedding"]).column("embedding"), dim)
    if len(vectors) != expected_rows:
        raise RuntimeError(f"{url} changed while clustering ({len(vectors)} rows, {expected_rows} indexed)")
    return vectors


def _load_rows(urls: list[str], shard_rows: np.ndarray, dim: int, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Rows (shard[i], row[i]) as one float32 array, reading each needed shard once."""
    x = np.empty((len(shard), dim), dtype=np.float32)
    by_shard = np.argsort(shard, kind="stable")
    cuts = np.searchsorted(shard[by_shard], np.arange(len(urls) + 1))
    for u, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        if a < b:
            pos = by_shard[a:b]
            x[pos] = _read_vectors(urls[u], dim, int(shard_rows[u]))[row[pos]]
    return x


class ShardWorker:  # a Ray actor (ray.remote is applied when one starts: no Ray import for in-process runs)
    """Rows ``[start, start + len(shard))`` of the global order, in memory, answering one Lloyd step at a time."""

    def __init__(self, urls: list[str], shard_rows: np.ndarray, dim: int, shard: np.ndarray, row: np.ndarray,
                 start: int, chunk_size: int, device: str, dtype: torch.dtype = torch.float32):
        ensure_threads()  # torch threads for the CPUs Ray gave this actor
        self.device = resolve_device(device)
        self.x = torch.from_numpy(_load_rows(urls, shard_rows, dim, shard, row)).to(self.device)
        self.start = start
        self.chunk_size = chunk_size
        self.dtype = dtype

    def max_abs(self) -> float:
        return float(self.x.abs().max()) if len(self.x) else 0.0

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Local rows (global row − start)."""
        return self.x[torch.tensor(rows, device=self.device)].cpu().numpy()

    def partial_sums(self, centroids: np.ndarray, grid_exp: int, metric: Metric) -> PartialSums:
        p = partial_sums(self.x, torch.tensor(centroids), grid_exp=grid_exp, metric=metric, row_offset=self.start,
                         chunk_size=self.chunk_size, device=self.device, dtype=self.dtype)
        return PartialSums(p.sums.cpu(), p.counts.cpu(), p.inertia, p.far_dist.cpu(), p.far_rows.cpu(),
                           p.far_points.cpu())

    def assign(self, centroids: np.ndarray, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        return assign(self.x, torch.tensor(centroids), metric=metric, chunk_size=self.chunk_size, row_offset=self.start,
                      device=self.device, dtype=self.dtype)


class ShardedEmbeddings:
    """The indexed rows as a `curation.kmeans.RowSource` held by `ShardWorker` actors.

    Actors start on first use (a resumed stage whose level-1 steps are all checkpointed starts none)
    and end with `close` or the ``with`` block. ``chunk_size`` is both the k-means chunk and the
    alignment of the ranges; it must be what in-process ``kmeans`` would use for bit-identical results.
    """

    def __init__(self, index: RowIndex, *, workers: int, chunk_size: int, device: str = "cpu",
                 num_cpus: float = 1.0, dtype: torch.dtype = torch.float32):
        self.index = index
        self.chunk_size = chunk_size
        self.bounds = worker_bounds(len(index.image_ids), workers, chunk_size)
        self.device = device
        self.dtype = dtype
        self.num_cpus = num_cpus
        self._actors: list | None = None

    @property
    def n_rows(self) -> int:
        return len(self.index.image_ids)

    def _workers(self) -> list:
        import ray

        if self._actors is None:
            ensure_ray()
            actor = ray.remote(ShardWorker)
            n = len(self.bounds) - 1
            gpus = ray.cluster_resources().get("GPU", 0.0) if resolve_device(self.device).type == "cuda" else 0.0
            ix = self.index
            self._actors = [
                actor.options(num_cpus=self.num_cpus, num_gpus=min(1.0, gpus / n)).remote(
                    ix.urls, ix.shard_rows, ix.dim, ix.shard[s:e], ix.row[s:e], s, self.chunk_size, self.device,
                    self.dtype)
                for s, e in zip(self.bounds[:-1], self.bounds[1:])
            ]
        return self._actors

    def take(self, rows: np.ndarray | slice) -> np.ndarray:
        import ray

        rows = np.arange(self.n_rows)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        cuts = np.searchsorted(wanted, self.bounds)
        parts = ray.get([w.take.remote(wanted[a:b] - s)
                         for w, s, a, b in zip(self._workers(), self.bounds, cuts[:-1], cuts[1:])])
        out = np.empty((len(rows), self.index.dim), dtype=np.float32)
        out[order] = np.concatenate(parts)
        return out

    def max_abs(self) -> float:
        import ray

        return max(ray.get([w.max_abs.remote() for w in self._workers()]))

    def partial_sums(self, centroids: np.ndarray, *, grid_exp: int, metric: Metric) -> PartialSums:
        import ray

        c = ray.put(np.asarray(centroids, dtype=np.float32))
        return reduce_partials(ray.get([w.partial_sums.remote(c, grid_exp, metric) for w in self._workers()]))

    def assign(self, centroids: np.ndarray, *, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        import ray

        c = ray.put(np.asarray(centroids, dtype=np.float32))
        labels, dists = zip(*ray.get([w.assign.remote(c, metric) for w in self._workers()]))
        return np.concatenate(labels), np.concatenate(dists)

    def close(self) -> None:
        import ray

        for actor in self._actors or []:
            ray.kill(actor)
        self._actors = None

    def __enter__(self) -> ShardedEmbeddings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def distributed_kmeans(
    root: str,
    k: int,
    *,
    workers: int,
    seed: int = 0,
    n_iter: int = 30,
    tol: float = 1e-4,
    metric: Metric = "l2",
    init: Literal["k-means++", "random"] = "k-means++",
    init_sample_size: int | None = None,
    chunk_size: int | None = None,
    device: str = "cpu",
    exclude_ids: np.ndarray | None = None,
    num_cpus: float = 1.0,
) -> tuple[np.ndarray, KMeansResult]:
    """k-means of the catalog's embeddings on ``workers`` actors: (sorted image_ids, result by those ids).

    Bit-identical to ``kmeans(x, k, ...)`` with the same arguments, where ``x`` holds the rows in
    sorted image_id order, whatever ``workers`` is. ``chunk_size`` defaults to ``kmeans``'s own.
    """
    index = RowIndex.read(root, exclude_ids=exclude_ids)
    chunk = chunk_size or default_chunk_size(k, resolve_device(device), dim=index.dim)
    with ShardedEmbeddings(index, workers=workers, chunk_size=chunk, device=device, num_cpus=num_cpus) as rows:
        result = kmeans_rows(rows, k, seed=seed, n_iter=n_iter, tol=tol, metric=metric, init=init,
                             init_sample_size=init_sample_size, device=device)
    return index.image_ids, result
