"""Nearest-centroid assignment: the one distance formula every k-means in `curation` runs on.

* Scores are ``|c|²/2 − x·c`` (`bias_minus_dot`): the ``|x|²`` term does not change the argmin, so
  one GEMM plus a bias gives it; the squared distance is recovered afterwards from the best score
  (`distances_from_scores`). Lloyd (`curation.kmeans`) and the batched split of level 1
  (`curation.hierarchy.split_clusters`) both call these two functions, 2-D or batched 3-D.
* Rows are processed in chunks of ``chunk_size`` and centroids in chunks of ``centroid_chunk``,
  keeping a running (value, index) minimum, so memory stays bounded by ``chunk_size ×
  centroid_chunk`` scores whatever k is.
* On CUDA with bf16/fp16 inputs the GEMM and the argmin are one Triton kernel
  (`curation.fused_nearest`), so no score matrix is written at all.
* Row chunks start at multiples of ``chunk_size`` in the *global* row numbering (``row_offset``), so
  when shard boundaries fall on such multiples each row's distances come from the same matmul shapes
  however the rows are sharded (GEMMs of different row counts round differently, on CPU as on CUDA).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

Metric = Literal["l2", "cosine"]
ArrayLike = np.ndarray | torch.Tensor

#: Score matrix elements per chunk (rows × centroids); 2**24 fp32 = 64 MiB on CPU, 2**30 on CUDA.
CPU_SCORE_BUDGET = 1 << 24
CPU_ROW_ELEMENTS = 1 << 22  # values of x per CPU chunk: 16 MB per float32 copy of it
CUDA_SCORE_BUDGET = 1 << 30
#: torch.mm(..., out_dtype=) (bf16 inputs, fp32 scores) exists in recent torch builds, on CUDA only.
_HAS_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
#: Triton (shipped with CUDA builds of torch) runs the fused nearest-centroid kernel.
_HAS_TRITON = importlib.util.find_spec("triton") is not None
#: Rows per chunk with fused scoring (no score buffer): 2,048 row blocks per launch, enough to fill a GPU.
_FUSED_CHUNK_ROWS = 1 << 18


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fused_scoring(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether assignment runs as one fused Triton kernel (`curation.fused_nearest`): CUDA, 16-bit inputs."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _HAS_TRITON


def compute_dtype(precision: Literal["auto", "bf16", "fp32"], device: torch.device) -> torch.dtype:
    """The dtype of the nearest-centroid search. ``auto``: bf16 where it runs as the fused kernel (CUDA
    with Triton), fp32 elsewhere. bf16 rounds the inputs of the scores only: centroid sums, counts and
    distances' norms come from the fp32 rows, exactly as in fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if fused_scoring(device, torch.bfloat16) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def default_chunk_size(k: int, device: torch.device, dtype: torch.dtype = torch.float32,
                       dim: int | None = None) -> int:
    """Rows per chunk: a fixed function of k, device type, dtype and ``dim``, so every worker uses the
    same grid.

    Fused scoring keeps no score buffer, so its chunks are large (enough row blocks to fill the GPU).
    On CPU a chunk also holds ~5 float32-or-wider copies of its rows (converted, normalised, scaled,
    rounded, float64 sums): ``dim`` caps it at `CPU_ROW_ELEMENTS` values, so a small k does not mean
    65k-row chunks of ~500 MB temporaries at 384-d.
    """
    if fused_scoring(device, dtype):
        return _FUSED_CHUNK_ROWS
    budget = CUDA_SCORE_BUDGET if device.type == "cuda" else CPU_SCORE_BUDGET
    rows = min(1 << 16, budget // max(k, 1))
    if dim and device.type == "cpu":
        rows = min(rows, CPU_ROW_ELEMENTS // dim)
    return int(max(256, rows))


def host_tensor(x: ArrayLike) -> torch.Tensor:
    """``x`` as a tensor, shared where it can be; a read-only array (a memory-mapped ``.npy``) is copied,
    since torch cannot wrap one (and warns). Callers pass a chunk, so the copy is a chunk."""
    if isinstance(x, torch.Tensor):
        return x
    a = np.asarray(x)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def to_device(x: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return host_tensor(x).to(device=device, dtype=dtype)


def normalize_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows (last dimension) scaled to unit L2 norm (zero rows stay zero)."""
    return t / t.float().norm(dim=-1, keepdim=True).clamp_min(1e-12).to(t.dtype)


def half_sq_norms(c: torch.Tensor) -> torch.Tensor:
    """``|c|²/2`` per centroid (last dimension summed)."""
    return 0.5 * (c * c).sum(dim=-1)


def bias_minus_dot(x: torch.Tensor, c: torch.Tensor, half_sq: torch.Tensor) -> torch.Tensor:
    """Scores ``|c|²/2 − x·c``: [n, k] for x [n, d], c [k, d]; [G, n, k] for batched x [G, n, d], c [G, k, d]."""
    if x.dim() == 2:
        return torch.addmm(half_sq.to(x.dtype), x, c.T, alpha=-1)
    return torch.baddbmm(half_sq[:, None, :], x, c.transpose(1, 2), alpha=-1)


def distances_from_scores(xf: torch.Tensor, best: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Distance to the chosen centroid from its score: squared L2, or ``1 − cos`` (rows normalised)."""
    sq = ((xf * xf).sum(dim=-1) + 2.0 * best).clamp_min(0.0)
    return sq * 0.5 if metric == "cosine" else sq


class Prepared:
    """Centroids placed on the device once per iteration, plus their half squared norms."""

    def __init__(self, centroids: ArrayLike, metric: Metric, device: torch.device, dtype: torch.dtype):
        c = to_device(centroids, device, torch.float32)
        if metric == "cosine":
            c = normalize_rows(c)
        self.half_sq = half_sq_norms(c)
        self.c = c.to(dtype)
        self.fused = fused_scoring(device, dtype)
        self.c_aug: torch.Tensor | None = None
        if dtype == torch.bfloat16 and not self.fused:
            k, d = c.shape
            self.c_aug = torch.zeros(k, (d + 2 + 7) // 8 * 8, dtype=dtype, device=device)
            self.c_aug[:, :d] = self.c
            hi = (-self.half_sq).to(dtype)
            self.c_aug[:, d] = hi
            self.c_aug[:, d + 1] = (-self.half_sq - hi.float()).to(dtype)


def _fp32_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bf16 matrices with fp32 output: one GEMM on CUDA; elsewhere the same product of the
    exactly upcast inputs (CPU builds lack the mixed-dtype kernel)."""
    if a.device.type == "cuda" and _HAS_MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _chunk_min(xc: torch.Tensor, prep: Prepared, start: int, centroid_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(best score, index within the chunk) over one centroid chunk. With bf16 inputs the bias rides
    inside the GEMM (x gets constant columns, c gets −|c|²/2 split into bf16 high and low parts), so
    the chunk is one GEMM with fp32 output plus one max pass."""
    if prep.c_aug is None:
        c = prep.c[start : start + centroid_chunk]
        val, idx = bias_minus_dot(xc, c, prep.half_sq[start : start + c.shape[0]]).min(dim=1)
        return val.float(), idx
    xa = torch.zeros(xc.shape[0], prep.c_aug.shape[1], dtype=xc.dtype, device=xc.device)
    xa[:, : xc.shape[1]] = xc
    xa[:, xc.shape[1] : xc.shape[1] + 2] = 1
    val, idx = _fp32_scores(xa, prep.c_aug[start : start + centroid_chunk].T).max(dim=1)
    return val.neg_(), idx


def nearest(xc: torch.Tensor, prep: Prepared, centroid_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(best score, index) per row: a running argmin over centroid chunks; ties go to the lowest index.

    On CUDA with 16-bit inputs one Triton kernel does it all (`curation.fused_nearest`: no score
    matrix in memory); otherwise each chunk is one GEMM plus one min pass over its score buffer.
    """
    if prep.fused:
        from curation.fused_nearest import nearest_scores  # imports Triton: only where it runs

        best, idx = nearest_scores(xc, prep.c, -prep.half_sq)
        return best.neg_(), idx
    best_val: torch.Tensor | None = None
    best_idx: torch.Tensor | None = None
    for start in range(0, prep.c.shape[0], centroid_chunk):
        val, idx = _chunk_min(xc, prep, start, centroid_chunk)
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val < best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + start, best_idx)
    assert best_val is not None and best_idx is not None
    return best_val, best_idx


def chunk_assign(
    xc: torch.Tensor, prep: Prepared, metric: Metric, centroid_chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x chunk in compute dtype) -> (chunk as fp32, normalised if cosine; labels; distances)."""
    xf = xc.float()
    if metric == "cosine":
        xf = normalize_rows(xf)
        xc = xf.to(xc.dtype)
    val, lab = nearest(xc, prep, centroid_chunk)
    return xf, lab, distances_from_scores(xf, val, metric)


def chunks(n: int, row_offset: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Local [start, end) ranges whose global boundaries fall on multiples of chunk_size."""
    start = 0
    while start < n:
        end = min(n, ((row_offset + start) // chunk_size + 1) * chunk_size - row_offset)
        yield start, end
        start = end


def assign(
    x: ArrayLike,
    centroids: ArrayLike,
    *,
    metric: Metric = "l2",
    chunk_size: int | None = None,
    centroid_chunk: int | None = None,
    row_offset: int = 0,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: (labels int64 [n], distances float32 [n])."""
    dev = resolve_device(device)
    k = int(centroids.shape[0])
    chunk_size = chunk_size or default_chunk_size(k, dev, dtype, dim=int(x.shape[1]))
    centroid_chunk = centroid_chunk or k
    prep = Prepared(centroids, metric, dev, dtype)
    n = int(x.shape[0])
    labels = np.empty(n, dtype=np.int64)
    dists = np.empty(n, dtype=np.float32)
    for s, e in chunks(n, row_offset, chunk_size):
        _, lab, dist = chunk_assign(to_device(x[s:e], dev, dtype), prep, metric, centroid_chunk)
        labels[s:e] = lab.cpu().numpy()
        dists[s:e] = dist.cpu().numpy()
    return labels, dists
