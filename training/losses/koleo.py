"""KoLeo regulariser: spread features uniformly by pushing each one away from its nearest neighbours."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def _neighbour_log_distances(
    samples: Tensor, query_index: Tensor, group_size: int | None, topk: int, eps: float
) -> Tensor:
    """−log(‖x̂_i − x̂_j + eps‖ + eps) `[m, topk]` for queries i and their `topk` nearest neighbours j.

    `samples` `[N, D]` are unit-norm; `query_index` `[m]` indexes them. Groups are consecutive runs
    of `group_size` samples (`None`: one group); the query itself is excluded. Neighbours are the
    largest inner products, which on the unit sphere are the smallest distances. The distance is
    ``torch.nn.PairwiseDistance(eps=eps)``'s, as in the reference: an exact duplicate is at
    ``eps·√D``, not 0.
    """
    n_samples = samples.shape[0]
    if group_size is None:
        group_size = n_samples
    if group_size < 2 or n_samples % group_size:
        raise ValueError(f"KoLeo groups of {group_size} do not split a batch of {n_samples} samples (need >= 2 each)")
    if not 1 <= topk < group_size:
        raise ValueError(f"KoLeo topk must be between 1 and group size - 1 = {group_size - 1}, got {topk}")
    candidates = torch.arange(n_samples, device=samples.device)
    queries = samples[query_index]
    similarity = queries @ samples.T
    excluded = (candidates[None, :] // group_size != query_index[:, None] // group_size) | (
        candidates[None, :] == query_index[:, None]
    )
    neighbours = similarity.masked_fill(excluded, float("-inf")).topk(topk, dim=1).indices
    distance = torch.linalg.vector_norm(queries[:, None, :] - samples[neighbours] + eps, dim=-1)
    return -torch.log(distance + eps)


def koleo_loss(x: Tensor, group_size: int | None = None, eps: float = 1e-8, topk: int = 1) -> Tensor:
    """KoLeo over `x` `[n, D]` (L2-normalised here), `topk` neighbours within consecutive groups."""
    samples = F.normalize(x, dim=-1, eps=eps)
    query_index = torch.arange(x.shape[0], device=x.device)
    return _neighbour_log_distances(samples, query_index, group_size, topk, eps).mean()


class KoLeoDistributed(nn.Module):
    """KoLeo whose neighbours come from consecutive groups of the global (all-ranks) batch.

    Every rank contributes the same number of samples; features are all-gathered differentiably,
    so gradients also reach the rank that owns a neighbour. Each rank returns the mean over its
    own samples and their `topk` neighbours. Without an initialised process group it is the
    single-process grouped KoLeo. Groups may straddle ranks (the reference requires each group to
    hold whole ranks; where it does, the two agree).
    """

    def __init__(
        self, group_size: int = 16, eps: float = 1e-8, group: dist.ProcessGroup | None = None, topk: int = 1
    ) -> None:
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.group = group
        self.topk = topk

    def forward(self, x: Tensor) -> Tensor:
        samples = F.normalize(x, dim=-1, eps=self.eps)
        rank = 0
        if dist.is_available() and dist.is_initialized():
            group = self.group if self.group is not None else dist.group.WORLD
            rank = dist.get_rank(group)
            samples = torch.cat(dist_fn.all_gather(samples, group=group), dim=0)
        n_local = x.shape[0]
        query_index = torch.arange(rank * n_local, (rank + 1) * n_local, device=x.device)
        return _neighbour_log_distances(samples, query_index, self.group_size, self.topk, self.eps).mean()
