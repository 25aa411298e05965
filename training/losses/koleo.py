"""KoLeo regulariser: spread features uniformly by pushing each one away from its nearest neighbour."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def _nearest_neighbour_log_distance(
    samples: Tensor, query_index: Tensor, group_size: int | None, eps: float
) -> Tensor:
    """−log(‖x̂_i − x̂_nn(i)‖ + eps) for queries i, neighbours among `samples` of the same group.

    `samples` `[N, D]` are unit-norm; `query_index` `[m]` indexes them. Groups are consecutive runs
    of `group_size` samples (`None`: one group); the query itself is excluded. The neighbour is the
    max inner product, which on the unit sphere is the min distance.
    """
    n_samples = samples.shape[0]
    if group_size is None:
        group_size = n_samples
    if group_size < 2 or n_samples % group_size == 1:
        raise ValueError(f"every KoLeo group needs >= 2 samples (N={n_samples}, group_size={group_size})")
    candidates = torch.arange(n_samples, device=samples.device)
    similarity = samples[query_index] @ samples.T
    excluded = (candidates[None, :] // group_size != query_index[:, None] // group_size) | (
        candidates[None, :] == query_index[:, None]
    )
    similarity = similarity.masked_fill(excluded, float("-inf"))
    neighbour = similarity.argmax(dim=1)
    distance = torch.linalg.vector_norm(samples[query_index] - samples[neighbour], dim=1)
    return -torch.log(distance + eps)


def koleo_loss(x: Tensor, group_size: int | None = None, eps: float = 1e-8) -> Tensor:
    """KoLeo over `x` `[n, D]` (L2-normalised here), neighbours within consecutive groups."""
    samples = F.normalize(x, dim=-1, eps=eps)
    query_index = torch.arange(x.shape[0], device=x.device)
    return _nearest_neighbour_log_distance(samples, query_index, group_size, eps).mean()


class KoLeoDistributed(nn.Module):
    """KoLeo whose neighbours come from consecutive groups of the global (all-ranks) batch.

    Every rank contributes the same number of samples; features are all-gathered differentiably,
    so gradients also reach the rank that owns a neighbour. Each rank returns the mean over its
    own samples. Without an initialised process group it is the single-process grouped KoLeo.
    """

    def __init__(
        self, group_size: int = 16, eps: float = 1e-8, group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        samples = F.normalize(x, dim=-1, eps=self.eps)
        rank = 0
        if dist.is_available() and dist.is_initialized():
            group = self.group if self.group is not None else dist.group.WORLD
            rank = dist.get_rank(group)
            samples = torch.cat(dist_fn.all_gather(samples, group=group), dim=0)
        n_local = x.shape[0]
        query_index = torch.arange(rank * n_local, (rank + 1) * n_local, device=x.device)
        return _nearest_neighbour_log_distance(samples, query_index, self.group_size, self.eps).mean()
