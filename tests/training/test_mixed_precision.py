"""bf16 compute over fp32 weights for an unsharded student/teacher pair (``precision=bf16`` without a
process group): the same step as fp32 up to bf16 rounding. Runs on CPU, or on CUDA with ``--device cuda``."""

from __future__ import annotations

import copy

import numpy as np
import torch

from tests.train_helpers import TINY
from training.data.masking import collate
from training.train.config import load_train_config
from training.train.distributed import DistInfo, prepare_model
from training.train.meta_arch import build_student_teacher, ssl_losses
from training.train.run_state import step_generator


def _batch(device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(1)
    samples = [{"global_crops": torch.randn(2, 3, 32, 32, generator=gen),
                "local_crops": torch.randn(2, 3, 16, 16, generator=gen)} for _ in range(4)]
    batch = collate(samples, patch_size=16, rng=np.random.default_rng(0))
    batch["image_ids"] = torch.arange(4)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_bf16_autocast_step_matches_fp32_over_fp32_weights(device):
    config = load_train_config(TINY)
    pairs = []
    for bf16 in (False, True):
        student, teacher = build_student_teacher(config.model, seed=0)
        info = DistInfo(0, 1, 0, device, False, bf16=bf16)
        pairs.append(tuple(prepare_model(m, info) for m in (student, copy.deepcopy(teacher))))
    batch = _batch(device)

    seen = []
    for student, _ in pairs:
        hook = student.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        student.backbone(batch["global_crops"])
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert pairs[1][0].dino_head(torch.randn(3, 64, device=device)).dtype == torch.bfloat16

    results = []
    for student, teacher in pairs:
        losses = ssl_losses(student, teacher, batch, 0.05, config.loss, False, generator=step_generator(0, 1, 0))
        losses.total.backward()
        results.append((losses.stacked(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}))
    (fp32_losses, fp32_grads), (bf16_losses, bf16_grads) = results
    torch.testing.assert_close(bf16_losses, fp32_losses, rtol=0.03, atol=0.02)
    assert all(p.dtype == torch.float32 for p in pairs[1][0].parameters())
    assert bf16_grads.keys() == fp32_grads.keys()
    assert all(g.dtype == torch.float32 for g in bf16_grads.values())
    flat = [torch.cat([g[n].flatten() for n in fp32_grads]) for g in (fp32_grads, bf16_grads)]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99  # the same step, up to bf16 rounding
