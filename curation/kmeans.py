"""Deterministic chunked k-means on torch (CPU or CUDA), built for sharded Lloyd iterations.

Assignment (the distance formula, chunking and the fused CUDA kernel) lives in
`curation.kmeans_assign`; this module holds what Lloyd adds on top. Why it looks the way it does:

* Centroid sums are accumulated in float64 with ``index_add_`` after rounding every coordinate to a
  fixed power-of-two grid (``grid_exp``, from a bound on ``|x|``). All partial sums are then exact
  multiples of ``2**-grid_exp`` below ``2**53`` units, so float64 addition is exact and therefore
  order-independent: a driver that adds the partial sums of W shards gets bit-identical centroids to
  one worker (and CUDA atomics cannot change the result). The rounding error (≤ 2**-23 · max|x| per
  coordinate) is far below float32 resolution of the data; exactness holds up to 2**30 rows per
  cluster.
* Row chunks follow the global chunk grid of `curation.kmeans_assign.chunks`, so when shard
  boundaries fall on multiples of ``chunk_size`` each row's distances come from the same matmul
  shapes however the rows are sharded.
* Convergence is tested on the centroid shift (computed from exact sums), not on the inertia (a
  float sum whose last bits depend on the shard layout), so the iteration count is layout-free too.
* Lloyd (`kmeans_rows`) sees the data only through a `RowSource`: an in-memory array (`ArrayRows`)
  or shards held elsewhere (e.g. on Ray workers), so both run the very same loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from curation.kmeans_assign import (
    ArrayLike,
    Metric,
    Prepared,
    assign,
    chunk_assign,
    chunks,
    compute_dtype,
    default_chunk_size,
    fused_scoring,
    host_tensor,
    normalize_rows,
    resolve_device,
    to_device,
)

# Re-exported: callers of k-means need these assignment names beside Lloyd's.
__all__ = ["ArrayLike", "ArrayRows", "KMeansResult", "Metric", "PartialSums", "RowSource", "as_rows", "assign",
           "compute_dtype", "default_chunk_size", "device_rows", "fused_scoring", "grid_exponent", "kmeans",
           "kmeans_plusplus", "kmeans_rows", "normalize_rows", "partial_sums", "reduce_partials", "resolve_device",
           "storage_rows", "strided_variance", "update_centroids"]

#: Mantissa bits kept for the largest |coordinate| when rounding to the summation grid.
_GRID_BITS = 22


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # [k, d] float32
    labels: np.ndarray  # [n] int64
    distances: np.ndarray  # [n] float32: squared L2, or cosine distance 1 − cos
    inertia: float  # sum of distances
    n_iter: int


@dataclass(frozen=True)
class PartialSums:
    """What one shard contributes to a Lloyd update; combine shards with `reduce_partials`."""

    sums: torch.Tensor  # [k, d] float64, exact multiples of 2**-grid_exp
    counts: torch.Tensor  # [k] int64
    inertia: float
    far_dist: torch.Tensor  # [m] float32, the shard's farthest rows (for empty-cluster reseeding)
    far_rows: torch.Tensor  # [m] int64 global row ids
    far_points: torch.Tensor  # [m, d] float32


@runtime_checkable
class RowSource(Protocol):
    """The rows k-means runs on, wherever they are held; `kmeans_rows` needs nothing else.

    Row numbers are global. ``partial_sums`` and ``assign`` must use one chunk grid (the same
    ``chunk_size``, chunks starting at its global multiples, each chunk computed whole) for the result
    to be independent of where the rows live.
    """

    @property
    def n_rows(self) -> int: ...

    def take(self, rows: np.ndarray | slice) -> ArrayLike: ...

    def max_abs(self) -> float: ...

    def partial_sums(self, centroids: np.ndarray, *, grid_exp: int, metric: Metric) -> PartialSums: ...

    def assign(self, centroids: np.ndarray, *, metric: Metric) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True, eq=False)
class ArrayRows:
    """An array in this process as a `RowSource`."""

    x: ArrayLike
    chunk_size: int | None = None
    device: str | torch.device | None = "cpu"
    dtype: torch.dtype = torch.float32

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])

    def take(self, rows: np.ndarray | slice) -> ArrayLike:
        """The rows, on the host (rows held on a GPU are copied back)."""
        out = self.x[rows]
        return out.cpu().numpy() if isinstance(out, torch.Tensor) and out.device.type != "cpu" else out

    def max_abs(self) -> float:
        """Largest |value|, a chunk at a time (no whole-array temporary)."""
        step = self.chunk_size or 65_536
        return max((float(host_tensor(self.x[s : s + step]).abs().max()) for s in range(0, self.n_rows, step)),
                   default=0.0)

    def partial_sums(self, centroids: np.ndarray, *, grid_exp: int, metric: Metric) -> PartialSums:
        return partial_sums(self.x, centroids, grid_exp=grid_exp, metric=metric, chunk_size=self.chunk_size,
                            device=self.device, dtype=self.dtype)

    def assign(self, centroids: np.ndarray, *, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        return assign(self.x, centroids, metric=metric, chunk_size=self.chunk_size, device=self.device,
                      dtype=self.dtype)


def as_rows(x: ArrayLike | RowSource) -> RowSource:
    return x if isinstance(x, RowSource) else ArrayRows(x)


def storage_rows(x: ArrayLike) -> ArrayLike:
    """``x`` as rows to cluster: float16 and float32 arrays (memory-mapped ones too) stay as they are, one
    chunk at a time is converted where it is used; other dtypes become float32. The values every chunk
    computes with are the same either way, so the clusters are too."""
    if isinstance(x, torch.Tensor) or getattr(x, "dtype", None) in (np.float16, np.float32):
        return x
    return np.asarray(x, dtype=np.float32)


def device_rows(x: ArrayLike, device: torch.device, dtype: torch.dtype = torch.float32) -> ArrayRows:
    """``x`` as rows to cluster on ``device``: on CUDA moved there once when it takes at most half the free
    memory (every Lloyd step would otherwise copy all of it from the host again), else left where it is.
    The values, the chunk grid and so the results are the same either way."""
    if device.type == "cuda":
        t = host_tensor(x)
        if t.device == device or t.element_size() * t.nelement() <= torch.cuda.mem_get_info(device)[0] // 2:
            x = t.to(device)
    return ArrayRows(x, device=device, dtype=dtype)


def grid_exponent(max_abs: float) -> int:
    """Exponent q of the summation grid 2**-q for data bounded by ``max_abs`` (see module doc)."""
    if max_abs <= 0 or not math.isfinite(max_abs):
        return _GRID_BITS
    return _GRID_BITS - math.ceil(math.log2(max_abs))


def partial_sums(
    x: ArrayLike,
    centroids: ArrayLike,
    *,
    grid_exp: int,
    metric: Metric = "l2",
    row_offset: int = 0,
    n_far: int = 64,
    chunk_size: int | None = None,
    centroid_chunk: int | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PartialSums:
    """One shard's contribution to a Lloyd step (rows ``row_offset .. row_offset+len(x)``).

    ``grid_exp`` must be the same on every worker (``grid_exponent`` of a global bound on |x|, or
    ``grid_exponent(1.0)`` for cosine, whose rows are normalised) and ``chunk_size`` too (the
    default depends only on k, the device type, dtype and d). A driver sums the shards with
    `reduce_partials` and gets new centroids from `update_centroids`.
    """
    dev = resolve_device(device)
    k = int(centroids.shape[0])
    d = int(x.shape[1])
    chunk_size = chunk_size or default_chunk_size(k, dev, dtype, dim=d)
    centroid_chunk = centroid_chunk or k
    prep = Prepared(centroids, metric, dev, dtype)
    scale = float(2.0**grid_exp)
    sums = torch.zeros(k, d, dtype=torch.float64, device=dev)
    counts = torch.zeros(k, dtype=torch.int64, device=dev)
    inertia = torch.zeros((), dtype=torch.float64, device=dev)
    far_d = torch.empty(0, device=dev)
    far_r = torch.empty(0, dtype=torch.int64, device=dev)
    far_p = torch.empty(0, d, device=dev)
    for s, e in chunks(int(x.shape[0]), row_offset, chunk_size):
        xf, lab, dist = chunk_assign(to_device(x[s:e], dev, dtype), prep, metric, centroid_chunk)
        sums.index_add_(0, lab, torch.round(xf * scale).double())
        counts += torch.bincount(lab, minlength=k)
        inertia += dist.double().sum()
        rows = torch.arange(row_offset + s, row_offset + e, device=dev)
        pick = _top_far(dist, rows, n_far)
        cand_d, cand_r = torch.cat([far_d, dist[pick]]), torch.cat([far_r, rows[pick]])
        merged = _top_far(cand_d, cand_r, n_far)
        far_d, far_r, far_p = cand_d[merged], cand_r[merged], torch.cat([far_p, xf[pick]])[merged]
    return PartialSums(sums.div_(scale), counts, float(inertia), far_d, far_r, far_p)


def _top_far(dist: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
    """Positions of the m farthest rows, ordered by (distance desc, row asc): a layout-free order."""
    cand = torch.arange(len(dist), device=dist.device)
    if len(dist) > m > 0:  # all ties at the cut stay candidates
        cand = torch.nonzero(dist >= torch.topk(dist, m).values[-1]).flatten()
    order = cand[torch.argsort(rows[cand], stable=True)]
    return order[torch.argsort(-dist[order], stable=True)][:m]


def reduce_partials(parts: Sequence[PartialSums], n_far: int = 64) -> PartialSums:
    """Combine shard partials; exact sums make the result independent of shard count and order."""
    dev = parts[0].sums.device
    sums = torch.zeros_like(parts[0].sums)
    counts = torch.zeros_like(parts[0].counts)
    for p in parts:
        sums += p.sums.to(dev)
        counts += p.counts.to(dev)
    dist = torch.cat([p.far_dist.to(dev) for p in parts])
    rows = torch.cat([p.far_rows.to(dev) for p in parts])
    pick = _top_far(dist, rows, n_far)
    points = torch.cat([p.far_points.to(dev) for p in parts])[pick]
    return PartialSums(sums, counts, float(sum(p.inertia for p in parts)), dist[pick], rows[pick], points)


def update_centroids(
    total: PartialSums, centroids: ArrayLike, *, metric: Metric = "l2"
) -> tuple[np.ndarray, int]:
    """New centroids from reduced sums; empty clusters take the farthest rows (deterministic).

    Reseeds walk the gathered farthest rows farthest-first (each next one farthest from the rows and
    reseeds so far). Returns (centroids float32 [k, d], number of empty clusters). If more clusters
    are empty than
    farthest rows were gathered, the rest keep their previous centroid and are retried next step.
    """
    dev = total.sums.device
    prev = to_device(centroids, dev, torch.float32)
    counts = total.counts
    new = (total.sums / counts.clamp_min(1)[:, None].double()).float()
    empty = torch.nonzero(counts == 0).flatten()
    new[empty] = prev[empty]
    if len(empty):
        new[empty[: len(total.far_rows)]] = _spread_reseeds(total, len(empty))
    if metric == "cosine":
        new = normalize_rows(new)
    return new.cpu().numpy(), int(len(empty))


def _spread_reseeds(total: PartialSums, n_empty: int) -> torch.Tensor:
    """Farthest-first traversal of the gathered farthest rows, so reseeds do not pile into one spot."""
    pts = total.far_points.float()
    cur = total.far_dist.double().clone()
    picks = []
    for _ in range(min(n_empty, len(pts))):
        i = int(torch.argmax(cur))
        picks.append(i)
        cur = torch.minimum(cur, ((pts - pts[i]) ** 2).sum(1).double())
        cur[i] = -1.0
    return pts[picks]


def kmeans_plusplus(
    x: ArrayLike | RowSource,
    k: int,
    *,
    seed: int,
    metric: Metric = "l2",
    sample_size: int | None = None,
    n_local_trials: int | None = None,
    device: str | torch.device | None = "cpu",
    given: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy k-means++ (D² sampling, best of ``2 + ln k`` candidates) on a seeded row subsample.

    Seeding on ``sample_size`` rows (default ``min(n, 10k + 1000)``) keeps the sequential-in-k cost
    independent of n; Lloyd then refines on all rows. ``given``: centres already chosen (those a recluster
    keeps): the ``k − len(given)`` seeds drawn go where the given centres leave rows far, and follow them.
    """
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    source = as_rows(x)
    n = source.n_rows
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    size = min(n, sample_size or 10 * k + 1000)
    rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
    s = to_device(source.take(rows), dev, torch.float32)
    if metric == "cosine":
        s = normalize_rows(s)
    trials = n_local_trials or 2 + int(math.log(k))
    sq = (s * s).sum(dim=1)
    fixed = _given_centres(given, metric, dev, int(s.shape[1]))
    chosen = np.empty(k - len(fixed), dtype=np.int64)
    if len(fixed):
        closest = torch.as_tensor(assign(s, fixed, metric="l2", device=dev)[1], device=dev).double()
        first = 0
    else:
        chosen[0] = rng.integers(size)
        closest = (sq + sq[chosen[0]] - 2 * s @ s[chosen[0]]).clamp_min(0).double()
        first = 1
    for i in range(first, len(chosen)):
        cum = torch.cumsum(closest, 0)
        u = torch.as_tensor(rng.random(trials), dtype=torch.float64, device=dev) * cum[-1]
        cand = torch.searchsorted(cum, u).clamp_max(size - 1)
        # [n, d] @ [d, t] streams the sample once per round (1.7x less CPU than [t, d] @ [d, n] here)
        d_cand = (sq[None, :] + sq[cand][:, None] - 2 * (s @ s[cand].T).T).clamp_min(0).double()
        pot = torch.minimum(d_cand, closest[None, :]).sum(dim=1)
        best = int(torch.argmin(pot))
        chosen[i] = int(cand[best])
        closest = torch.minimum(closest, d_cand[best])
    return torch.cat([fixed, s[torch.as_tensor(chosen, device=dev)]]).cpu().numpy()


def _given_centres(given: np.ndarray | None, metric: Metric, device: torch.device, dim: int) -> torch.Tensor:
    """`kmeans_plusplus`'s fixed centres on the device (normalised for cosine, like the sample); none: [0, dim]."""
    if given is None:
        return torch.empty(0, dim, device=device)
    c = torch.as_tensor(np.asarray(given, dtype=np.float32), device=device)
    return normalize_rows(c) if metric == "cosine" else c


def kmeans(
    x: ArrayLike,
    k: int,
    *,
    seed: int = 0,
    n_iter: int = 30,
    tol: float = 1e-4,
    metric: Metric = "l2",
    init: Literal["k-means++", "random"] = "k-means++",
    init_sample_size: int | None = None,
    init_centroids: ArrayLike | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: Literal["torch", "faiss"] = "torch",
) -> KMeansResult:
    """Lloyd's k-means, deterministic for a seed.

    Stops after ``n_iter`` updates or when the mean squared centroid shift falls below
    ``tol`` × the mean per-dimension variance of the data (scale-free, as in scikit-learn).
    ``init_centroids`` warm-starts Lloyd (e.g. resampling steps). ``backend='faiss'`` runs
    ``faiss.Kmeans`` instead: faster on CPU but not bit-deterministic across thread counts or shards.
    """
    if backend == "faiss":
        return _faiss_kmeans(x, k, seed=seed, n_iter=n_iter, metric=metric, init_centroids=init_centroids)
    rows = ArrayRows(x, chunk_size=chunk_size, device=device, dtype=dtype)
    return kmeans_rows(rows, k, seed=seed, n_iter=n_iter, tol=tol, metric=metric, init=init,
                       init_sample_size=init_sample_size, init_centroids=init_centroids, device=device)


def strided_variance(source: RowSource, stride: int, chunk_rows: int = 16_384) -> float:
    """Mean per-coordinate variance (unbiased) of every ``stride``-th row: the scale of Lloyd's stopping
    threshold. Read a chunk of rows at a time and merged in float64 (Chan et al.'s pairwise update),
    so no float64 copy of the strided rows (up to 200k x d) is ever held."""
    rows = np.arange(0, source.n_rows, stride)
    count, mean, m2 = 0, None, None
    for start in range(0, len(rows), chunk_rows):
        block = host_tensor(source.take(rows[start : start + chunk_rows])).double()
        b_count, b_mean = len(block), block.mean(dim=0)
        b_m2 = ((block - b_mean) ** 2).sum(dim=0)
        if mean is None:
            count, mean, m2 = b_count, b_mean, b_m2
            continue
        delta, total = b_mean - mean, count + b_count
        mean = mean + delta * (b_count / total)
        m2 = m2 + b_m2 + delta**2 * (count * b_count / total)
        count = total
    return float((m2 / max(count - 1, 1)).mean()) if m2 is not None else 0.0


def kmeans_rows(
    source: RowSource,
    k: int,
    *,
    seed: int = 0,
    n_iter: int = 30,
    tol: float = 1e-4,
    metric: Metric = "l2",
    init: Literal["k-means++", "random"] = "k-means++",
    init_sample_size: int | None = None,
    init_centroids: ArrayLike | None = None,
    device: str | torch.device | None = "cpu",
) -> KMeansResult:
    """`kmeans` over any `RowSource`: the one Lloyd loop, whether rows are local or sharded.

    Init and the stopping threshold read rows through ``source.take`` (a seeded subsample and a
    fixed stride of at most 200k rows) and run on ``device``; each step needs only the source's
    reduced partial sums, so the result depends on the rows and the chunk grid, not on where rows live.
    """
    dev = resolve_device(device)
    n = source.n_rows
    if init_centroids is not None:
        c = np.asarray(init_centroids, dtype=np.float32)
    elif init == "random":
        rows = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
        c = np.asarray(source.take(rows), dtype=np.float32)
    else:
        c = kmeans_plusplus(source, k, seed=seed, metric=metric, sample_size=init_sample_size, device=dev)
    if metric == "cosine":
        c = normalize_rows(torch.as_tensor(c)).numpy()
    grid = grid_exponent(source.max_abs() if metric == "l2" else 1.0)
    var = strided_variance(source, max(1, n // 100_000))
    it = 0
    for it in range(1, n_iter + 1):
        part = source.partial_sums(c, grid_exp=grid, metric=metric)
        new, n_empty = update_centroids(part, c, metric=metric)
        shift = float(((new.astype(np.float64) - c) ** 2).sum(axis=1).mean())
        c = new
        if n_empty == 0 and shift <= tol * var:
            break
    labels, dists = source.assign(c, metric=metric)
    return KMeansResult(c, labels, dists, float(dists.astype(np.float64).sum()), it)


def _faiss_kmeans(
    x: ArrayLike, k: int, *, seed: int, n_iter: int, metric: Metric, init_centroids: ArrayLike | None
) -> KMeansResult:
    import faiss

    xa = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if metric == "cosine":
        xa = xa / np.maximum(np.linalg.norm(xa, axis=1, keepdims=True), 1e-12)
    km = faiss.Kmeans(xa.shape[1], k, niter=n_iter, seed=seed, spherical=metric == "cosine",
                      max_points_per_centroid=1 << 30)
    init = None if init_centroids is None else np.ascontiguousarray(init_centroids, dtype=np.float32)
    km.train(xa, init_centroids=init)
    c = km.centroids.astype(np.float32)
    labels, dists = assign(xa, c, metric=metric)
    return KMeansResult(c, labels, dists, float(dists.astype(np.float64).sum()), n_iter)
