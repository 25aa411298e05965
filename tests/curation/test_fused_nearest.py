"""The fused nearest-centroid Triton kernel against an fp64 argmax. On CPU it runs in Triton's
interpreter (the conftest turns it on), on CUDA compiled (``pytest --device cuda``)."""

from __future__ import annotations

import torch

from curation.fused_nearest import TILES, nearest_scores

BLOCK_N = TILES.block_n


def _dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    # Triton's interpreter computes with NumPy, which has no bfloat16: bf16 is checked on CUDA only.
    return (torch.float16,) if device.type == "cpu" else (torch.float16, torch.bfloat16)


def test_fused_nearest_is_the_argmax_of_scores_plus_bias(device):
    g = torch.Generator().manual_seed(0)
    n, k, d = 300, 2 * BLOCK_N + 37, 70  # no dimension a multiple of its tile
    for dtype in _dtypes(device):
        x = torch.randn(n, d, generator=g).to(dtype)
        c = torch.randn(k, d, generator=g).to(dtype)
        bias = -0.5 * (c.float() ** 2).sum(1) + torch.randn(k, generator=g)
        val, idx = nearest_scores(x.to(device), c.to(device), bias.to(device))
        scores = x.double() @ c.double().T + bias.double()
        top2 = scores.topk(2, dim=1)
        clear = (top2.values[:, 0] - top2.values[:, 1]) > 1e-3  # fp32 accumulation decides the rest
        assert clear.float().mean() > 0.95
        assert torch.equal(idx.cpu()[clear], top2.indices[clear, 0])
        torch.testing.assert_close(val.cpu().double(), top2.values[:, 0], rtol=0, atol=1e-3)
        assert val.dtype == torch.float32 and idx.dtype == torch.int64


def test_fused_nearest_ties_go_to_the_lowest_index(device):
    g = torch.Generator().manual_seed(1)
    k, d = 2 * BLOCK_N, 32
    c = torch.randn(k, d, generator=g).to(torch.float16)
    c[BLOCK_N + 5] = c[3]  # the same centroid in a later tile
    c[9] = c[7]  # and twice in one tile
    bias = -0.5 * (c.float() ** 2).sum(1)
    x = c[[3, 7, BLOCK_N + 5, 9]]
    _, idx = nearest_scores(x.to(device), c.to(device), bias.to(device))
    assert idx.cpu().tolist() == [3, 7, 3, 7]
