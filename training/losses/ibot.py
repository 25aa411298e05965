"""iBOT masked-patch loss: student predicts the teacher's centred prototype scores at masked patches."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_token_weights(masks: Tensor) -> Tensor:
    """Per-masked-token weights `1 / #masked tokens of its image`, so every image counts once.

    `masks` is `[n_images, P]` bool; tokens are ordered as `masks.flatten().nonzero()`
    (row-major), the order in which masked tokens are gathered.
    """
    counts = masks.flatten(1).sum(dim=1)
    per_image = 1.0 / counts.clamp_min(1).to(torch.float32)
    return per_image.repeat_interleave(counts)


def ibot_loss(
    student_masked_logits: Tensor,
    teacher_masked_probs: Tensor,
    token_weights: Tensor,
    n_global_crops: int,
    student_temp: float = 0.1,
) -> Tensor:
    """−Σ_i w_i Σ_k Q_ik log_softmax(s_i/τ_s)_k / n_global_crops over masked tokens i.

    `student_masked_logits`, `teacher_masked_probs`: `[M, K]`; `token_weights`: `[M]`;
    `n_global_crops`: global-crop images on this rank, masked or not. Teacher targets are detached.
    """
    dtype = torch.promote_types(student_masked_logits.dtype, torch.float32)
    log_p = torch.log_softmax(student_masked_logits.to(dtype) / student_temp, dim=-1)
    per_token = (teacher_masked_probs.detach().to(log_p.dtype) * log_p).sum(dim=-1)
    return -(token_weights.to(log_p.dtype) * per_token).sum() / n_global_crops
