"""Student and EMA teacher (ViT + DINO head + iBOT head) and the combined DINOv3 loss of one step."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.losses import dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from training.models import MODEL_SIZES, ViTConfig, VisionTransformer
from training.models.heads import DINOHead
from training.train.config import HeadConfig, LossConfig, ModelConfig


class SSLModel(nn.Module):
    """One side of the self-distillation pair: backbone, DINO head (cls) and iBOT head (patches)."""

    def __init__(self, vit: ViTConfig, dino: HeadConfig, ibot: HeadConfig, seed: int) -> None:
        super().__init__()
        self.backbone = VisionTransformer(vit, seed=seed)
        self.dino_head = _head(vit.embed_dim, dino)
        self.ibot_head = _head(vit.embed_dim, ibot)
        if not self.backbone.cls_token.is_meta:
            self._init_heads(seed)

    @torch.no_grad()
    def _init_heads(self, seed: int) -> None:
        # DINOHead.reset_parameters draws from the global RNG; redo it from a private generator.
        gen = torch.Generator().manual_seed(seed + 1)
        for head in (self.dino_head, self.ibot_head):
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02, generator=gen)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)


def _head(in_dim: int, cfg: HeadConfig) -> DINOHead:
    return DINOHead(in_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.n_prototypes, cfg.n_layers)


def vit_config(model: ModelConfig) -> ViTConfig:
    if model.size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {model.size!r}; known: {', '.join(MODEL_SIZES)}")
    return dataclasses.replace(MODEL_SIZES[model.size], drop_path_rate=model.drop_path_rate)


def build_student_teacher(model: ModelConfig, seed: int) -> tuple[SSLModel, SSLModel]:
    """Student initialised from ``seed``; the teacher starts as an exact, gradient-free copy."""
    student = SSLModel(vit_config(model), model.dino_head, model.ibot_head, seed)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


FIELDS = ("total", "dino_local", "dino_global", "koleo", "ibot")


@dataclass
class StepLosses:
    total: Tensor
    dino_local: Tensor
    dino_global: Tensor
    koleo: Tensor
    ibot: Tensor

    def stacked(self) -> Tensor:
        """The five values (order of ``FIELDS``) as one detached float tensor, for a single all-reduce."""
        return torch.stack([getattr(self, name).detach().float() for name in FIELDS])




@torch.no_grad()
def teacher_targets(
    teacher: SSLModel, batch: dict, temp: float, n_global: int, loss: LossConfig, distributed: bool
) -> tuple[Tensor, Tensor]:
    """Sinkhorn-centred teacher targets: DINO ``[n_global, B, K]`` and iBOT at the masked tokens ``[M, K']``."""
    out = teacher.backbone(batch["global_crops"])
    cls_logits = teacher.dino_head(out["cls"])
    dino = sinkhorn_knopp(cls_logits, temp, loss.sinkhorn_iterations, distributed=distributed)
    masked = out["patches"].flatten(0, 1).index_select(0, batch["mask_indices"])
    ibot = sinkhorn_knopp(teacher.ibot_head(masked), temp, loss.sinkhorn_iterations, distributed=distributed)
    return dino.unflatten(0, (n_global, -1)), ibot


def ssl_losses(
    student: SSLModel,
    teacher: SSLModel,
    batch: dict,
    teacher_temp: float,
    loss: LossConfig,
    distributed: bool,
    generator: torch.Generator | None = None,
) -> StepLosses:
    """The recipe's loss for one per-rank batch (crop-major crops, iBOT masks from the collate).

    total = w_dino·(local·S_gS_l + global·S_g(S_g−1))/pairs + w_koleo·Σ_global-crops KoLeo(student cls)
    + w_ibot·iBOT; the student sees the masked global crops, the teacher the unmasked ones.
    """
    global_crops, local_crops, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    n_images = batch["image_ids"].shape[0]
    n_global = global_crops.shape[0] // n_images
    n_local = local_crops.shape[0] // n_images
    dino_targets, ibot_targets = teacher_targets(teacher, batch, teacher_temp, n_global, loss, distributed)

    g = student.backbone(global_crops, masks, generator=generator)
    cls_tokens = [g["cls"]]
    if n_local:
        cls_tokens.append(student.backbone(local_crops, is_local=True, generator=generator)["cls"])
    logits = student.dino_head(torch.cat(cls_tokens))
    global_logits = logits[: n_global * n_images].unflatten(0, (n_global, n_images))
    local_logits = logits[n_global * n_images :].unflatten(0, (n_local, n_images))
    dino = dino_loss(global_logits, local_logits, dino_targets, loss.student_temp)

    koleo = sum(koleo_loss(c.float()) for c in g["cls"].chunk(n_global))
    masked = g["patches"].flatten(0, 1).index_select(0, batch["mask_indices"])
    ibot = ibot_loss(
        student.ibot_head(masked), ibot_targets, batch["masks_weight"], n_global * n_images, loss.student_temp
    )
    total = loss.dino_weight * dino.loss + loss.koleo_weight * koleo + loss.ibot_weight * ibot
    return StepLosses(total, dino.local, dino.global_, koleo, ibot)


def cls_embeddings(backbone: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised cls embeddings [B, D] (eval-mode forward of an FSDP or plain backbone)."""
    return F.normalize(backbone(images)["cls"].float(), dim=-1)
