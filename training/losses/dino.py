"""DINO cross-view cross-entropy between student crops and Sinkhorn-centred teacher targets."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class DINOLossOutput(NamedTuple):
    loss: Tensor  # weighted total, ready to add to the other losses
    local: Tensor  # student local crops vs teacher global crops
    global_: Tensor  # student global crops vs teacher global crops, cross-view only


def dino_term_weights(n_global_crops: int, n_local_crops: int) -> tuple[float, float]:
    """(local, global) weights: each term counts its (student crop, teacher crop) pairs.

    Local pairs: S_g·S_l; global pairs without the same-view diagonal: S_g·(S_g−1).
    For 2 global + 8 local crops: 16/18 and 2/18.
    """
    local_terms = n_global_crops * n_local_crops
    global_terms = n_global_crops * (n_global_crops - 1)
    total = local_terms + global_terms
    if total == 0:
        raise ValueError(f"no DINO pairs for {n_global_crops} global and {n_local_crops} local crops")
    return local_terms / total, global_terms / total


def dino_cross_entropy(
    student_logits: Tensor,
    teacher_probs: Tensor,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
) -> Tensor:
    """Mean over (student crop, teacher crop, image) of −Σ_k p_t·log_softmax(z_s/τ_s).

    `student_logits` is `[S, B, K]`, `teacher_probs` `[T, B, K]` (crop-major). With
    `ignore_diagonal` the same-view pairs s == t are dropped and the divisor becomes
    B·S·T − B·min(S, T). Teacher targets are detached.
    """
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    log_p = torch.log_softmax(
        student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)) / student_temp, dim=-1
    )
    # pair_sums[s, t] = Σ_b Σ_k p_t[b, k] · log p_s[b, k]
    pair_sums = torch.einsum("sbk,tbk->st", log_p, teacher_probs.detach().to(log_p.dtype))
    n_pairs = n_student * n_teacher
    total = pair_sums.sum()
    if ignore_diagonal:
        total = total - torch.diagonal(pair_sums).sum()
        n_pairs -= min(n_student, n_teacher)
    return -total / (batch * n_pairs)


def dino_loss(
    student_global_logits: Tensor,
    student_local_logits: Tensor,
    teacher_global_probs: Tensor,
    student_temp: float = 0.1,
    local_weight: float = 1.0,
) -> DINOLossOutput:
    """DINO loss for S_g global + S_l local crops, terms weighted by their pair counts.

    Shapes `[S_g, B, K]`, `[S_l, B, K]`, `[S_g, B, K]`. `local_weight` is the extra schedule factor
    on the local term (reference `reweight_dino_local_loss`; 1 by default).
    """
    n_global, n_local = student_global_logits.shape[0], student_local_logits.shape[0]
    w_local, w_global = dino_term_weights(n_global, n_local)
    zero = student_global_logits.new_zeros(())
    local = (
        dino_cross_entropy(student_local_logits, teacher_global_probs, student_temp)
        if n_local > 0
        else zero
    )
    global_ = (
        dino_cross_entropy(student_global_logits, teacher_global_probs, student_temp, ignore_diagonal=True)
        if n_global > 1
        else zero
    )
    return DINOLossOutput(w_local * local_weight * local + w_global * global_, local, global_)
