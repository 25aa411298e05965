"""Axial rotary position embedding of DINOv3 (2-D coordinates in [-1, 1], rotate-half)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def rope_periods(head_dim: int, base: float) -> Tensor:
    """Periods for the `head_dim // 4` frequencies of each axis: base ** (2i / (head_dim / 2))."""
    n = head_dim // 4
    return base ** (2 * torch.arange(n, dtype=torch.float32) / (head_dim // 2))


def patch_coords(h: int, w: int) -> Tensor:
    """Patch-centre coordinates [h*w, 2] (row, col), each axis normalised separately to [-1, 1]."""
    rows = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    cols = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * grid - 1.0


def rotate_half(x: Tensor) -> Tensor:
    """[a, b] -> [-b, a] over the last dim split in two halves (not interleaved pairs)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate `x` [..., N, head_dim] in fp32 and return it in its own dtype (keeps SDPA inputs uniform)."""
    dtype = x.dtype
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(dtype)


def _log_uniform(gen: torch.Generator | None, n: int, factor: float) -> Tensor:
    span = math.log(factor)
    return torch.empty(n).uniform_(-span, span, generator=gen).exp()


class RopePositionEmbedding(nn.Module):
    """Produces (sin, cos) [h*w, head_dim] for a patch grid.

    Training-time augmentations (each optional, only in train mode) follow DINOv3's order: shift by
    U(-s, s) per axis, jitter by exp(U(-ln j, ln j)) per axis, rescale by exp(U(-ln r, ln r)) shared.
    Random draws are made on the CPU from `generator` so runs are reproducible on any device.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 100.0,
        shift: float | None = None,
        jitter: float | None = None,
        rescale: float | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        self.register_buffer("periods", torch.empty(head_dim // 4), persistent=True)
        if not self.periods.is_meta:
            self.reset_periods()

    def reset_periods(self) -> None:
        with torch.no_grad():
            self.periods.copy_(rope_periods(self.head_dim, self.base))

    def forward(self, h: int, w: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        coords = patch_coords(h, w)
        if self.training:
            if self.shift:
                coords = coords + torch.empty(2).uniform_(-self.shift, self.shift, generator=generator)
            if self.jitter:
                coords = coords * _log_uniform(generator, 2, self.jitter)
            if self.rescale:
                coords = coords * _log_uniform(generator, 1, self.rescale)
        coords = coords.to(self.periods.device)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return angles.sin(), angles.cos()
