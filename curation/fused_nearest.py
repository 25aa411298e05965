"""Nearest centroid in one Triton kernel: the k-means score GEMM with its argmax fused in.

Why: assigning N rows to k centroids as a GEMM followed by a max writes and re-reads an [N, k] score
matrix, which at N = 8M, k = 65,536 is 2 TB of fp32 traffic per Lloyd iteration and costs about as
much as the GEMM itself. Here each program keeps a block of rows, walks over every centroid tile,
adds the bias to the fp32 accumulator and folds the tile into a running (max, argmax) in registers,
so the scores never leave the chip.

Scores are ``x·c + b`` with ``b = −|c|²/2`` (the argmax is the nearest centroid in L2); inputs in
bf16 or fp16 with fp32 accumulation, the bias added in fp32. Ties go to the lowest centroid index, as
in `curation.kmeans`. One fixed tile configuration: tile sizes set the order of the fp32 sums, and a
timing-driven choice could then give different bits on different runs or workers.

The same kernel source runs compiled on CUDA, and on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before Triton is imported (slow: the tests do this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Tiles:
    """Rows and centroids per program tile, the K step of the GEMM, and the launch shape on CUDA."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


#: The one configuration used (benchmarks may try others with ``nearest_scores(..., tiles=)``).
TILES = Tiles()


def _nearest_tiles(
    X, C, B, VAL, IDX, n, k, stride_x, stride_c,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: rows [pid·BLOCK_M, +BLOCK_M) against all k centroids; writes max score and its index."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, k, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < k
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):  # D is a compile-time constant: this loop is software-pipelined
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            x = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            c = tl.load(C + cols[None, :] * stride_c + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x, c, acc)
        acc += tl.load(B + cols, mask=col_ok, other=float("-inf"))[None, :]
        tile_best = tl.max(acc, axis=1)
        tile_idx = tl.argmax(acc, axis=1)
        better = tile_best > best  # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx + n0, best_idx)
    tl.store(VAL + rows, best, mask=row_ok)
    tl.store(IDX + rows, best_idx.to(tl.int64), mask=row_ok)


_kernel = triton.jit(_nearest_tiles)


def nearest_scores(
    x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor, tiles: Tiles = TILES
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max over centroids of x·c + bias as fp32 [n], its centroid index int64 [n]) for x [n, d], c [k, d]
    (same 16-bit dtype, same device) and bias [k] fp32."""
    if x.dtype != c.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fused nearest needs bf16 or fp16 rows and centroids, got {x.dtype} and {c.dtype}")
    x, c, bias = x.contiguous(), c.contiguous(), bias.float().contiguous()
    n, d = x.shape
    k = c.shape[0]
    val = torch.empty(n, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(n, tiles.block_m),)
    launch = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages} if x.device.type == "cuda" else {}
    _kernel[grid](x, c, bias, val, idx, n, k, x.stride(0), c.stride(0),
                  D=d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, **launch)
    return val, idx
