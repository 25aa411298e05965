"""Axial rotary position embedding of DINOv3 (2-D coordinates in [-1, 1], rotate-half)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

NormalizeCoords = Literal["separate", "min", "max"]


def rope_periods(
    head_dim: int, base: float | None, min_period: float | None = None, max_period: float | None = None
) -> Tensor:
    """Periods for the `head_dim // 4` frequencies of each axis.

    With `base`: base ** (2i / (head_dim / 2)). Otherwise geometric from `min_period` to `max_period`:
    max * (max / min) ** (t - 1) for t = linspace(0, 1).
    """
    n = head_dim // 4
    if base is not None:
        return base ** (2 * torch.arange(n, dtype=torch.float32) / (head_dim // 2))
    if min_period is None or max_period is None:
        raise ValueError("RoPE periods need a base or both min_period and max_period")
    ratio = max_period / min_period
    return ratio ** torch.linspace(0, 1, n, dtype=torch.float32) / ratio * max_period


def patch_coords(h: int, w: int, normalize: NormalizeCoords = "separate") -> Tensor:
    """Patch-centre coordinates [h*w, 2] (row, col) mapped by 2c - 1 from the normalised centres.

    `separate` divides each axis by its own length (both span [-1, 1]); `min`/`max` divide both by
    the shorter/longer side, so the grid keeps its aspect ratio.
    """
    if normalize == "separate":
        h_div, w_div = h, w
    elif normalize in ("min", "max"):
        h_div = w_div = min(h, w) if normalize == "min" else max(h, w)
    else:
        raise ValueError(f"unknown RoPE coordinate normalisation {normalize!r}")
    rows = (torch.arange(h, dtype=torch.float32) + 0.5) / h_div
    cols = (torch.arange(w, dtype=torch.float32) + 0.5) / w_div
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
    Every call in train mode is a new draw (the ViT calls it once per block, as DINOv3 does). Random
    draws are made on the CPU from `generator` so runs are reproducible on any device.
    """

    def __init__(
        self,
        head_dim: int,
        base: float | None = 100.0,
        shift: float | None = None,
        jitter: float | None = None,
        rescale: float | None = None,
        *,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: NormalizeCoords = "separate",
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        self.register_buffer("periods", torch.empty(head_dim // 4), persistent=True)
        if not self.periods.is_meta:
            self.reset_periods()

    @property
    def augments(self) -> bool:
        """True when a forward in the current mode draws random coordinates."""
        return self.training and bool(self.shift or self.jitter or self.rescale)

    def reset_periods(self) -> None:
        with torch.no_grad():
            self.periods.copy_(rope_periods(self.head_dim, self.base, self.min_period, self.max_period))

    def forward(self, h: int, w: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        coords = patch_coords(h, w, self.normalize_coords)
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
