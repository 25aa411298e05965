"""Projection heads for DINO / iBOT self-distillation.

The head is split into "up to the bottleneck" and "last layer" so that distillation can share
(broadcast) the small L2-normalised bottleneck features and apply each student's own prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DINOHead(nn.Module):
    """MLP → L2-normalised bottleneck → linear prototypes (no weight norm, as in DINOv3)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_prototypes: int = 65536,
        n_layers: int = 3,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, n_prototypes, bias=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Truncated-normal(0.02) weights and zero biases on every linear layer (seeded by ``generator``)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_bottleneck(self, x: Tensor) -> Tensor:
        """Features `[..., in_dim]` → unit-norm bottleneck `[..., bottleneck_dim]`."""
        return F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)

    def forward_last_layer(self, z: Tensor) -> Tensor:
        """Bottleneck features → prototype logits `[..., n_prototypes]`."""
        return self.last_layer(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_last_layer(self.forward_bottleneck(x))
