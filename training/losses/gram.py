"""Gram anchoring: keep the student's patch-to-patch similarity structure close to a Gram teacher's."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def gram_loss(
    student_patches: Tensor,
    teacher_patches: Tensor,
    img_level: bool = True,
    reduction: Literal["mean", "frobenius"] = "mean",
    remove_neg: bool = False,
    *,
    normalized: bool = True,
    remove_only_teacher_neg: bool = False,
) -> Tensor:
    """Penalty between Gram matrices of patch tokens `[n, P, D]` (L2-normalised first if `normalized`).

    `img_level`: one `P×P` Gram per image; otherwise one `(n·P)×(n·P)` Gram over all tokens.
    `reduction='mean'`: mean squared entry difference (reference code); `'frobenius'`: squared
    Frobenius norm of the difference per Gram (paper), averaged over Grams. `remove_neg` clamps
    negative similarities of both Grams to 0; `remove_only_teacher_neg` clamps the teacher's and
    zeroes the student's entries where both are negative (at most one of the two). Teacher tokens are
    detached: gradient reaches only the student.
    """
    if student_patches.shape != teacher_patches.shape:
        raise ValueError(f"shape mismatch: {tuple(student_patches.shape)} vs {tuple(teacher_patches.shape)}")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("gram: remove_neg and remove_only_teacher_neg exclude each other")
    dtype = torch.promote_types(student_patches.dtype, torch.float32)
    student = student_patches.to(dtype)
    teacher = teacher_patches.detach().to(dtype)
    if normalized:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    if not img_level:
        student = student.reshape(1, -1, student.shape[-1])
        teacher = teacher.reshape(1, -1, teacher.shape[-1])
    student_gram = student @ student.transpose(1, 2)
    teacher_gram = teacher @ teacher.transpose(1, 2)
    if remove_neg:
        student_gram = student_gram.clamp_min(0.0)
        teacher_gram = teacher_gram.clamp_min(0.0)
    elif remove_only_teacher_neg:
        both_negative = (student_gram < 0) & (teacher_gram < 0)
        student_gram = student_gram.masked_fill(both_negative, 0.0)
        teacher_gram = teacher_gram.clamp_min(0.0)
    squared = (student_gram - teacher_gram).square()
    if reduction == "mean":
        return squared.mean()
    if reduction == "frobenius":
        return squared.sum(dim=(1, 2)).mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def downsample_patch_tokens(
    tokens: Tensor, teacher_grid: tuple[int, int], student_grid: tuple[int, int]
) -> Tensor:
    """Resample Gram-teacher patch tokens `[n, h_T·w_T, D]` onto the student grid `[n, h_S·w_S, D]`.

    Bicubic, `align_corners=False`, no antialiasing — what the high-resolution Gram teacher uses.
    Tokens are row-major over the grid.
    """
    n, n_tokens, dim = tokens.shape
    h_t, w_t = teacher_grid
    if n_tokens != h_t * w_t:
        raise ValueError(f"{n_tokens} tokens do not fill a {h_t}x{w_t} grid")
    grid = tokens.reshape(n, h_t, w_t, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=student_grid, mode="bicubic", align_corners=False, antialias=False)
    return resized.flatten(2).transpose(1, 2)
