"""Sinkhorn-Knopp centering of teacher prototype scores (DINO and iBOT targets).

Why log-domain: the reference exponentiates `logits / τ` directly and overflows once
|logit|/τ > ~88. Subtracting one global max (all-reduced MAX) fixes overflow but not underflow:
with logits spanning ±1e4 whole prototype rows become exactly 0 and the next division is 0/0.
Here every normalisation is a max-shifted logsumexp, the max taken with an all-reduce MAX when
the sum runs across ranks. In exact arithmetic this is the reference algorithm: its scalar
factors (the first global normalisation, 1/K, 1/B and the final ×B) are constants that each
following row/column normalisation cancels, so the result neither depends on them nor on how
samples are split over ranks — which is also why the DINO case (samples = crops × images) and the
iBOT case (samples = masked tokens, counts may differ per rank, even be zero) are the same call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _reduces_across_ranks(group: dist.ProcessGroup | None, distributed: bool) -> bool:
    """Cross-rank reductions only when a process group is up and the caller asked for one."""
    return dist.is_available() and dist.is_initialized() and (distributed or group is not None)


def _sample_axis_logsumexp(scores: Tensor, group: dist.ProcessGroup | None, across_ranks: bool) -> Tensor:
    """logsumexp over samples (dim 0) of `[n, K]`, over all ranks' samples when `across_ranks`."""
    if scores.shape[0] > 0:
        shift = scores.amax(dim=0)
    else:
        shift = scores.new_full(scores.shape[1:], float("-inf"))
    if across_ranks:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(scores - shift).sum(dim=0)
    if across_ranks:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return shift + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temperature: float,
    n_iterations: int = 3,
    group: dist.ProcessGroup | None = None,
    distributed: bool = False,
) -> Tensor:
    """Balanced soft assignments `[n, K]` (rows sum to 1) from teacher logits `[n, K]`.

    Each iteration first gives every prototype equal total mass over the *global* set of samples
    (reduced over `group` when `torch.distributed` is initialised and `group` or `distributed`
    is given), then renormalises each sample. For iBOT pass the teacher logits of the masked
    tokens only; per-token loss weights play no part here. Computed in at least float32.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    across_ranks = _reduces_across_ranks(group, distributed)
    scores = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)) / temperature
    for _ in range(n_iterations):
        scores = scores - _sample_axis_logsumexp(scores, group, across_ranks)
        scores = torch.log_softmax(scores, dim=1)
    return torch.exp(scores)
